"""CI runs the chaos script with K = 3 kills (the K = 20 result is in docs/benchmarks.md)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_chaos_three_kills(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--kills", "3", "--logdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    kills = [line for line in result.stdout.splitlines() if line.startswith("kill ")]
    assert len(kills) == 3
    assert "3 kills survived" in result.stdout
