"""The one check that a directory the run writes to is usable, the one atomic write, the
lock that keeps two runs out of one logdir, and how to tell that the machine's memory, not
the input, failed an allocation."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import re
from collections.abc import Iterator

# A 0-byte probe succeeds on a full disk; 1 MiB of real data does not.
PROBE_BYTES = 1 << 20
# Write failures the user can fix (space, quota, permissions, a read-only mount).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


class DirectoryError(OSError):
    """A directory cannot be created or written. The message is one line."""


class DirectoryBusyError(DirectoryError):
    """Another process holds the directory's lock. The message is one line."""


class StorageError(OSError):
    """A write the user can fix failed mid-run (`STORAGE_ERRNOS`: a full disk, a quota, a
    read-only mount, permissions); its `filename` names the file. Raised by `naming`."""


def ensure_writable(
    directory: pathlib.Path, what: str, error: type[OSError] = DirectoryError
) -> None:
    """Creates `directory` and proves it writable with a `PROBE_BYTES` probe file (written,
    fsynced, removed), else raises `error` with one line naming `what` and the directory."""
    if directory.exists() and not directory.is_dir():
        raise error(f"{what} {directory} is a file, not a directory")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            # Random bytes: a compressing filesystem would store zeros in no space at all.
            write_synced(probe, os.urandom(PROBE_BYTES))
        finally:
            probe.unlink(missing_ok=True)
    except OSError as reason:
        raise error(f"{what} {directory} is not writable: {reason.strerror or reason}") from reason


def check_creatable(
    directory: pathlib.Path, what: str, error: type[OSError] = DirectoryError
) -> None:
    """Without creating or writing anything (a dry run): raises `error` with one line, worded
    as `ensure_writable`'s, when `directory` could not be created or written: its nearest
    existing ancestor is a file, or not writable (permissions, a read-only mount)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == directory and not directory.is_dir():
        raise error(f"{what} {directory} is a file, not a directory")
    problem = None
    if not existing.is_dir():
        problem = errno.ENOTDIR
    elif os.statvfs(existing).f_flag & os.ST_RDONLY:
        problem = errno.EROFS
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = errno.EACCES
    if problem is not None:
        raise error(f"{what} {directory} is not writable: {os.strerror(problem)}")


@contextlib.contextmanager
def naming(path: str | pathlib.Path) -> Iterator[None]:
    """Around a write of `path`: re-raises a `STORAGE_ERRNOS` OSError as a `StorageError`
    naming the file (its own, or `path` when it names none, as a failed write or flush on a
    full disk does), so that its one line says which file failed. Others pass unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS or isinstance(error, DirectoryError):
            raise
        raise StorageError(error.errno, error.strerror, error.filename or str(path)) from error


def write_synced(path: pathlib.Path, data: bytes) -> None:
    """Writes `data` to `path` and fsyncs it (so a full disk fails here, not later)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_atomic(path: str | pathlib.Path, data: bytes) -> None:
    """Replaces `path` with `data` via a fsynced temp file in the same directory and a
    rename, so a crash leaves the old file or the new one, never a partial one."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def lock_directory(directory: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive lock on `directory` (an existing, writable one) while in the block.

    An OS lock (`flock` on `<directory>/.lock`): the kernel drops it when the process dies,
    so even a `kill -9` never leaves it stale. The file holds the owner's pid, which a
    refused process names in its `DirectoryBusyError`.
    """
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DirectoryBusyError(
                f"{directory} is in use by another run (pid {owner}); two runs must not share "
                "a logdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|unable to allocate", re.IGNORECASE)
_ASKED = re.compile(r"allocat\w*\s+([\d.]+\s*[KMGTP]?i?B)\b|(\d+) bytes", re.IGNORECASE)


def out_of_memory(error: BaseException) -> str | None:
    """None, or how much memory a failed allocation asked for ("an unknown amount" when the
    message does not say), for a numpy `MemoryError` or an XLA RESOURCE_EXHAUSTED error."""
    text = str(error)
    if not (isinstance(error, MemoryError) or _OOM.search(text)):
        return None
    match = _ASKED.search(text)
    if match is None:
        return "an unknown amount"
    if match.group(1):
        return match.group(1).replace(" ", "")
    return f"{int(match.group(2)) / 2**30:.2f}GiB"
