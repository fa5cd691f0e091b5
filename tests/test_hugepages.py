"""dreamer_jax/hugepages.py: the GLIBC_TUNABLES the CLI re-executes itself with."""

import os
import pathlib
import subprocess
import sys
import time

import pytest

from dreamer_jax.hugepages import with_huge_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")


@linux
def test_adds_the_tunable_and_keeps_the_others():
    assert with_huge_pages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_huge_pages(environ)["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )


@linux
@pytest.mark.parametrize("value", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1:x=1"])
def test_a_tunable_already_set_is_left_as_it_is(value):
    assert with_huge_pages({"GLIBC_TUNABLES": value}) is None


def _run(code: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, "an argument"], env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@linux
def test_reexec_runs_the_same_command_once_with_the_tunable():
    code = (
        "import os, sys; print('start', os.getpid(), flush=True); "
        "from dreamer_jax.hugepages import reexec_with_huge_pages; reexec_with_huge_pages(); "
        "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:], os.getpid())"
    )
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = _run(code, environ)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pids = [line.split()[1] for line in lines if line.startswith("start")]
    assert len(pids) == 2 and pids[0] == pids[1]  # started twice, one process
    assert lines[-1] == f"glibc.malloc.hugetlb=1 ['an argument'] {pids[0]}"
    opted_out = _run(code, {**environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert opted_out.stdout.count("start") == 1
    assert opted_out.stdout.splitlines()[-1].startswith("glibc.malloc.hugetlb=0")


def _tunables_of(pid: int) -> str | None:
    """GLIBC_TUNABLES in the environment the process `pid` was last exec'd with."""
    try:
        environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"GLIBC_TUNABLES=")]
    return values[0].decode() if values else ""


@linux
@pytest.mark.parametrize("program", ["python -m dreamer_jax.train", "dreamer-train"])
def test_the_training_commands_run_with_the_tunable(tmp_path, program):
    """The real commands, started without GLIBC_TUNABLES, run with it (checked in /proc)."""
    bin_dir = pathlib.Path(sys.executable).parent
    command = [sys.executable, "-m", "dreamer_jax.train"]
    if program == "dreamer-train":
        if not (bin_dir / "dreamer-train").exists():
            pytest.skip("dreamer-train is not installed next to this interpreter")
        command = [str(bin_dir / "dreamer-train")]
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    args = ["--configs", "classic", "debug", "--task", "classic_cartpole", "--logdir",
            str(tmp_path / "run"), "--wandb.mode", "disabled"]  # fmt: skip
    process = subprocess.Popen([*command, *args], env=environ, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _tunables_of(process.pid):
            time.sleep(0.1)
        assert _tunables_of(process.pid) == "glibc.malloc.hugetlb=1"
    finally:
        process.kill()
        process.wait()
