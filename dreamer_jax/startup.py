"""What a dreamer-jax program sets up before jax starts, for XLA:CPU's speed.

- Huge pages. XLA:CPU allocates an update's temporaries anew on every call (gigabytes at the
  Atari preset) and glibc returns such large blocks to the kernel when they are freed, so
  every update faults them back in 4 KiB at a time: about 850k page faults and 1.3 s of
  kernel time per Atari update on a 2-core CPU. With `glibc.malloc.hugetlb=1` malloc asks
  for transparent huge pages for those blocks (2 MiB per fault where the kernel's THP mode is
  `madvise` or `always`): the Atari update ran 1.19× faster, the classic one the same.
- Slack at the top of malloc's heaps, `glibc.malloc.top_pad` of 64 MiB. The classic preset's
  blocks are small and come from malloc's heaps, whose free top glibc returns to the kernel
  after every update; the next update faulted it back in (about 1,000 faults and 14 ms of
  kernel time per 45 ms update). With the slack kept, classic trained 1.09× faster end to
  end (its update alone 1.06×), the Atari update ran the same (its large blocks are mapped
  and unmapped either way), and peak resident memory grew by 0.1–0.3 GiB.

  glibc reads its tunables only at start-up, so the program re-executes itself once with
  those `GLIBC_TUNABLES` does not name already: naming one with another value opts out of
  it (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0`). Elsewhere than Linux, and with other C
  libraries, nothing changes.
- Eigen for matmuls. XLA:CPU hands each dot to YNNPACK by default; its own (Eigen) dots ran
  the Atari preset's update 1.07× faster (3.65 → 3.42 s on a 2-core CPU), at the cost of
  about 4 % at small batches (Atari with `--dataset.batch 4`). `XLA_FLAGS`
  gets `--xla_cpu_experimental_ynn_fusion_type=-individual_dot` unless it already names that
  flag (`--xla_cpu_experimental_ynn_fusion_type=+individual_dot` keeps XLA's default) or
  jaxlib is not one of the versions it was checked with (XLA aborts on a flag it does not
  know). XLA reads its flags when jax first creates its backend, so setting the variable in
  this process before then is enough; GPU runs are unaffected.

Also: until the program installs its own signal handling (train's `StopSignal`), SIGINT and
SIGTERM end it at once in one line (`quit_on_signals`).

Figures and commands: docs/benchmarks.md. `dreamer-train` and `dreamer-eval` (and their
`python -m dreamer_jax.train` / `.eval` forms) and `scripts/bench.py` call `prepare()` first
thing; code that imports dreamer_jax as a library gets neither setting unless it does the
same, and may then compute with other float rounding than the CLI.
"""

from __future__ import annotations

# Only these, so that `quit_on_signals` can be installed before anything slow is imported.
import functools
import os
import signal
import sys

# The glibc tunables the program runs with (see above) unless GLIBC_TUNABLES names them.
MALLOC_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.top_pad": str(64 << 20)}
DOT_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
DOT_FLAG = f"--{DOT_FLAG_NAME}=-individual_dot"
# jaxlib (major, minor) versions whose XLA knows DOT_FLAG and ran faster with it.
DOT_FLAG_JAXLIB = ((0, 10), (0, 11))


def with_malloc_tunables(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with each of `MALLOC_TUNABLES` that its `GLIBC_TUNABLES` does not name (whatever
    the value) added, or None if that adds none or this is not Linux."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = {entry.split("=")[0] for entry in tunables.split(":")}
    missing = [f"{name}={value}" for name, value in MALLOC_TUNABLES.items() if name not in named]
    if not sys.platform.startswith("linux") or not missing:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, *missing]))}


def with_eigen_dots(environ: dict[str, str], jaxlib_version: str) -> dict[str, str] | None:
    """`environ` with `DOT_FLAG` added to `XLA_FLAGS`, or None if `XLA_FLAGS` already names
    that flag or `jaxlib_version` (e.g. "0.10.2") is not one it was checked with."""
    flags = environ.get("XLA_FLAGS", "")
    release = tuple(int(part) for part in jaxlib_version.split(".")[:2] if part.isdigit())
    if DOT_FLAG_NAME in flags or release not in DOT_FLAG_JAXLIB:
        return None
    return {**environ, "XLA_FLAGS": " ".join(filter(None, [flags, DOT_FLAG]))}


def jaxlib_version() -> str:
    """The installed jaxlib's version, "" if none (read without importing it)."""
    import importlib.metadata  # noqa: PLC0415 (see the imports above)

    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def prepare() -> None:
    """Sets `XLA_FLAGS` (`with_eigen_dots`) in this process, then replaces the process (same
    pid, same command line) by one started with `with_malloc_tunables` if that adds anything.
    Call it first thing in a program's entry point, before jax runs anything; never from
    library code."""
    os.environ.update(with_eigen_dots(dict(os.environ), jaxlib_version()) or {})
    environ = with_malloc_tunables(dict(os.environ))
    if environ is None or not sys.executable:  # no interpreter path to re-execute (embedded)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)


def quit_on_signals() -> None:
    """SIGINT and SIGTERM end the program at once, with one line and exit code 128 + signal,
    until it installs handlers of its own. Called first thing, before the heavy imports:
    Python's default raises KeyboardInterrupt inside whichever import or callback is
    running, which prints a traceback, or nothing at all where that code swallows it and the
    run starts anyway. By then the program has written nothing."""

    def quit_now(signum: int, frame: object) -> None:
        print(f"\nsignal {signum}: quitting (nothing written yet)", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, quit_now)


def quiet_on_broken_pipe(main):
    """Wraps a program's `main`: output to a reader that has gone (`--help | head`) ends it
    with exit code 141 (128 + SIGPIPE) and no traceback, as Unix tools end. A run stopped
    this way has saved its checkpoint first (train's error path)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except BrokenPipeError:
            # Python would flush stdout again at exit, and fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE

    return wrapped
