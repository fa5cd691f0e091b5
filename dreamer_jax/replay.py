"""Episodic replay on the host (numpy), as in the official DreamerV2 `common/replay.py`.

    replay = Replay("logdir/train_eps", env.step_spec, capacity=2_000_000, minlen=50,
                    length=50, batch=16, prioritize_ends=True, seed=0)
    finished = replay.add(step_batch)   # each value [N, ...], one call per env step
    batch = next(replay.dataset())      # each value [16, 50, ...]
    report = replay.sample(report_rng)  # the same, from the caller's own Generator

A step is a dict of arrays (`image` uint8 [64, 64, 1] or `vector` float32 [D], `action` [A],
`reward` float32 [], `is_first`, `is_last`, `is_terminal` bool []). The replay's `spec` (the
env's `step_spec`) fixes every key's per-step shape and dtype: episodes that differ are
refused by `add_episode` and skipped by `load`. Arrays are never copied again once an
episode is finished.

Episodes are stored in memory, for sampling, only if their length is at least
`max(minlen, length)`; shorter ones are still written to disk (and returned by `add`) but
never stored, so they do not count toward `capacity` or `stats`.

Sampling is the paper's: an episode uniformly, then a chunk start uniformly within it (plus
the end bonus of `prioritize_ends`), from finished episodes only. `ongoing=True` (not in the
paper; off by default) also draws from each env's episode in progress once it is
`max(minlen, length)` steps long (dreamerv3's replay samples unfinished episodes too), so
with many envs the newest data is sampled before its episode ends. An ongoing episode of `L`
steps is drawn with weight `min(1, L / mean stored length)` against 1 for a finished one, so
its steps are sampled at most at the rate of an average stored episode's steps, and gets no
end bonus (its last step is not an episode end). Ongoing episodes are not saved and do not
count toward `capacity` until they finish.

Every finished episode is written to `<directory>/{index:08d}-{length}.npz` (compressed),
where `index` continues from the largest index already in the directory, so lexicographic
order is chronological order across restarts. Files are written to a hidden temp name and
renamed atomically, in order, by a worker thread: compressing and syncing a long episode
takes tens of milliseconds that the acting loop does not wait for. `flush()` waits until
every finished episode's file is on disk (a checkpoint calls it first); a write that failed
is raised by the next `add`, `add_episode` or `flush`, and by every `flush` after it, and the
episodes queued after it are not written (the files stay an unbroken run of indices). The
replay never deletes or modifies a file it did not just write, so two replays must not share
a directory. `set_aside_after` moves (never deletes) the files of episodes that finished
after a checkpoint, for a run resumed from it.
"""

from __future__ import annotations

import collections
import copy
import os
import pathlib
import re
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dreamer_jax.paths import DirectoryError, ensure_writable, naming

REQUIRED_KEYS = ("action", "reward", "is_first", "is_last", "is_terminal")
# Per-step shape and dtype of each key of a step, e.g. {"reward": ((), np.float32), ...}.
StepSpec = dict[str, tuple[tuple[int, ...], np.dtype]]
# Final names and the temp names of interrupted writes; both count for the next index.
_FILENAME = re.compile(r"^\.?(\d+)-(\d+)\.npz(\.tmp)?$")


def bytes_per_step(spec: StepSpec) -> int:
    """Memory one stored step takes (Atari: 4121 bytes)."""
    return sum(
        int(np.prod(shape, dtype=int)) * np.dtype(dtype).itemsize for shape, dtype in spec.values()
    )


def set_aside_after(
    directory: pathlib.Path, next_index: int, aside: pathlib.Path
) -> tuple[int, pathlib.Path | None]:
    """Moves the episode files (and unfinished saves) of `directory` numbered `next_index` or
    above (the episodes that finished after a checkpoint taken when `next_index` was the
    replay's next index) into a new folder `aside` (`aside.1`, `aside.2`, ... if it exists).
    Returns how many it moved and the folder they went to (None when there were none)."""
    # A save's temp file too (`.<index>-<length>.npz.tmp`, left by a kill during the save):
    # kept, its index would move the resumed run's file numbers on from the checkpoint's.
    names = [
        path.name
        for path in (directory.iterdir() if directory.is_dir() else [])
        if (match := _FILENAME.match(path.name)) and int(match.group(1)) >= next_index
    ]
    if not names:
        return 0, None
    folder, tries = aside, 0
    while folder.exists():
        tries += 1
        folder = aside.with_name(f"{aside.name}.{tries}")
    folder.mkdir(parents=True)
    for name in sorted(names):
        os.replace(directory / name, folder / name)
    return len(names), folder


class ReplayDirectoryError(DirectoryError):
    """The replay directory cannot be created or written. The message is one line."""


class Replay:
    """Finished episodes in memory, uniform episode sampling, fixed-length chunks.

    Args:
      directory: where episodes are saved and loaded from; None keeps everything in memory.
      spec: per-step shape and dtype of every key of a step (the env's `step_spec`); must
        hold `REQUIRED_KEYS`.
      capacity: the most steps stored; the oldest episodes are dropped first, but the newest
        one is kept even if it alone is longer.
      minlen: episodes shorter than this are not sampled; also the end bonus of
        `prioritize_ends`.
      length: chunk length T of a sample.
      batch: chunks per sample B.
      prioritize_ends: over-sample chunks that end an episode (official default on Atari).
      ongoing: also sample chunks of the episodes in progress (see the module docstring).
      seed: seeds the numpy Generator that `dataset()` draws from.
      prefetch: batches the `dataset()` thread keeps ready.
    """

    def __init__(
        self,
        directory: str | pathlib.Path | None,
        spec: StepSpec,
        capacity: int,
        minlen: int,
        length: int,
        batch: int,
        prioritize_ends: bool,
        seed: int,
        prefetch: int = 4,
        ongoing: bool = False,
    ):
        if min(capacity, minlen, length, batch, prefetch) < 1:
            raise ValueError("replay capacity, minlen, length, batch and prefetch must be >= 1")
        missing = [key for key in REQUIRED_KEYS if key not in spec]
        if missing:
            raise ValueError(f"replay spec lacks keys {missing}")
        self._spec = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in spec.items()}
        self._directory = None if directory is None else pathlib.Path(directory)
        self._capacity = int(capacity)
        self._minlen = int(minlen)
        self._length = int(length)
        self._batch = int(batch)
        self._prioritize_ends = bool(prioritize_ends)
        self._sample_ongoing = bool(ongoing)
        self._prefetch = int(prefetch)
        self._rng = np.random.default_rng(seed)

        # Guarded by `_lock`: the stored episodes (oldest first) and their lengths.
        self._lock = threading.Lock()
        self._episodes: list[dict[str, np.ndarray]] = []
        self._lengths: list[int] = []
        self._num_steps = 0
        self._bytes = 0

        self._ongoing: list[list[dict[str, np.ndarray]]] | None = None  # per env, its steps
        self._next_index = 0
        self._loaded = 0
        self._skipped_files = 0

        self._executor: ThreadPoolExecutor | None = None
        # The episode files being written, oldest first, and the first write that failed.
        self._writer: ThreadPoolExecutor | None = None
        self._writes: collections.deque = collections.deque()
        self._write_error: BaseException | None = None
        self._write_failed = threading.Event()  # set by the writer: it skips the rest
        # Batches drawn by `dataset()` but not yet returned: (copy in progress, Generator
        # state before the draw), oldest first.
        self._pending: collections.deque = collections.deque()

        if self._directory is not None:
            ensure_writable(self._directory, "replay directory", ReplayDirectoryError)
            self.load()

    # ----------------------------------------------------------------------------- adding

    def add(self, step_batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Appends one step per env; returns the episodes this step finished.

        Args:
          step_batch: each value [N, ...] for N envs; env i's steps form its own episode,
            which finishes at its step with `is_last[i]`.
        Returns:
          The finished episodes, each value [L, ...] (read-only, shared with storage).
        """
        self._check_writes()  # a failed episode file stops the run at the next step
        num_envs = len(step_batch["is_last"])
        if self._ongoing is None:
            self._ongoing = [[] for _ in range(num_envs)]
        if len(self._ongoing) != num_envs:
            raise ValueError(f"add() got {num_envs} envs, earlier calls had {len(self._ongoing)}")
        finished = []
        for i, steps in enumerate(self._ongoing):
            # Copy: the collector may reuse its step buffers.
            steps.append({key: np.array(value[i]) for key, value in step_batch.items()})
            if step_batch["is_last"][i]:
                episode = {key: np.stack([step[key] for step in steps]) for key in steps[0]}
                steps.clear()
                self.add_episode(episode)
                finished.append(episode)
        return finished

    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        """Saves a finished episode, stores it if long enough, evicts the oldest beyond capacity.

        Args:
          episode: each value [L, ...]. The replay takes the arrays without copying and marks
            them read-only.
        Raises:
          ValueError: the episode's keys, shapes or dtypes do not match the spec.
        """
        length = _validate(episode, self._spec)
        for value in episode.values():
            value.flags.writeable = False
        if self._directory is not None:
            self._save(episode, length)
        self._store(episode, length)

    def _store(self, episode: dict[str, np.ndarray], length: int) -> None:
        if length < max(self._minlen, self._length):
            return
        with self._lock:
            self._episodes.append(episode)
            self._lengths.append(length)
            self._num_steps += length
            self._bytes += sum(value.nbytes for value in episode.values())
            # The newest episode stays even alone over capacity (as the official replay
            # keeps one): else an episode longer than `capacity` would empty the replay.
            while self._num_steps > self._capacity and len(self._episodes) > 1:
                dropped = self._episodes.pop(0)
                self._num_steps -= self._lengths.pop(0)
                self._bytes -= sum(value.nbytes for value in dropped.values())

    # ------------------------------------------------------------------------------ disk

    def _save(self, episode: dict[str, np.ndarray], length: int) -> None:
        """Queues the episode's file; its name (index) is fixed now, in the caller's order."""
        self._check_writes()
        name = f"{self._next_index:08d}-{length}.npz"
        self._next_index += 1
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="replay-save")
        self._writes.append(self._writer.submit(self._write, episode, name))

    def _check_writes(self, wait: bool = False) -> None:
        """Collects the finished writes (all of them if `wait`); raises the first failure."""
        while self._writes and (wait or self._writes[0].done()):
            error = self._writes.popleft().exception()
            self._write_error = self._write_error or error
        if self._write_error is not None:
            raise self._write_error

    def flush(self) -> None:
        """Waits until every finished episode's file is written. Raises the first write that
        failed (then on every call: the files and the replay no longer agree)."""
        self._check_writes(wait=True)

    def _write(self, episode: dict[str, np.ndarray], name: str) -> None:
        if self._write_failed.is_set():
            # Skipped: the folder stays an unbroken run of indices up to the failed one.
            return
        final = self._directory / name
        temp = self._directory / f".{name}.tmp"
        # Compressed: Atari frames shrink ~10x, which matters over 2e6+ steps on disk.
        try:
            with naming(temp), open(temp, "wb") as f:
                np.savez_compressed(f, **episode)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            self._write_failed.set()
            temp.unlink(missing_ok=True)  # ours, half written (a full disk)
            raise
        os.replace(temp, final)

    def load(self) -> None:
        """Loads the newest episode files that fit into capacity, and sets the next index.

        Called once by `__init__` when a directory is given.

        Files are read newest first (by name) until the next one would exceed capacity,
        then stored oldest first: the same result as loading every file in order and
        evicting, without reading files that would be evicted. Unreadable files (truncated,
        corrupt) and files whose keys, shapes or dtypes do not match the spec (another task's,
        an older format's) are skipped with one warning each and left untouched.
        """
        if self._directory is None:
            return
        paths = sorted(p for p in self._directory.iterdir() if _FILENAME.match(p.name))
        indices = [int(_FILENAME.match(p.name).group(1)) for p in paths]
        self._next_index = max([self._next_index - 1, *indices]) + 1
        episodes = []
        budget = self._capacity - self._num_steps
        for path in reversed([p for p in paths if not p.name.startswith(".")]):
            try:
                # Our own handle: np.load leaks its own when the zip is corrupt.
                with open(path, "rb") as f:
                    # Else np.load takes any other bytes for a pickle and says how to load it.
                    if f.read(4) != b"PK\x03\x04":
                        raise ValueError("not an .npz (zip) archive")
                    f.seek(0)
                    with np.load(f, allow_pickle=False) as data:
                        episode = {key: data[key] for key in data.files}
                length = _validate(episode, self._spec)
            except MemoryError:  # the machine, not the file: train reports it
                raise
            except Exception as error:  # whatever np.load raises: skip the file, never fatal
                reason = " ".join(str(error).split()) or type(error).__name__
                message = f"replay: skipping episode file {path}: {reason}"
                warnings.warn(message, stacklevel=2)
                self._skipped_files += 1
                continue
            if length < max(self._minlen, self._length):
                continue
            if length > budget and episodes:  # the newest one is loaded whatever its length
                break
            budget -= length
            episodes.append(episode)
        for episode in reversed(episodes):
            for value in episode.values():
                value.flags.writeable = False
            self._store(episode, len(episode["is_first"]))
        self._loaded += len(episodes)

    # -------------------------------------------------------------------------- sampling

    def sample(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One batch of chunks, each value [batch, length, ...]; `is_first[:, 0]` is True.

        Draws from the caller's `rng`, never from the `dataset()` Generator, so a report
        sampled mid-training leaves the training batches and `get_rng_state` unchanged.

        Raises:
          RuntimeError: no episode is stored yet.
        """
        with self._lock:
            episodes, starts = self._draw(rng)
        return self._gather(episodes, starts)

    def _draw(self, rng: np.random.Generator) -> tuple[list[Any], np.ndarray]:
        """Chooses episodes and start indices; call with `_lock` held. Returns per chunk its
        finished episode (dict of arrays) or its ongoing episode's steps (list of step dicts),
        and its start."""
        ongoing = self._sampleable_ongoing()
        if not self._episodes and not ongoing:
            need = max(self._minlen, self._length)
            raise RuntimeError(f"replay has no episode of length >= {need} yet")
        if not self._sample_ongoing:
            index = rng.integers(0, len(self._episodes), size=self._batch)
        else:
            # Ongoing episodes weigh min(1, L / mean stored length): their steps are drawn at
            # most as often as an average stored episode's (1 each before any is stored).
            mean = self._num_steps / len(self._episodes) if self._episodes else 1.0
            weights = [1.0] * len(self._episodes) + [min(1.0, len(s) / mean) for s in ongoing]
            weights = np.asarray(weights)
            index = rng.choice(len(weights), size=self._batch, p=weights / weights.sum())
        pool = self._episodes + ongoing
        totals = np.asarray(self._lengths + [len(steps) for steps in ongoing])[index]
        upper = totals - self._length + 1
        if self._prioritize_ends:
            upper += np.where(index < len(self._episodes), self._minlen, 0)
        starts = np.minimum(rng.integers(0, upper), totals - self._length)
        # Slicing an ongoing episode's steps now keeps the chunk whatever the env adds or
        # clears before the prefetch thread copies it.
        chunks = [
            pool[i] if i < len(self._episodes) else pool[i][start : start + self._length]
            for i, start in zip(index, starts, strict=True)
        ]
        return chunks, np.where(index < len(self._episodes), starts, 0)

    def _sampleable_ongoing(self) -> list[list[dict[str, np.ndarray]]]:
        """With `ongoing`, the steps of each env's episode in progress that is long enough to
        be sampled (as a finished one would have to be); call with `_lock` held."""
        if not self._sample_ongoing or self._ongoing is None:
            return []
        need = max(self._minlen, self._length)
        return [steps for steps in self._ongoing if len(steps) >= need]

    def _gather(self, episodes: list[Any], starts: np.ndarray) -> dict[str, np.ndarray]:
        """Copies the chunks; safe without the lock since stored arrays are read-only and an
        ongoing chunk's steps are never written again."""
        batch = {}
        for key, (shape, dtype) in self._spec.items():
            out = np.empty((self._batch, self._length, *shape), dtype)
            for b, (episode, start) in enumerate(zip(episodes, starts, strict=True)):
                if isinstance(episode, list):  # an ongoing episode's steps, already sliced
                    out[b] = np.stack([step[key] for step in episode])
                else:
                    out[b] = episode[key][start : start + self._length]
            batch[key] = out
        batch["is_first"][:, 0] = True
        return batch

    def dataset(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches whose copying is done ahead on a worker thread, deterministically.

        Each `next()` draws the episodes and start indices of one new batch in the caller's
        thread, so a draw sees exactly the episodes added before that call and never depends
        on thread timing (same seed and same calls, same batches). The copying of the chunks
        runs on a worker; `next()` returns the batch drawn `prefetch` calls earlier, which is
        normally ready. Raises RuntimeError if no episode is stored yet. The iterator ends
        after `close()`.
        """
        if self._executor is not None:
            raise RuntimeError("replay.dataset() is already running; call close() first")
        executor = ThreadPoolExecutor(1, thread_name_prefix="replay-prefetch")
        self._executor = executor
        return self._batches(executor)

    def _batches(self, executor: ThreadPoolExecutor) -> Iterator[dict[str, np.ndarray]]:
        while self._executor is executor:
            while len(self._pending) <= self._prefetch:
                with self._lock:
                    state = copy.deepcopy(self._rng.bit_generator.state)
                    episodes, starts = self._draw(self._rng)
                self._pending.append((executor.submit(self._gather, episodes, starts), state))
            future, _ = self._pending.popleft()
            yield future.result()

    def upcoming(self) -> dict[str, np.ndarray]:
        """The batch the `dataset()` iterator returns next, once its copy is done (blocks
        until then), for a caller that prepares it ahead. The iterator still returns it, and
        until then it counts as not returned (`get_rng_state`, `close`).

        Raises:
          RuntimeError: `dataset()` has not returned a batch yet (none is drawn ahead).
        """
        if not self._pending:
            raise RuntimeError("replay.upcoming() before the dataset() returned a batch")
        return self._pending[0][0].result()

    def close(self) -> None:
        """Waits for the episode files being written (a failed write is not raised here:
        `flush` raises it) and stops the `dataset()` worker. The Generator rewinds to its
        state before the oldest batch drawn but not yet returned, so a resume redraws exactly
        those."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._executor is None:
            return
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None
        with self._lock:
            if self._pending:
                self._rng.bit_generator.state = self._pending[0][1]
            self._pending.clear()

    # ------------------------------------------------------------------------ state, stats

    def get_rng_state(self) -> dict[str, Any]:
        """The `dataset()` Generator's `bit_generator.state` (JSON-serialisable).

        While `dataset()` runs, this is the state after the last batch the learner consumed.
        """
        with self._lock:
            if self._pending:
                return copy.deepcopy(self._pending[0][1])
            return copy.deepcopy(self._rng.bit_generator.state)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        """Restores a state from `get_rng_state`; call it before `dataset()`."""
        if self._executor is not None:
            raise RuntimeError("set_rng_state() while dataset() runs; call close() first")
        with self._lock:
            self._rng.bit_generator.state = copy.deepcopy(state)

    @property
    def ready(self) -> bool:
        """Whether a chunk can be drawn: an episode is stored, or (with `ongoing`) an env's
        episode in progress is long enough."""
        with self._lock:
            return bool(self._episodes or self._sampleable_ongoing())

    @property
    def episodes(self) -> list[dict[str, np.ndarray]]:
        """The stored episodes, oldest first (read-only arrays, shared with storage)."""
        with self._lock:
            return list(self._episodes)

    @property
    def next_index(self) -> int:
        """The index the next episode file this replay saves gets."""
        return self._next_index

    @property
    def stats(self) -> dict[str, int]:
        """num_episodes and num_steps stored, bytes of their arrays, episodes loaded from
        disk, and files skipped as unreadable or not matching the spec."""
        with self._lock:
            return {
                "num_episodes": len(self._episodes),
                "num_steps": self._num_steps,
                "bytes": self._bytes,
                "loaded": self._loaded,
                "skipped_files": self._skipped_files,
            }


def _validate(episode: dict[str, np.ndarray], spec: StepSpec) -> int:
    """The episode's length L; raises ValueError (one line) unless the episode has exactly
    the spec's keys and every value is a numpy array [L, *shape] of the spec's dtype, with
    one shared L >= 1."""
    if set(episode) != set(spec):
        raise ValueError(f"episode keys {sorted(episode)} != spec keys {sorted(spec)}")
    if not all(isinstance(value, np.ndarray) and value.ndim for value in episode.values()):
        raise ValueError("episode values must be numpy arrays [L, ...]")
    wrong = [
        f"{key} {value.dtype}{list(value.shape[1:])} instead of {spec[key][1]}{list(spec[key][0])}"
        for key, value in episode.items()
        if (value.shape[1:], value.dtype) != spec[key]
    ]
    if wrong:
        raise ValueError(f"episode steps do not match the spec: {', '.join(wrong)}")
    lengths = {key: len(value) for key, value in episode.items()}
    if len(set(lengths.values())) != 1 or lengths["is_first"] == 0:
        raise ValueError(f"episode values need one shared length >= 1, got {lengths}")
    return lengths["is_first"]
