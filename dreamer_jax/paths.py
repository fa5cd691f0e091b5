"""The one check that a directory the run writes to is usable."""

from __future__ import annotations

import os
import pathlib


class DirectoryError(OSError):
    """A directory cannot be created or written. The message is one line."""


def ensure_writable(
    directory: pathlib.Path, what: str, error: type[DirectoryError] = DirectoryError
) -> None:
    """Creates `directory` and proves it writable with a probe file, else raises `error`
    with one line naming `what` and the directory."""
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as reason:
        raise error(f"{what} {directory} is not writable: {reason.strerror or reason}") from reason
