"""CI runs the chaos script with K = 3 kills of a single run and K = 2 of a two-seed run
(the K = 20 result is in docs/benchmarks.md)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("kills, num_seeds", [(3, 1), (2, 2)])
def test_chaos_kills(tmp_path, kills, num_seeds):
    result = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--kills", str(kills), "--num_seeds",
         str(num_seeds), "--logdir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("kill ")]
    assert len(lines) == kills
    assert f"{kills} kills survived" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--kills", "-1"], "--kills must be >= 0"),
        (["--num_seeds", "0"], "--num_seeds >= 1"),
        (["--logdir", "tests"], "--logdir tests is not empty"),
        (["--logdir", "/proc/no/run"], "--logdir /proc/no/run: cannot create its parent folder"),
    ],
)
def test_bad_arguments_exit_2_before_any_run(args, fragment):
    result = subprocess.run(
        [sys.executable, "scripts/chaos.py", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and fragment in result.stderr.splitlines()[-1]
    assert "kill " not in result.stdout
