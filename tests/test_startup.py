"""dreamer_jax/startup.py: the XLA_FLAGS and GLIBC_TUNABLES the CLI runs with."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from dreamer_jax.startup import (
    DOT_FLAG,
    jaxlib_version,
    with_eigen_dots,
    with_malloc_tunables,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables")


TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.top_pad=67108864"
OPTED_OUT = "glibc.malloc.hugetlb=0:glibc.malloc.top_pad=0"


@linux
def test_adds_the_tunables_and_keeps_the_others():
    assert with_malloc_tunables({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": TUNABLES}
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_malloc_tunables(environ)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLES}"


@linux
@pytest.mark.parametrize(
    ("value", "added"),
    [
        ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0:glibc.malloc.top_pad=67108864"),
        ("glibc.malloc.top_pad=0:x=1", "glibc.malloc.top_pad=0:x=1:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.top_pad_x=1", f"glibc.malloc.top_pad_x=1:{TUNABLES}"),
    ],
)
def test_a_tunable_already_named_is_left_as_it_is(value, added):
    assert with_malloc_tunables({"GLIBC_TUNABLES": value})["GLIBC_TUNABLES"] == added
    assert with_malloc_tunables({"GLIBC_TUNABLES": added}) is None


def test_adds_the_dot_flag_for_the_jaxlib_versions_it_was_checked_with():
    flag = "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    assert with_eigen_dots({"A": "1"}, "0.10.2") == {"A": "1", "XLA_FLAGS": flag}
    assert with_eigen_dots({"XLA_FLAGS": "--xla_dump_to=/d"}, "0.11.2") == {
        "XLA_FLAGS": f"--xla_dump_to=/d {flag}"
    }
    for version in ["0.9.2", "0.12.0", "1.0.0", ""]:  # XLA aborts on a flag it does not know
        assert with_eigen_dots({}, version) is None


def test_a_dot_flag_already_set_is_left_as_it_is():
    for flags in ["--xla_cpu_experimental_ynn_fusion_type=+individual_dot",
                  "--xla_dump_to=/d --xla_cpu_experimental_ynn_fusion_type="]:  # fmt: skip
        assert with_eigen_dots({"XLA_FLAGS": flags}, "0.10.2") is None


def _dot_uses_ynnpack() -> str:
    """Python code printing whether XLA:CPU compiles a matmul into a YNNPACK fusion."""
    return (
        "import jax, jax.numpy as jnp; x = jnp.ones((256, 256)); "
        "print('ynn' in jax.jit(lambda x: x @ x).lower(x).compile().as_text())"
    )


checked_jaxlib = pytest.mark.skipif(
    with_eigen_dots({}, jaxlib_version()) is None, reason="the dot flag is not set for this jaxlib"
)


@checked_jaxlib
def test_the_dot_flag_moves_matmuls_off_ynnpack():
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    default = _run(_dot_uses_ynnpack(), environ)
    flagged = _run(_dot_uses_ynnpack(), {**environ, "XLA_FLAGS": DOT_FLAG})
    assert default.stdout.split() == ["True"], default.stderr
    assert flagged.stdout.split() == ["False"], flagged.stderr


@checked_jaxlib
def test_prepare_after_importing_the_package_still_sets_the_flag_in_time():
    """No dreamer_jax module creates jax's backend on import, so bench.py (which calls
    `prepare` after its imports) gets the flag; without re-execution it is set in-process."""
    code = (
        "import dreamer_jax.train, dreamer_jax.eval, dreamer_jax.sweep, dreamer_jax.analyze; "
        "from dreamer_jax.startup import prepare; prepare(); " + _dot_uses_ynnpack()
    )
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = _run(code, {**environ, "GLIBC_TUNABLES": TUNABLES})
    assert result.stdout.split() == ["False"], result.stderr


def _run(code: str, environ: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, "an argument"], env=environ, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


@linux
def test_prepare_reexecutes_the_same_command_once_with_the_tunable_and_the_flag():
    code = (
        "import os, sys; print('start', os.getpid(), flush=True); "
        "from dreamer_jax.startup import prepare; prepare(); "
        "print(os.environ['GLIBC_TUNABLES'], sys.argv[1:], os.getpid()); "
        "print(os.environ.get('XLA_FLAGS'))"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    result = _run(code, environ)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    pids = [line.split()[1] for line in lines if line.startswith("start")]
    assert len(pids) == 2 and pids[0] == pids[1]  # started twice, one process
    assert lines[-2] == f"{TUNABLES} ['an argument'] {pids[0]}"
    assert lines[-1] == str((with_eigen_dots({}, jaxlib_version()) or {}).get("XLA_FLAGS"))
    opted_out = _run(
        code, {**environ, "GLIBC_TUNABLES": OPTED_OUT, "XLA_FLAGS": "--xla_dump_to=/d"}
    )
    assert opted_out.stdout.count("start") == 1
    assert opted_out.stdout.splitlines()[-2].startswith(OPTED_OUT)
    assert opted_out.stdout.splitlines()[-1].startswith("--xla_dump_to=/d")


def _environ_of(pid: int, name: str) -> str | None:
    """Variable `name` in the environment the process `pid` was last exec'd with."""
    try:
        environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    prefix = f"{name}=".encode()
    values = [e[len(prefix) :] for e in environ if e.startswith(prefix)]
    return values[0].decode() if values else ""


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler of its own for `signum` (its `SigCgt` mask)."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (signum - 1) & 1)


def _command(program: str, form: str, logdir: pathlib.Path) -> list[str]:
    """`dreamer-<program>` as a console script or as `python -m`, on a tiny cartpole run in
    `logdir` (evaluation: a run to evaluate, none here)."""
    command = [sys.executable, "-m", f"dreamer_jax.{program}"]
    if form == "console script":
        script = pathlib.Path(sys.executable).parent / f"dreamer-{program}"
        if not script.exists():
            pytest.skip(f"{script.name} is not installed next to this interpreter")
        command = [str(script)]
    args = ["--logdir", str(logdir)]
    if program == "train":
        args += ["--configs", "classic", "debug", "--task", "classic_cartpole",
                 "--wandb.mode", "disabled"]  # fmt: skip
    return [*command, *args]


@linux
@pytest.mark.parametrize("program", ["train", "eval"])
@pytest.mark.parametrize("form", ["python -m", "console script"])
def test_the_commands_run_with_the_tunable_and_the_flag(tmp_path, program, form):
    """`dreamer-train` and `dreamer-eval`, each as a console script and as `python -m`,
    started without GLIBC_TUNABLES or XLA_FLAGS, run with them (read in /proc)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS")}
    command = _command(program, form, tmp_path / "run")
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _environ_of(process.pid, "GLIBC_TUNABLES"):
            time.sleep(0.1)
        # glibc 2.36 cuts the string /proc shows at the first ':' as it parses it.
        tunables = _environ_of(process.pid, "GLIBC_TUNABLES")
        assert tunables and TUNABLES.startswith(tunables)
        flags = (with_eigen_dots({}, jaxlib_version()) or {}).get("XLA_FLAGS", "")
        assert _environ_of(process.pid, "XLA_FLAGS") == flags
    finally:
        process.kill()
        process.wait()


@linux
@pytest.mark.parametrize("program", ["train", "eval"])
@pytest.mark.parametrize("form", ["python -m", "console script"])
def test_a_signal_during_the_imports_quits_in_one_line(tmp_path, program, form):
    """Ctrl-C while the program still imports jax (before train's own handling): one line and
    exit 130, not a KeyboardInterrupt traceback (or a signal swallowed by library code)."""
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    command = _command(program, form, tmp_path / "run")
    process = subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # Re-executed with the tunables (`prepare`), then the handlers in place again
        # (`quit_on_signals` sets SIGINT's, then SIGTERM's, which Python leaves alone), and
        # importing jax takes a second or more. (A fixed wait after the exec was too short
        # for the new interpreter to start on a loaded machine.)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            _environ_of(process.pid, "GLIBC_TUNABLES") and _catches(process.pid, signal.SIGTERM)
        ):
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["signal 2: quitting (nothing written yet)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "dreamer_jax.train", "--help"],
        ["-m", "dreamer_jax.sweep", "experiments/atari55.yaml", "--dry-run"],
        ["scripts/bench.py", "--help"],
    ],
)
def test_output_to_a_reader_that_has_gone_ends_quietly(args):
    """`--help | head`: exit 141 (128 + SIGPIPE) as Unix tools end, no traceback or error."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the program writes
    try:
        result = subprocess.run(
            [sys.executable, *args], cwd=ROOT, stdout=write, stderr=subprocess.PIPE,
            text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == 128 + signal.SIGPIPE, result.stderr
    assert result.stderr == ""
