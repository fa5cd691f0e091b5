"""Every ```python block of README.md runs as written: each in a fresh interpreter, in an
empty working directory."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # the learner on its own, and dreamer_jax.load


def _param(index: int, code: str):
    # A block that trains a run takes over 20 s; tests/test_api.py covers `load` quickly.
    marks = [pytest.mark.slow] if "dreamer_jax.train" in code else []
    return pytest.param(code, id=f"block{index}", marks=marks)


@pytest.mark.parametrize("code", [_param(i, code) for i, code in enumerate(BLOCKS)])
def test_readme_python_block_runs(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
