"""The run state on disk: orbax checkpoints of `TrainState` plus a JSON of loop state.

    checkpointer = Checkpointer(logdir / "checkpoints", keep=3)
    checkpointer.save(step, train_state, loop_state)
    restored = checkpointer.restore_latest(template_state)   # None on a fresh run

orbax writes each checkpoint to a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that is taken for good. A checkpoint that fails to
restore is reported and skipped in favour of the one before it; nothing is deleted except by
orbax's keep-the-last-k policy after a successful save.
"""

from __future__ import annotations

import logging
import pathlib
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from dreamer_jax.agent import TrainState

# orbax logs every save at INFO; the run's own output says what matters.
logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointError(OSError):
    """Saving failed (disk full, unwritable directory); the previous checkpoint is intact."""


def _to_disk(state: TrainState) -> TrainState:
    """Typed PRNG keys are stored as their raw uint32 data."""
    return state.replace(key=jax.random.key_data(state.key))


def _from_disk(state: TrainState) -> TrainState:
    return state.replace(key=jax.random.wrap_key_data(state.key))


class Checkpointer:
    """Keeps the last `keep` checkpoints under `directory`, one sub-directory per step."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 3, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep,
                    create=not read_only,
                    read_only=read_only,
                    enable_async_checkpointing=False,
                ),
            )
        except OSError as error:
            raise CheckpointError(
                f"checkpoint directory {self.directory} is not writable: {error}"
            ) from error

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: TrainState, loop_state: dict[str, Any]) -> None:
        """Blocks until the checkpoint is complete on disk."""
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_disk(state)),
                    loop=ocp.args.JsonSave(loop_state),
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as error:  # orbax wraps OS errors in several types
            raise CheckpointError(
                f"could not save checkpoint {step} in {self.directory}: {error}"
            ) from error

    def restore_latest(self, template: TrainState) -> tuple[int, TrainState, dict] | None:
        """The newest checkpoint that restores, as `(step, state, loop_state)`; None if there
        is none. Unreadable ones are skipped with a warning (and left on disk)."""
        self._manager.reload()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_disk(template))
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()
                    ),
                )
            except Exception as error:
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is unreadable ({reason}); "
                    "trying the previous one",
                    stacklevel=2,
                )
                continue
            return step, _from_disk(restored["state"]), restored["loop"]
        return None

    def close(self) -> None:
        self._manager.close()
