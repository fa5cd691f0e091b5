"""The logdir lock and the writability probe."""

import os
import signal
import subprocess
import sys

import pytest

from dreamer_jax.paths import (
    DirectoryBusyError,
    DirectoryError,
    StorageError,
    check_creatable,
    ensure_writable,
    lock_directory,
    naming,
    out_of_memory,
)

HOLD = """
import pathlib, sys, time
from dreamer_jax.paths import lock_directory
with lock_directory(pathlib.Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_names_its_owner_and_a_kill_9_leaves_it_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(DirectoryBusyError, match=f"pid {holder.pid}\\)"),
            lock_directory(tmp_path),
        ):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    with lock_directory(tmp_path):  # the kernel dropped the dead holder's lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with lock_directory(tmp_path):  # and leaving the block released ours
        pass


def test_naming_makes_a_storage_error_naming_the_file(tmp_path):
    with pytest.raises(StorageError) as raised, naming(tmp_path / "episode.npz"):
        raise OSError(28, "No space left on device")  # a failed write names no file
    assert raised.value.errno == 28 and raised.value.filename == str(tmp_path / "episode.npz")
    assert str(raised.value) == f"[Errno 28] No space left on device: '{tmp_path / 'episode.npz'}'"
    with pytest.raises(StorageError) as raised, naming(tmp_path / "other"):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.tmp"))
    assert raised.value.filename == str(tmp_path / "x.tmp")  # names its own file: kept
    with pytest.raises(OSError) as raised, naming(tmp_path / "other"):
        (tmp_path / "missing" / "x").read_text()  # not a storage problem: unchanged
    assert type(raised.value) is FileNotFoundError
    with pytest.raises(BrokenPipeError), naming(tmp_path):
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(OSError, match="^no errno$") as raised, naming(tmp_path):
        raise OSError("no errno")


def test_check_creatable_creates_nothing_and_words_errors_as_ensure_writable(tmp_path):
    (tmp_path / "afile").write_text("")
    check_creatable(tmp_path / "new" / "deeper", "folder")  # fine, and nothing is made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    for target in (tmp_path / "afile" / "x", tmp_path / "afile"):
        with pytest.raises(DirectoryError) as checked:
            check_creatable(target, "folder")
        with pytest.raises(DirectoryError) as ensured:
            ensure_writable(target, "folder")
        assert str(checked.value) == str(ensured.value)


def test_out_of_memory_recognises_numpy_and_xla_messages():
    numpy_error = MemoryError("Unable to allocate 381. GiB for an array with shape (10, 4)")
    assert out_of_memory(numpy_error) == "381.GiB"
    xla = RuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3221225472 bytes."
    )
    assert out_of_memory(xla) == "3.00GiB"
    assert out_of_memory(RuntimeError("shapes do not match")) is None
