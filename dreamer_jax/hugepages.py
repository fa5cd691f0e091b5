"""Transparent huge pages for the learner's temporaries, via glibc's malloc tunables.

XLA:CPU allocates an update's temporaries anew on every call (gigabytes at the Atari preset)
and glibc returns such large blocks to the kernel when they are freed, so every update
faults them back in 4 KiB at a time: about 850k page faults and 1.3 s of kernel time per
Atari update on a 2-core CPU. With `glibc.malloc.hugetlb=1` malloc asks for transparent huge
pages for those blocks (2 MiB per fault where the kernel's THP mode is `madvise` or
`always`): the Atari update ran 1.19× faster, the classic one the same (docs/benchmarks.md).
glibc reads its tunables only at start-up, so `dreamer-train` and `python -m
dreamer_jax.train` re-execute themselves once with the setting before they import jax, and
`scripts/bench.py` does so too (after its imports). Set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out; elsewhere than Linux, and with other C
libraries, nothing changes.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"


def with_huge_pages(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with `glibc.malloc.hugetlb=1` added to `GLIBC_TUNABLES`, or None if it
    already names that tunable (whatever its value) or this is not Linux."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or TUNABLE in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def reexec_with_huge_pages() -> None:
    """Replaces this process (same pid, same command line) by one started with
    `with_huge_pages`; returns at once if there is nothing to add. Call it first thing in
    a program's entry point, never from library code."""
    environ = with_huge_pages(dict(os.environ))
    if environ is None or not sys.executable:  # no interpreter path to re-execute (embedded)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environ)
