"""The run state on disk: orbax checkpoints of `TrainState` plus a JSON of loop state.

    checkpointer = Checkpointer(logdir / "checkpoints", keep=3)
    checkpointer.save(step, train_state, loop_state)
    restored = checkpointer.restore_latest(template_state)   # None on a fresh run

orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that is taken for good; a failed save's temporary
directory is removed. Each checkpoint carries a CRC-32 of every array and of the loop state,
checked on restore: a flipped bit or an edited file restores otherwise (as NaNs or as another
run's counters). The loop state is saved with a mark that checksums exist, so a checkpoint
that lost them is not taken for one from before checksums. A checkpoint that fails to
restore or to match its checksums is moved aside to `<directory>_unreadable/<step>` (kept
for inspection, never deleted) in favour of the one before it, so the run can save that
step again. A checkpoint whose shapes differ from the
current networks is a config problem, not damage: `CheckpointError`, and nothing is moved.
Nothing is deleted except by orbax's keep-the-last-k policy after a successful save, and
the temporary directory of a save a crash interrupted (never a checkpoint) when the
checkpoints are next opened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dreamer_jax.agent import TrainState
from dreamer_jax.paths import ensure_writable, out_of_memory

# orbax's temporary directory of an unfinished save of step N: "N.orbax-checkpoint-tmp...".
_TMP_MARK = ".orbax-checkpoint-tmp"
# Where checkpoint N waits while a save replaces it (orbax reads integer names only).
_REPLACED = ".replaced"
_ORBAX_DIR = os.path.dirname(ocp.__file__)
# A key the loop state is saved with when checksums are: a checkpoint that has it but no
# checksums lost them, where one without it is from before checksums (and restores unchecked).
_CHECKSUMMED = "checksummed"
# How tensorstore words its errors: an absl status code first ("RESOURCE_EXHAUSTED: ...").
_TENSORSTORE_ERROR = re.compile(r"[A-Z]+(_[A-Z]+)*: ")

# orbax (via absl) logs every save at INFO and warns about the options of a read-only
# manager or a missing item; the errors that we raise say what matters.
logging.getLogger("absl").setLevel(logging.ERROR)


class CheckpointError(OSError):
    """Saving failed (disk full, unwritable directory), or a checkpoint does not fit the
    current config; the previous checkpoints are intact. The message is one line."""


def _reason(error: BaseException) -> str:
    """One short line for an orbax/tensorstore error: the OS error if there is one, else the
    first line of the innermost cause (orbax's own wrappers add only a TensorStore dump)."""
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        # `raise ... from None` hides a context that is no part of the story.
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    for cause in chain:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        code = re.search(r"os_error_code='?(\d+)", str(cause))
        if code:
            return os.strerror(int(code.group(1)))
    text = str(chain[-1]).strip()
    if not text:
        return type(chain[-1]).__name__
    line = text.splitlines()[0]
    if " " not in line:  # a bare key or index ("0", "'state'") says nothing alone
        line = f"{type(chain[-1]).__name__}: {line}"
    return line if len(line) <= 200 else line[:200].rsplit(" ", 1)[0] + " ..."


def _is_orbax_debris(error: BaseException | None) -> bool:
    """Whether `error` is left behind by a failed orbax save or restore: its other reads and
    writes fail in orbax's or tensorstore's code, or call back into its closed event loop,
    and each reports that with a traceback (a log record or an unraisable error): thousands
    of lines in all."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    if isinstance(error, ValueError) and _TENSORSTORE_ERROR.match(str(error)):
        return True
    trace = error.__traceback__ if error is not None else None
    while trace is not None:
        if trace.tb_frame.f_code.co_filename.startswith(_ORBAX_DIR):
            return True
        trace = trace.tb_next
    return False


class _DropOrbaxDebris(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # orbax's own error logs too: each either comes with an error that we report in one
        # line, or is harmless (an unparsable _CHECKPOINT_METADATA, which restores ignore).
        from_orbax = record.pathname.startswith(_ORBAX_DIR)
        return not (from_orbax or (record.exc_info and _is_orbax_debris(record.exc_info[1])))


def _silence_orbax_debris() -> None:
    """Drops `_is_orbax_debris` from the absl and asyncio loggers and from the unraisable
    error hook (every other error still gets through). Process-wide and installed once: the
    debris arrives after the failed call returned, when its tasks finish or get collected."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_debris", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_orbax_debris(unraisable.exc_value):
            previous(unraisable)

    hook.drops_orbax_debris = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_DropOrbaxDebris())
    # Its abandoned coroutines each warn when collected (the project has no asyncio of its own).
    warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)


def _to_disk(state: TrainState) -> TrainState:
    """Typed PRNG keys are stored as their raw uint32 data."""
    return state.replace(key=jax.random.key_data(state.key))


def _from_disk(state: TrainState) -> TrainState:
    return state.replace(key=jax.random.wrap_key_data(state.key))


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{"wm_params/params/.../kernel": (shape, dtype)}` of a tree of arrays or array
    metadata; tuple indices, dict keys and attribute names all become path parts."""

    def part(key: Any) -> str:
        return str(next(getattr(key, a) for a in ("key", "idx", "name") if hasattr(key, a)))

    return {
        "/".join(part(key) for key in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _checksums(state: TrainState, loop_state: dict[str, Any]) -> dict[str, Any] | None:
    """`{"state": {leaf path: CRC-32 of its bytes}, "loop": CRC-32 of the loop state's JSON}`
    of a state as stored (`_to_disk`); None if an array is not all on this host (multi-host
    runs are not checked)."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for _, x in leaves):
        return None
    paths = _leaf_specs(state)  # the same path names, in the same order
    return {
        "state": {
            path: zlib.crc32(np.ascontiguousarray(leaf))
            for path, (_, leaf) in zip(paths, leaves, strict=True)
        },
        "loop": _loop_checksum(loop_state),
    }


def _loop_checksum(loop_state: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(loop_state, sort_keys=True).encode())


def saved_loop_state(step_directory: pathlib.Path) -> dict[str, Any] | None:
    """The loop state of checkpoint directory `<checkpoints>/<step>` read as saved (orbax's
    JSON, no arrays, no orbax), if it matches the checksum saved with it; None if it cannot
    be read or does not. A cheap check for tools that only read counters (dreamer-sweep):
    the arrays are checked when a run restores the checkpoint."""
    try:
        loop_state = json.loads((step_directory / "loop" / "metadata").read_text())
        has_checksums = (step_directory / "checksums").is_dir()
        # As a restore checks it: unchecked only if from before checksums.
        if not isinstance(loop_state, dict) or (loop_state.get(_CHECKSUMMED) and not has_checksums):
            return None
        if has_checksums:
            checksums = json.loads((step_directory / "checksums" / "metadata").read_text())
            if not isinstance(checksums, dict) or checksums.get("loop") != _loop_checksum(
                loop_state
            ):
                return None
    except (OSError, ValueError):
        return None
    return {k: v for k, v in loop_state.items() if k != _CHECKSUMMED}


def _checksum_mismatch(saved: dict[str, Any], now: dict[str, Any] | None) -> str | None:
    """What of a restored checkpoint differs from its saved checksums, in words; None if
    nothing does."""
    if now is None:
        return None
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)):
        return "its saved checksums are damaged"
    if saved.get("loop") != now["loop"]:
        return "the loop state differs from the checksum saved with it"
    differs = (p for p, crc in now["state"].items() if saved["state"].get(p) != crc)
    path = next(differs, None)
    return path and f"{path} differs from the checksum saved with it"


def _first_mismatch(old: dict[str, tuple], new: dict[str, tuple]) -> str | None:
    """'path: saved (32, 96) vs now (64, 192)' for the first leaf whose shape or dtype (or
    presence) differs between two `_leaf_specs`; None if they agree."""

    def show(spec: tuple | None, other: tuple | None) -> str:
        if spec is None:
            return "absent"
        return f"{spec[1]} {spec[0]}" if other and spec[0] == other[0] else str(spec[0])

    for path in [*new, *(p for p in old if p not in new)]:
        if old.get(path) != new.get(path):
            a, b = old.get(path), new.get(path)
            return f"{path}: saved {show(a, b)} vs now {show(b, a)}"
    return None


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`, one sub-directory per step.

    `read_only` (for evaluation) never writes: no directory is created, and an unreadable
    checkpoint is skipped but left where it is."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.unreadable_directory = self.directory.with_name(self.directory.name + "_unreadable")
        self.read_only = read_only
        _silence_orbax_debris()
        if not read_only:  # found now, not at the first save after a stretch of training
            ensure_writable(self.directory, "checkpoint directory", CheckpointError)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=not read_only,
                    read_only=read_only,
                    # Left behind by a crash mid-save.
                    cleanup_tmp_directories=not read_only,
                    enable_async_checkpointing=False,
                ),
                # Declared so that `item_metadata` can read a checkpoint before restoring.
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "loop": ocp.JsonCheckpointHandler(),
                    "checksums": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as error:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not writable: {_reason(error)}"
            ) from error

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, loop_state: dict[str, Any]) -> None:
        """Blocks until the checkpoint is complete on disk. On failure (e.g. a full disk)
        removes the partial save and raises a one-line CheckpointError.

        A checkpoint of `step` that exists already (a resumed run's restored step, once the
        work it owed is done) is replaced: moved to `<step>.replaced` first, deleted once
        the new one is complete, and put back if the save fails (or, after a crash, when
        the checkpoints are next read)."""
        replaced = self.directory / f"{step}{_REPLACED}" if step in self.steps() else None
        try:
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
                os.replace(self.directory / str(step), replaced)
                self._manager.reload()
            stored = _to_disk(state)
            marked = {**loop_state, _CHECKSUMMED: True}
            checksums = _checksums(stored, marked)
            items = {
                "state": ocp.args.StandardSave(stored),
                "loop": ocp.args.JsonSave(loop_state if checksums is None else marked),
            }
            if checksums is not None:
                items["checksums"] = ocp.args.JsonSave(checksums)
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._manager.wait_until_finished()
        except Exception as error:  # orbax wraps OS errors in several types
            self._remove_partial(step)
            self._put_back_replaced()
            # A step saved again (a resumed run) was put back: it counts as kept.
            kept = (
                "the previous checkpoints are intact" if self.steps() else "there is no earlier one"
            )
            raise CheckpointError(
                f"could not save checkpoint {step} in {self.directory}: {_reason(error)} ({kept})"
            ) from error
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)

    def _put_back_replaced(self) -> None:
        """Puts back each checkpoint moved aside to be replaced whose replacement is not
        complete (a failed save, or a crash during it); drops it where it is."""
        for aside in self.directory.glob(f"*{_REPLACED}"):
            target = self.directory / aside.name.removesuffix(_REPLACED)
            if target.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(aside, target)
        self._manager.reload()

    def _remove_partial(self, step: int) -> None:
        """Removes the temporary directory of a failed save of `step`: it holds disk space and
        would block a later save of this step. orbax's writer threads can still add files to
        it for a moment after the failure, so this waits for them and retries."""
        # It raises the failure again, which the caller is already reporting.
        with contextlib.suppress(Exception):
            self._manager.wait_until_finished()
        for _ in range(50):
            partials = list(self.directory.glob(f"{step}{_TMP_MARK}*"))
            if not partials:
                return
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            time.sleep(0.1)

    def restore_latest(
        self, template: TrainState, loop_keys: Collection[str] = ()
    ) -> tuple[int, TrainState, dict] | None:
        """The newest checkpoint that restores, as `(step, state, loop_state)`; None if there
        is none. Unreadable ones (that includes a loop state without all of `loop_keys`, and a
        file where a step's directory belongs) are skipped with a warning and moved aside (see
        the module docstring). Raises CheckpointError if a checkpoint's shapes or dtypes differ
        from `template`'s: a config change that alters the networks cannot restore it."""
        if self.directory.is_dir():
            if not self.read_only:
                self._put_back_replaced()
            for entry in sorted(self.directory.iterdir()):
                if entry.name.isdigit() and not entry.is_dir():
                    self._set_aside(int(entry.name), NotADirectoryError("a file, not a directory"))
        self._manager.reload()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_disk(template))
        for step in reversed(self.steps()):
            try:
                metadata = self._manager.item_metadata(step)["state"]
                if metadata is None:
                    raise ValueError("no state metadata")
                saved = _leaf_specs(metadata)
            except Exception as error:
                self._set_aside_unless_out_of_memory(step, error)
                continue
            mismatch = _first_mismatch(saved, _leaf_specs(abstract))
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} was saved with other network "
                    f"sizes than this config ({mismatch}); a config change that alters "
                    "shapes cannot restore it"
                )
            items = {"state": ocp.args.StandardRestore(abstract), "loop": ocp.args.JsonRestore()}
            has_checksums = (self.directory / str(step) / "checksums").is_dir()
            if has_checksums:
                items["checksums"] = ocp.args.JsonRestore()
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
                loop_state = restored["loop"]
                missing = sorted(set(loop_keys) - set(loop_state))
                if missing:
                    raise ValueError(f"its loop state lacks {', '.join(missing)}")
                # Checkpoints from before checksums were saved restore unchecked.
                if loop_state.get(_CHECKSUMMED) and not has_checksums:
                    raise ValueError("its saved checksums are missing")
                if has_checksums:
                    now = _checksums(restored["state"], loop_state)
                    damaged = _checksum_mismatch(restored["checksums"], now)
                    if damaged:
                        raise ValueError(damaged)
            except Exception as error:
                self._set_aside_unless_out_of_memory(step, error)
                continue
            loop_state = {k: v for k, v in loop_state.items() if k != _CHECKSUMMED}
            return step, _from_disk(restored["state"]), loop_state
        return None

    def _set_aside_unless_out_of_memory(self, step: int, error: Exception) -> None:
        """`_set_aside`, except for a failed allocation: the machine's fault, not the
        checkpoint's (a resume on a smaller accelerator), raised as a CheckpointError."""
        asked = out_of_memory(error)
        if asked is not None:
            raise CheckpointError(
                f"out of memory restoring checkpoint {self.directory / str(step)} (an "
                f"allocation of {asked} failed); it is kept: restore it on a machine with "
                "more memory"
            ) from error
        self._set_aside(step, error)

    def _set_aside(self, step: int, error: Exception) -> None:
        """Warns that checkpoint `step` is unreadable and, unless read-only, moves it out of
        orbax's directory so that the run can save this step again."""
        source = self.directory / str(step)
        if self.read_only:
            warnings.warn(
                f"checkpoint {source} is unreadable ({_reason(error)}); trying the previous one",
                stacklevel=3,
            )
            return
        target = self.unreadable_directory / str(step)
        suffix = 0
        while target.exists():
            suffix += 1
            target = self.unreadable_directory / f"{step}-{suffix}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        except OSError as move_error:
            raise CheckpointError(
                f"checkpoint {source} is unreadable ({_reason(error)}) and could not be moved "
                f"to {target}: {_reason(move_error)}"
            ) from move_error
        self._manager.reload()
        warnings.warn(
            f"checkpoint {source} is unreadable ({_reason(error)}); moved it to {target} and "
            "trying the previous one",
            stacklevel=3,
        )

    def close(self) -> None:
        self._manager.close()
