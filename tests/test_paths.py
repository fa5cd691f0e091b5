"""The logdir lock and the writability probe."""

import os
import signal
import subprocess
import sys

import pytest

from dreamer_jax.paths import DirectoryBusyError, lock_directory

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
