"""The training run: collect with N envpool envs, replay, `train_steps` jitted updates every
`train_every` policy steps, evaluate, log, checkpoint, resume.

    python -m dreamer_jax.train --configs atari --task atari_pong --logdir runs/atari_pong/0
    python -m dreamer_jax.train --configs classic --task classic_cartpole --logdir runs/cartpole/0
    python -m dreamer_jax.train --configs atari --task atari_boxing --logdir runs/box --num_seeds 8

`--num_seeds N` trains seeds seed..seed+N-1 as one program (`dreamer_jax.seeds`): each seed
is the single run `--seed s` and logs to `<logdir>/seed_<s>/`; one checkpoint holds them all.
The loop is one piece per concern, each with its own schedule and its part of the
checkpoint: `Acting` (envs, policy, replay writes), `Learning` (the train states, updates
owed and paid), `Evaluating`, `Logging` and `Checkpointing` (which saves them all).

Tasks: atari_<game> (the paper's 55 games, e.g. atari_ms_pacman), classic_cartpole,
classic_acrobot, dmc_<domain>_<task> (e.g. dmc_walker_walk).

Counts are policy steps summed over the parallel envs (as the official code);
frames = steps × action repeat. Running the same command again with an existing logdir
resumes from the latest good checkpoint and the replay on disk. Bad input (unknown task or
key, bad value, unwritable or busy logdir, a changed config on resume, a corrupt
config.yaml, a batch too large for memory) exits with code 2 and one line on stderr, and
every input is checked before anything is written.
"""

from __future__ import annotations

if __name__ == "__main__":  # a program: set up XLA:CPU's speed before jax is imported
    from dreamer_jax.startup import prepare, quit_on_signals

    quit_on_signals()
    prepare()

import contextlib
import operator
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from dreamer_jax.agent import Agent, TrainState
from dreamer_jax.api import make_agent
from dreamer_jax.checkpoint import Checkpointer, CheckpointError
from dreamer_jax.config import (
    Config,
    ConfigError,
    changed_keys,
    load_run_config,
    parse_cli,
    program_name,
    warn_in_one_line,
)
from dreamer_jax.envs import UnknownTaskError, VectorEnv
from dreamer_jax.eval import evaluate
from dreamer_jax.logger import (
    METRICS_FILE,
    LogdirError,
    Logger,
    WandbError,
    check_wandb_key,
    read_metrics,
    seeds_line,
)
from dreamer_jax.paths import (
    DirectoryError,
    StorageError,
    ensure_writable,
    lock_directory,
    out_of_memory,
)
from dreamer_jax.provenance import last_command, provenance, record_start
from dreamer_jax.replay import Replay, bytes_per_step, set_aside_after
from dreamer_jax.report import open_loop_video
from dreamer_jax.seeds import (
    TRAIN_EVAL_SEED_OFFSET,
    enclosing_run,
    host_rng_state,
    init_keys,
    policy_inputs,
    run_seeds,
    seed_config,
    seed_keys,
    seed_logdir,
    seed_sharding,
    seeds_text,
)
from dreamer_jax.startup import quiet_on_broken_pipe

OPENL_SEQUENCES = 6
# Train metrics that count since the run began: a row logs their latest value, not a mean.
RUNNING_COUNTS = ("nonfinite_streak", "nonfinite_total")


class RunError(Exception):
    """A problem with the run's inputs, reported as one line with exit code 2."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates of every seed; the last good checkpoint is
    kept."""


def make_env(config: Config, num_envs: int, seeds: list[int]) -> VectorEnv:
    """One pool of `num_envs` envs per seed in `seeds`, group g seeded `seeds[g]`."""
    return VectorEnv(
        config.task, num_envs * len(seeds), seeds, config.time_limit, config.action_repeat
    )


def env_seed(seed: int, step: int, resumed: bool, offset: int = 0) -> int:
    """A fresh run seeds its envs with its seed; a resumed run reseeds from (seed, step), so
    it does not replay the episodes the run began with, and two resumes from one checkpoint
    agree."""
    if not resumed:
        return seed + offset
    return int(np.random.SeedSequence([seed, step, offset]).generate_state(1)[0])


def replay_record(obs: dict[str, np.ndarray], prev_action: np.ndarray, spec: dict) -> dict:
    """The replay record of the current observation: `action` is what led to it (zeros on
    the first step of an episode), in the replay's dtype (uint8 one-hot when discrete)."""
    action = np.where(obs["is_first"][:, None], 0.0, prev_action)
    return {**obs, "action": action.astype(spec["action"][1])}


def open_loop_frames(
    agent: Agent, states: TrainState, batches: list[dict], keys: jax.Array, sharding
) -> list[np.ndarray]:
    """The open-loop video of each seed (true frames, the model's, their difference), for up
    to `OPENL_SEQUENCES` chunks of its sampled batch (one batch per seed), as uint8 frames
    `[T, 3H, n·W, C]`."""
    batch = {k: np.stack([b[k][:OPENL_SEQUENCES] for b in batches]) for k in batches[0]}
    truth, prediction = jax.device_get(
        agent.open_loop_seeds(states.wm_params, jax.device_put(batch, sharding), keys)
    )
    return [open_loop_video(*seed) for seed in zip(truth, prediction, strict=True)]


def _key_data(key: jax.Array) -> list:
    """A key (or keys `[N]`) as JSON-able integers."""
    return np.asarray(jax.random.key_data(key)).tolist()


def _wrap_key(data: list) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def _generator(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def out_of_memory_message(config: Config, error: BaseException, asked: str) -> str:
    """The one line an out-of-memory error ends the run with: the sizes that set the memory
    that ran out and how to lower them. XLA's allocations are the update's (its batch); the
    host's (numpy's MemoryError) may also be the replays growing."""
    several = config.num_seeds > 1
    seeds = f" and num_seeds {config.num_seeds}" if several else ""
    fewer = " or fewer --num_seeds" if several else ""
    host = isinstance(error, MemoryError)
    capacity = f" and replay.capacity {config.replay.capacity}" if host else ""
    smaller = "--dataset.batch or --replay.capacity" if host else "--dataset.batch"
    return (
        f"out of memory with dataset.batch {config.dataset.batch}{capacity}{seeds} (an "
        f"allocation of {asked} failed); use a smaller {smaller}{fewer}"
    )


def _restorable(state: TrainState) -> bool:
    """Whether `state` can still be saved: no buffer donated to a failed update, and every
    float finite."""
    leaves = jax.tree.leaves(state)
    if any(leaf.is_deleted() for leaf in leaves if isinstance(leaf, jax.Array)):
        return False
    floats = [x for x in leaves if jax.dtypes.issubdtype(x.dtype, np.floating)]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in floats)


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can checkpoint and exit.

    The first signal is acknowledged at once, even while XLA compiles: Python runs signal
    handlers only between bytecodes, so a watcher thread reads the signal wake-up fd
    instead. A second signal quits at once (exit 128 + signum), keeping the last checkpoint.
    Signals within `REPEAT_SECONDS` of the first are one request: `timeout` and some job
    schedulers signal both the process and its process group, and that must not skip the
    final checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 1.0

    def __init__(self):
        self.signum: int | None = None

    def __enter__(self):
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            # The watcher acts; the handler only keeps Python from raising KeyboardInterrupt.
            signal.signal(signum, lambda *_: None)
        self._watcher = threading.Thread(target=self._watch, name="stop-signal", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while data := self._reader.recv(64):
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                if self.signum is None:
                    self.signum, self._first = signum, time.monotonic()
                    again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
                    print(
                        f"\nsignal {signum}: stopping after this step (checkpoint, then exit); "
                        f"{again} again to quit now",
                        file=sys.stderr,
                        flush=True,
                    )
                elif time.monotonic() - self._first > self.REPEAT_SECONDS:
                    print("second signal: quitting now; the last checkpoint is kept",
                          file=sys.stderr, flush=True)  # fmt: skip
                    os._exit(128 + signum)

    def __exit__(self, *exc):
        for signum in self.SIGNALS:
            signal.signal(signum, _quit_after_the_run)
        signal.set_wakeup_fd(self._previous_fd)
        self._writer.close()  # the watcher's recv() returns b"" and it ends
        self._watcher.join(timeout=5)
        self._reader.close()


def _quit_after_the_run(signum: int, frame: object) -> None:
    """A signal once the run has ended (its last lines, the exit) quits at once: what the
    run writes is written by then."""
    print(f"\nsignal {signum}: quitting; the run had already ended", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def replay_memory_warning(config: Config, spec: dict, memory_bytes: int) -> str | None:
    """A warning when the replays of all seeds, once full (`replay.capacity` steps, or the
    whole run if shorter), would need more than 80 % of the machine's `memory_bytes`."""
    steps = min(config.replay.capacity, config.steps)
    need = config.num_seeds * steps * bytes_per_step(spec)
    if need <= 0.8 * memory_bytes:
        return None
    return (
        f"warning: the replay of {config.num_seeds} seed(s) grows to {need / 2**30:.1f} GiB "
        f"({steps} steps each) on a machine with {memory_bytes / 2**30:.1f} GiB; lower "
        "--replay.capacity or --num_seeds, or the run will run out of memory later"
    )


def atari_protocol_warning(config: Config) -> str | None:
    """A warning for an Atari task run without the Atari preset's frame skip: a preset left
    out trains, evaluates and counts frames at one frame per step, silently."""
    if not config.task.startswith("atari_") or config.action_repeat == 4:
        return None
    return (
        f"warning: {config.task} runs with action_repeat {config.action_repeat}, not the "
        "Atari protocol's 4 (frames = steps x action_repeat): did you leave out --configs atari?"
    )


def prefill_warning(config: Config) -> str | None:
    """A warning when the run's last step (the first multiple of `envs` at or past `steps`)
    comes before the prefill ends: it would train nothing."""
    last_step = -(-config.steps // config.envs) * config.envs
    if last_step >= config.prefill:
        return None
    return (
        f"warning: --steps {config.steps} ends within the prefill ({config.prefill} "
        "random-policy steps): the run collects data and trains no update"
    )


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_inputs(config: Config, logdir: pathlib.Path) -> Agent:
    """Every check that needs no write: the saved config (if any) matches, the task exists.
    Returns the agent of this config."""
    run = enclosing_run(logdir)
    if run is not None:
        raise RunError(
            f"{logdir} is a seed folder of the {run[1].num_seeds}-seed run in {run[0]}: resume "
            f"that run (--logdir {run[0]}), or evaluate this seed (dreamer-eval --logdir {logdir})"
        )
    for parent in pathlib.Path(os.path.abspath(logdir)).parents:
        if (parent / "config.yaml").is_file() and (parent / "checkpoints").is_dir():
            # Its files would mix with that run's (an analysis would then find two runs).
            raise RunError(f"{logdir} is inside the run in {parent}: train in a folder outside it")
    config_path = logdir / "config.yaml"
    checkpoints = logdir / "checkpoints"
    # A run saves its configs (each seed folder's too) before its first checkpoint.
    saved_run = checkpoints.is_dir() and any(checkpoints.iterdir())
    if saved_run and not config_path.exists():
        # Neither the run's seeds nor a config change could be checked.
        raise RunError(
            f"{logdir} holds checkpoints but no config.yaml, so this config cannot be checked "
            "against the run's: put the run's config.yaml back, or train in a new --logdir"
        )
    if config_path.exists():
        saved = load_run_config(config_path)
        if (saved.seed, saved.num_seeds) != (config.seed, config.num_seeds):
            # Other seeds are another experiment, and the checkpoint's seed axis fixes N.
            raise RunError(
                f"{logdir} holds {seeds_text(run_seeds(saved))}, not "
                f"{seeds_text(run_seeds(config))}: a run's seeds cannot change; train those "
                "in a new --logdir"
            )
        changed = changed_keys(saved, config)
        if changed and not config.resume.allow_config_change:
            command = last_command(logdir)
            started = f"; it was last started with: {command}" if command else ""
            raise RunError(
                f"config differs from the saved run in {logdir} at {', '.join(changed)}: "
                f"resume with the --configs and overrides the run was started with{started} "
                "(or pass --resume.allow_config_change true to resume with this config)"
            )
    seed_dirs = [seed_logdir(logdir, config, seed) for seed in run_seeds(config)]
    lost = [folder for folder in seed_dirs if not (folder / "config.yaml").is_file()]
    if saved_run and config.num_seeds > 1 and lost:
        # That seed would go on from the checkpoint with no replay or log.
        raise RunError(
            f"{lost[0]} or its config.yaml is missing, but the checkpoints in {logdir} hold "
            "that seed: put the seed's folder back, or train in a new --logdir"
        )
    agent = make_agent(config)
    check_state_fits(agent, config, memory_bytes())
    check_wandb_key(config.wandb.mode, logdir)
    return agent


def memory_bytes() -> int:
    """The memory the training state lives in: the local accelerators' together, or the
    machine's RAM on CPU (whose devices report no limit)."""
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    if all("bytes_limit" in s for s in stats):
        return sum(s["bytes_limit"] for s in stats)
    return _physical_memory()


def check_state_fits(agent: Agent, config: Config, memory_bytes: int) -> None:
    """RunError, before anything is allocated or written, when the training state of all
    seeds cannot fit: a typo such as `--rssm.deter 200000` would otherwise hang in its
    allocation or its first save. An update holds at least the state and a new one."""
    state = jax.eval_shape(agent.init_seeds, init_keys(config))
    need = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    if 2 * need > memory_bytes:
        raise RunError(
            f"the training state of {config.num_seeds} seed(s) (parameters, optimizer moments "
            f"and slow critic) needs {need / 2**30:.1f} GiB, and an update at least twice that: "
            f"more than the {memory_bytes / 2**30:.1f} GiB of {jax.default_backend()} memory "
            "here; lower the network sizes (rssm.*, encoder.*, decoder.*, units) or --num_seeds"
        )


def _set_aside_replay(folder: pathlib.Path, next_index: int | None, step: int) -> None:
    """Before the replay loads: the episodes that finished after the checkpoint of `step`
    (a kill since) go to `<folder>/replay_after_checkpoint/<step>`. The run collects those
    steps again, and keeping both would give the learner more data than its step count says.
    Checkpoints from before this was recorded (`next_index` None) keep every file."""
    if next_index is None:
        return
    aside = folder / "replay_after_checkpoint" / str(step)
    moved, moved_to = set_aside_after(folder / "replay", next_index, aside)
    if moved:
        print(
            f"replay: {moved} episode file(s) of {folder} finished after the checkpoint at step "
            f"{step}; set aside in {moved_to} (their steps are collected again)",
            flush=True,
        )


def _holds_run_data(seed_dirs: Sequence[pathlib.Path]) -> bool:
    for folder in seed_dirs:
        metrics = folder / METRICS_FILE
        if (metrics.exists() and metrics.stat().st_size > 0) or any(
            (folder / "replay").glob("*.npz")
        ):
            return True
    return False


def next_multiple(step: int, every: int) -> int:
    """The first multiple of `every` after `step`: where a schedule fires next."""
    return (step // every + 1) * every


class Stopwatch:
    """The host's wall time in each part of the run loop since the last row, which gets them
    as `time_<part>`: fractions of its interval, `time_other` the rest (the loop itself).

    `policy` is the policy step to its action on the host, `update` the updates until their
    results are ready (so `policy` never waits on one), `batch` the replay batches (each
    update's next one stacked and sent while the device runs it), `replay`
    the steps added to the replays, `env` the envs' steps, `eval`, `log` and `checkpoint`.
    """

    PARTS = ("env", "policy", "replay", "batch", "update", "eval", "log", "checkpoint")

    def __init__(self):
        self.reset()

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def fractions(self, interval: float) -> dict[str, float]:
        """Each part's share of the `interval` seconds since the last row."""
        shares = {f"time_{part}": seconds / interval for part, seconds in self.seconds.items()}
        return {**shares, "time_other": max(0.0, 1.0 - sum(shares.values()))}

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)


class Acting:
    """Steps the one pool of N × `envs` envs (seed i's envs are rows `i·E … i·E + E − 1`):
    uniform random actions during the prefill, then every seed's policy in one jitted call;
    adds each seed's steps to its own replay."""

    def __init__(self, agent, config, env, replays, seed_states, sharding, stopwatch):
        self.agent, self.env, self.replays, self.sharding = agent, env, replays, sharding
        self.stopwatch = stopwatch
        self.num_seeds, self.envs = len(replays), config.envs
        # Every input of the jitted policy placed like its outputs: one compile, not three.
        act_keys = _wrap_key([seed_state["act_key"] for seed_state in seed_states])
        self.act_keys = jax.device_put(act_keys, sharding)
        self.random_rngs = [_generator(state["random_rng"]) for state in seed_states]
        self.spec = env.step_spec
        self.obs = env.reset()
        self.prev_action = np.zeros((env.num_envs, env.num_actions), np.float32)
        self.carry = jax.device_put(agent.initial_carry(self.envs, self.num_seeds), sharding)
        # Returns of the episodes finished since the last row; checkpointed, so that a row
        # after a stop and resume still counts those finished before the stop.
        self.episode_returns = [
            list(seed_state.get("pending_returns", [])) for seed_state in seed_states
        ]

    def step(self, states: TrainState, prefill: bool) -> None:
        with self.stopwatch("replay"):
            record = replay_record(self.obs, self.prev_action, self.spec)
            for i, replay in enumerate(self.replays):
                rows = {k: v[i * self.envs : (i + 1) * self.envs] for k, v in record.items()}
                for episode in replay.add(rows):
                    self.episode_returns[i].append(float(episode["reward"].sum()))
        with self.stopwatch("policy"):
            action = self._action(states, prefill)
        with self.stopwatch("env"):
            self.obs = self.env.step(action)
        self.prev_action = action

    def _action(self, states: TrainState, prefill: bool) -> np.ndarray:
        """`[N·E, A]`: uniform random in the prefill, else every seed's policy."""
        if prefill:
            return np.concatenate(
                [self.env.random_actions(rng, self.envs) for rng in self.random_rngs]
            )
        # The observation goes in as numpy: jit's own transfer is cheaper than a `device_put`
        # first (0.3 ms of 0.8 ms per policy step, CPU, docs/benchmarks.md), and an
        # uncommitted input keeps the one compile.
        obs = policy_inputs(self.obs, self.agent.obs_key, self.num_seeds)
        action, self.carry, self.act_keys = self.agent.act_seeds(
            states, obs, self.carry, self.act_keys, mode="train"
        )
        return np.asarray(action).reshape(self.env.num_envs, -1)

    def clear_returns(self) -> None:
        """Forgets the returns a written row has logged."""
        self.episode_returns = [[] for _ in self.replays]

    def seed_states(self) -> list[dict]:
        """Each seed's part of the checkpoint: its policy key, prefill stream and the returns
        no row has logged yet."""
        parts = zip(_key_data(self.act_keys), self.random_rngs, self.episode_returns, strict=True)
        return [
            {
                "act_key": key,
                "random_rng": rng.bit_generator.state,
                "pending_returns": list(returns),
            }
            for key, rng, returns in parts
        ]


class Learning:
    """Owes `train_steps` updates every `train_every` policy steps (plus `pretrain` once)
    from the end of the prefill, once every seed's replay can be sampled, and pays them
    with one jitted update of all seeds on a batch `[N, B, T, ...]` from their replays.
    Holds the train states `[N, ...]`, which it replaces after every update."""

    def __init__(self, agent, config, replays, sharding, loop, logger: Logger, states, stopwatch):
        self.agent, self.config, self.replays, self.sharding = agent, config, replays, sharding
        self.stopwatch = stopwatch
        self.states = states
        self.logger = logger  # the first seed's: its lines go above the progress bar
        self.compile_announced = False  # the first update of this process compiles
        self.wait_announced = False  # the prefill is over but a replay cannot be sampled
        self.datasets = [replay.dataset() for replay in replays]
        # The next update's batch on the device, made while the device runs an update, and
        # the replays' batches it was made of.
        self.prepared: tuple[list[dict], Any] | None = None
        self.updates, self.owed = loop["updates"], loop["updates_owed"]
        self.metrics: list[dict] = []  # on device, [N] each, until they are summed
        # Each seed's sums and count of the metrics since the last row, on the host;
        # checkpointed, so that a row after a stop and resume averages all its updates.
        empty = {"count": 0, "sums": {}}
        self.sums = [seed_state.get("pending_metrics", empty) for seed_state in loop["seeds"]]
        self.last_metrics: dict | None = None  # the latest update's, on device

    def owe(self, step: int) -> None:
        config = self.config
        if step < config.prefill or not self._can_sample(step):
            return
        if self.updates == 0 and self.owed == 0:  # owed already: it waited for a replay
            self.owed += config.pretrain  # the official one-off pretraining
        self.owed += config.train_steps * (
            step // config.train_every - (step - config.envs) // config.train_every
        )

    def _can_sample(self, step: int) -> bool:
        """Whether every seed's replay can be sampled; says once when one cannot."""
        if all(replay.ready for replay in self.replays):
            return True
        if not self.wait_announced:
            self.logger.message(f"step {step}: {self.waiting()}; training waits for one")
            self.wait_announced = True
        return False

    def waiting(self) -> str:
        """Which seeds have no episode to sample yet, and the length it needs, in words."""
        seeds = [
            seed
            for seed, replay in zip(run_seeds(self.config), self.replays, strict=True)
            if not replay.ready
        ]
        need = max(self.config.replay.minlen, self.config.dataset.length)
        return (
            f"{seeds_text(seeds)} stored no episode of at least max(replay.minlen, "
            f"dataset.length) = {need} steps"
        )

    def train(self, step: int, stop: Callable[[], bool]) -> None:
        """Pays the owed updates; those left when `stop()` turns true stay owed (and
        checkpointed): the one-off pretraining is minutes of updates on a CPU. Updates a
        resumed run owes wait while a replay cannot be sampled (its files lost)."""
        if self.owed == 0 or not self._can_sample(step):
            return
        if not self.compile_announced and self.config.jit:
            # The first update compiles first: on a CPU, a minute without progress otherwise.
            self.logger.message(f"step {step}: compiling the update (once per start)")
            self.compile_announced = True
        while self.owed > 0 and not stop():
            # Checked one update late, so the host never waits on the update in flight.
            if self.last_metrics is not None:
                with self.stopwatch("update"):  # the previous update's device time
                    jax.block_until_ready(self.last_metrics)
                self._check_finite(step)
            with self.stopwatch("batch"):
                batches = [next(dataset) for dataset in self.datasets]
                batch = self._device_batch(batches)
            with self.stopwatch("update"):
                # Replaced at once: an error in a later update leaves the states that match
                # the counters for the checkpoint saved after it.
                self.states, self.last_metrics = self.agent.train_seeds(self.states, batch)
            self.metrics.append(self.last_metrics)
            self.updates += 1
            self.owed -= 1
            with self.stopwatch("batch"):
                self._prepare_next()
        with self.stopwatch("update"):
            # Waited for here, not in the next policy step, so that the row's `time_update`
            # holds the updates' device time. The policy waits on them anyway; only the
            # replays' work and the policy's dispatch no longer overlap the last update
            # (about 1 ms of an update cycle's 60-140 ms on the H200).
            jax.block_until_ready(self.last_metrics)

    def _prepare_next(self) -> None:
        """The next update's batch on the device, made while the device runs this one: the
        batch each replay's iterator returns next, drawn already (the draws and the replays'
        streams are unchanged). A copy that failed is left to the `next()` that returns it,
        if one does: the batch prepared after a run's last update is never used."""
        try:
            upcoming = [replay.upcoming() for replay in self.replays]
        except Exception:
            return
        self.prepared = upcoming, self._stack_on_device(upcoming)

    def _device_batch(self, batches: list[dict]) -> Any:
        """The batch `[N, B, T, ...]` of the seeds' `batches` on the device: the one prepared
        during the last update if it was made of these very arrays, else made now."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None and all(map(operator.is_, prepared[0], batches)):
            return prepared[1]
        return self._stack_on_device(batches)

    def _stack_on_device(self, batches: list[dict]) -> Any:
        batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        return jax.device_put(batch, self.sharding)

    def _check_finite(self, step: int) -> None:
        """Stops the run (NonFiniteError) once every seed's last `max_nonfinite` updates were
        non-finite. A seed that gets there while others learn is reported once per streak and
        goes on: its updates stay skipped (its parameters those of its last finite update)
        until one is finite again, so one diverged seed does not end the other seeds' run."""
        streaks = np.asarray(self.last_metrics["nonfinite_streak"])
        limit, seeds = self.config.max_nonfinite, run_seeds(self.config)
        if streaks.min() >= limit:
            raise NonFiniteError(
                f"{limit} consecutive non-finite updates at step {step} ({seeds_text(seeds)}); "
                "stopping with the last good checkpoint kept"
            )
        for i in np.flatnonzero(streaks == limit):
            self.logger.warning(
                f"warning: seed {seeds[i]}: {limit} consecutive non-finite updates at step "
                f"{step}; its updates are skipped while the other seeds go on (the run stops "
                "if every seed gets there)"
            )

    def row_metrics(self) -> list[dict[str, float]]:
        """Each seed's mean of every train metric since the last row, and the latest value
        of each of `RUNNING_COUNTS` ({} if none)."""
        return [
            {
                **{k: total / sums["count"] for k, total in sums["sums"].items()},
                **sums.get("latest", {}),
            }
            for sums in self._pending_sums()
        ]

    def clear_metrics(self) -> None:
        """Forgets the metrics a written row has logged (`row_metrics` took in those still
        on device)."""
        self.sums = [{"count": 0, "sums": {}} for _ in self.sums]

    def _pending_sums(self) -> list[dict]:
        """Each seed's `{"count": updates, "sums": {metric: sum}, "latest": {count: value}}`
        since the last row, with the updates still on device added first."""
        if self.metrics:
            host, self.metrics = jax.device_get(self.metrics), []
            averaged = [k for k in host[0] if k not in RUNNING_COUNTS]
            self.sums = [
                {
                    "count": sums["count"] + len(host),
                    "sums": {
                        k: sums["sums"].get(k, 0.0) + float(sum(float(m[k][i]) for m in host))
                        for k in averaged
                    },
                    "latest": {k: float(host[-1][k][i]) for k in RUNNING_COUNTS if k in host[0]},
                }
                for i, sums in enumerate(self.sums)
            ]
        return self.sums

    def seed_states(self) -> list[dict]:
        """Each seed's part of the checkpoint: the metrics no row has logged yet, and its
        replay's sampling stream and position (episodes stored, next file index), once the
        files of all its finished episodes are on disk (a failed one is raised)."""
        for replay in self.replays:
            replay.flush()
        return [
            {
                "pending_metrics": sums,
                "replay_rng": replay.get_rng_state(),
                "replay_episodes": replay.stats["num_episodes"],
                "replay_next_index": replay.next_index,
            }
            for sums, replay in zip(self._pending_sums(), self.replays, strict=True)
        ]


class Evaluating:
    """Every `eval_every` steps once an update is made: `eval_eps` episodes of each seed's
    eval policy in its own eval envs (one pool for all seeds), and the open-loop report of
    its replay."""

    def __init__(self, agent, config, env, replays, loggers, loop, sharding):
        self.agent, self.config, self.env, self.sharding = agent, config, env, sharding
        self.replays, self.loggers = replays, loggers
        # A resumed run's changed eval_every applies at once, unless an eval is owed.
        self.next_eval = loop["next_eval"]
        if loop["step"] < self.next_eval:
            self.next_eval = next_multiple(loop["step"], config.eval_every)
        eval_keys = _wrap_key([seed_state["eval_key"] for seed_state in loop["seeds"]])
        self.eval_keys = jax.device_put(eval_keys, sharding)
        # The open-loop report samples its chunks from a stream of its own, so that a report
        # never shifts the batches the learner sees (exact resume across evals).
        self.report_rngs = [_generator(state["report_rng"]) for state in loop["seeds"]]

    def due(self, step: int, learning: Learning) -> bool:
        """Whether `step` gets its evaluation: a multiple of `eval_every` past an update,
        once the step's updates are all paid (those waiting for a replay, too)."""
        return step >= self.next_eval and learning.updates > 0 and not learning.owed

    def run(self, states: TrainState, step: int, stop: Callable[[], bool]) -> bool:
        """Whether the evaluation was done: False when `stop()` cut it short (nothing logged,
        the streams unmoved, so it is still owed and a resumed run does it). Its results wait
        in the loggers for the row of `step`; `done` then moves the streams on."""
        keys = jax.vmap(lambda key: jax.random.split(key, 3))(self.eval_keys)
        eval_keys, episodes_keys, openl_keys = keys[:, 0], keys[:, 1], keys[:, 2]
        results = evaluate(
            self.agent, self.env, states, self.config.eval_eps, episodes_keys,
            record_video=self.config.eval_video_frames > 0,
            max_frames=self.config.eval_video_frames, stop=stop,
        )  # fmt: skip
        if results is None:
            return False
        for result, logger in zip(results, self.loggers, strict=True):
            logger.scalar("eval_return", float(np.mean(result.returns)))
            logger.scalar("eval_length", float(np.mean(result.lengths)))
            if result.frames:
                logger.video("eval_policy", np.stack(result.frames), step=step)
        report_rngs = [_generator(rng.bit_generator.state) for rng in self.report_rngs]
        samples = zip(self.replays, report_rngs, strict=True)
        batches = [replay.sample(rng) for replay, rng in samples]
        videos = open_loop_frames(self.agent, states, batches, openl_keys, self.sharding)
        for logger, frames in zip(self.loggers, videos, strict=True):
            logger.video("openl", frames, step=step)
        self._next_streams = eval_keys, report_rngs
        return True

    def done(self, step: int) -> None:
        """The evaluation of `step` is in its row: the streams and the schedule move on. Not
        before: an eval whose report or row failed (checkpointed as owed) is redone with the
        same draws."""
        self.eval_keys, self.report_rngs = self._next_streams
        self.next_eval = next_multiple(step, self.config.eval_every)

    def seed_states(self) -> list[dict]:
        """Each seed's part of the checkpoint: its eval key and open-loop report stream."""
        return [
            {"eval_key": key, "report_rng": rng.bit_generator.state}
            for key, rng in zip(_key_data(self.eval_keys), self.report_rngs, strict=True)
        ]


class Logging:
    """Every `log_every` steps once an update is made, and at the run's last step: each
    seed's train metrics, returns, speed and replay size to its own logger (with the
    evaluation's results if one ran at that step; one that ran at another step gets a row of
    its own); the first seed's logger shows the progress, followed in a many-seed run by one
    line of every seed's returns."""

    TICK_SECONDS = 0.5  # how often the progress bar moves between rows

    def __init__(self, config, loggers, replays, loop, stopwatch):
        self.config, self.loggers, self.replays = config, loggers, replays
        self.stopwatch = stopwatch
        self.seeds = run_seeds(config)
        # A resumed run's changed log_every applies at once, unless a row is owed.
        self.next_log = loop["next_log"]
        if loop["step"] < self.next_log:
            self.next_log = next_multiple(loop["step"], config.log_every)
        self.last_row = loop["last_row"]  # the step of the latest row with train metrics
        self.clock, self.clock_step = time.perf_counter(), loop["step"]
        self.clock_updates = loop["updates"]
        self.ticked = self.clock

    def due(self, step: int, learning: Learning) -> bool:
        """Whether `step` gets its row: all its updates paid (a stop that left some owed
        leaves the row owed too, so that it averages them all when the resumed run pays
        them), and a multiple of `log_every` past an update, or the run's last step, even
        without an update yet (a run within the prefill: its returns and replay size)."""
        if learning.owed:
            return False
        last = step >= self.config.steps and self.last_row != step
        return last or (step >= self.next_log and learning.updates > 0)

    def tick(self, step: int) -> None:
        """Moves the progress bar (if any) to `step` between rows, prefill included, at most
        every `TICK_SECONDS`: rows come every `log_every` steps, minutes apart on Atari."""
        now = time.perf_counter()
        if now - self.ticked >= self.TICK_SECONDS:
            self.loggers[0].progress(step, {})
            self.ticked = now

    def write(self, step: int, acting: Acting, learning: Learning) -> None:
        """The row of `step`; what it logged is cleared from `acting` and `learning` only
        once every seed's row is written (an error keeps it for the error checkpoint)."""
        now = time.perf_counter()
        seconds = now - self.clock
        speed = {
            "updates_per_sec": (learning.updates - self.clock_updates) / seconds,
            "updates": learning.updates,
        }
        if step > self.clock_step:  # not a resumed run's row of its restored step
            speed["fps"] = (step - self.clock_step) * self.config.action_repeat / seconds
            speed |= self.stopwatch.fractions(seconds)
        per_seed = zip(
            self.loggers, learning.row_metrics(), acting.episode_returns, self.replays,
            strict=True,
        )  # fmt: skip
        for logger, metrics, returns, replay in per_seed:
            logger.scalars(metrics)
            if returns:
                logger.scalar("train_return", float(np.mean(returns)))
                logger.scalar("train_episodes", len(returns))
            logger.scalars(
                {
                    **speed,
                    "replay_steps": replay.stats["num_steps"],
                    "replay_episodes": replay.stats["num_episodes"],
                }
            )
        self.write_rows(step)
        learning.clear_metrics()
        acting.clear_returns()
        self.next_log = next_multiple(step, self.config.log_every)
        self.last_row = step
        self.clock, self.clock_step, self.clock_updates = now, step, learning.updates
        self.stopwatch.reset()

    def write_rows(self, step: int) -> None:
        """Each seed's buffered scalars as its row of `step`, shown in the progress (alone,
        for an evaluation at a step without a log row)."""
        records = []
        for logger in self.loggers:
            record = logger.write(step)
            shown = ("fps", "updates_per_sec", "train_return", "eval_return")
            logger.progress(step, {k: record[k] for k in shown if record.get(k) is not None})
            records.append(record)
        line = seeds_line(self.seeds, records) if len(records) > 1 else None
        if line:  # the progress shows the first seed only
            self.loggers[0].message(line)

    def end_progress(self) -> None:
        self.loggers[0].end_progress()


class Checkpointing:
    """Saves the run, every seed's train state and the loop state (the counters, the
    schedules and each piece's part of every seed), every `checkpoint_every` steps of this
    start (a changed value applies at once on resume), at the end, and after an unexpected
    error; only when a counter moved since the last save (a resumed run's restored step is
    saved again at once when the work it owed is done)."""

    COUNTERS = ("step", "updates", "updates_owed", "next_eval", "next_log", "last_row")

    def __init__(self, checkpointer, config, loggers, pieces, loop, resumed):
        self.checkpointer, self.loggers = checkpointer, loggers
        self.acting, self.learning, self.evaluating, self.logging = pieces
        self.every = config.checkpoint_every
        self.next = next_multiple(loop["step"], self.every)
        self.saved = {key: loop[key] for key in self.COUNTERS} if resumed else None

    def _counters(self, step: int) -> dict:
        learning, evaluating, logging = self.learning, self.evaluating, self.logging
        values = (step, learning.updates, learning.owed, evaluating.next_eval,
                  logging.next_log, logging.last_row)  # fmt: skip
        return dict(zip(self.COUNTERS, values, strict=True))

    def loop_state(self, step: int) -> dict:
        """What the checkpoint of `step` saves beside the train states (JSON)."""
        parts = zip(
            self.acting.seed_states(), self.learning.seed_states(),
            self.evaluating.seed_states(), strict=True,
        )  # fmt: skip
        return {**self._counters(step), "seeds": [{**a, **b, **c} for a, b, c in parts]}

    def unsaved(self, step: int) -> bool:
        return self._counters(step) != self.saved

    def save(self, step: int) -> None:
        loop = self.loop_state(step)
        for logger in self.loggers:  # their rows up to here, as the loop state has them
            logger.commit()
        self.checkpointer.save(step, self.learning.states, loop)
        self.saved = self._counters(step)

    def tick(self, step: int) -> None:
        """Saves at the first step at or past each multiple of `checkpoint_every`, and at a
        resumed run's restored step once it has done the work it owed there: a kill before
        the next save would otherwise resume from a checkpoint owing rows already written."""
        restored = self.saved is not None and self.saved["step"] == step
        if step >= self.next:
            self.next = next_multiple(step, self.every)
        elif not restored:
            return
        if self.unsaved(step):
            self.save(step)

    def save_after_error(self, step: int, error: BaseException) -> None:
        """After an unexpected `error`, the work done since the last checkpoint (steps, or
        the owed updates of a resumed run's restored step), when the states are intact (not
        donated to the failed update, all finite). Never raises: a new error is told."""
        try:
            if not self.unsaved(step) or not _restorable(self.learning.states):
                return
            self.save(step)
        except Exception as failure:  # e.g. the device failed: the first error matters
            if failure is not error:  # a replay's failed write refuses every checkpoint
                print(
                    f"warning: could not save a checkpoint after the error: {failure}",
                    file=sys.stderr,
                )
            return
        print(f"saved a checkpoint at step {step} before stopping on the error", file=sys.stderr)


def train(config: Config, stop: StopSignal, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) training to `config.steps`; returns the final loop state. `argv` is
    the command line, recorded in `run.json`."""
    logdir = pathlib.Path(config.logdir).expanduser()
    agent = check_inputs(config, logdir)
    ensure_writable(logdir, "log directory", LogdirError)
    with lock_directory(logdir):
        return _train(config, agent, logdir, stop, argv)


def _fresh_loop(config: Config) -> dict:
    """The loop state of a run at step 0: counters, and each seed's PRNG streams."""
    seed_states = []
    for seed in run_seeds(config):
        _, act_key, eval_key = seed_keys(seed)
        seed_states.append(
            {
                "act_key": _key_data(act_key),
                "eval_key": _key_data(eval_key),
                "random_rng": host_rng_state(seed, "random_actions"),
                "report_rng": host_rng_state(seed, "report"),
            }
        )
    return {
        "step": 0,
        "updates": 0,
        "updates_owed": 0,
        "next_log": 0,
        "next_eval": 0,
        "last_row": None,  # the step of the latest row with train metrics
        "seeds": seed_states,
    }


def _make_logger(config, logdir, run_info, step, resumed, index) -> Logger:
    seed = run_seeds(config)[index]
    group = config.wandb.group
    if config.num_seeds > 1 and not group:
        group = f"{config.task}-{logdir.name}"  # the N seeds of one run together in wandb
    folder = seed_logdir(logdir, config, seed)
    # What the seed's own config.yaml says, with the wandb group it is logged in.
    logged = seed_config(config, seed, folder) if config.num_seeds > 1 else config
    return Logger(
        folder,
        {**logged.update({"wandb.group": group}).flat(), "run": run_info},
        wandb_mode=config.wandb.mode,
        wandb_project=config.wandb.project,
        wandb_entity=config.wandb.entity,
        run_name=f"{config.task}-{seed}",
        wandb_group=group,
        wandb_tags=config.wandb.tags,
        wandb_notes=config.wandb.notes,
        total_steps=config.steps,
        action_repeat=config.action_repeat,
        resume_step=step if resumed else None,
        quiet=index > 0,
    )


def _train(
    config: Config, agent: Agent, logdir: pathlib.Path, stop: StopSignal, argv: Sequence[str]
) -> dict:
    seeds = run_seeds(config)
    seed_dirs = [seed_logdir(logdir, config, seed) for seed in seeds]
    for folder in seed_dirs:  # found before anything is written (one seed: the logdir)
        _check_run_files(folder)
    with contextlib.ExitStack() as opened:  # each closed on the way out, last opened first
        checkpointer = Checkpointer(logdir / "checkpoints", keep=config.checkpoint_keep)
        opened.callback(checkpointer.close)
        sharding = seed_sharding(config.num_seeds)
        states, loop, resumed = _restore(config, agent, logdir, checkpointer, seed_dirs, sharding)
        step = loop["step"]
        if resumed and step >= config.steps and not owed_work(loop, config.steps):
            # Before any env, logger or run.json entry: a finished run stays as it was.
            print(
                f"the run is at step {step} (--steps {config.steps}): nothing to train; a "
                "larger --steps continues it",
                flush=True,
            )
            _print_returns(seeds, seed_dirs)
            return loop
        states = jax.device_put(states, sharding)
        env = make_env(config, config.envs, [env_seed(s, step, resumed) for s in seeds])
        opened.callback(env.close)
        eval_seeds = [env_seed(s, step, resumed, TRAIN_EVAL_SEED_OFFSET) for s in seeds]
        eval_env = make_env(config, config.eval_envs, eval_seeds)
        opened.callback(eval_env.close)
        notes = [
            atari_protocol_warning(config),
            replay_memory_warning(config, env.step_spec, _physical_memory()),
        ]
        if loop["updates"] == 0:
            notes.append(prefill_warning(config))
        for warning in filter(None, notes):
            print(warning, file=sys.stderr, flush=True)
        run_info = provenance(argv)
        loggers: list[Logger] = []
        replays: list[Replay] = []
        for i, folder in enumerate(seed_dirs):
            loggers.append(_make_logger(config, logdir, run_info, step, resumed, i))
            opened.callback(loggers[i].close)
            seed_state = loop["seeds"][i] if resumed else None
            try:
                replay = _open_replay(config, folder, env.step_spec, seeds[i], seed_state, step)
            except MemoryError as error:  # loading a large replay on resume
                raise RunError(
                    f"out of memory loading the replay of {folder} ({out_of_memory(error)} "
                    "failed); resume on a machine with more memory, or with a lower "
                    "--replay.capacity"
                ) from error
            replays.append(replay)
            opened.callback(replays[i].close)
        _save_configs(config, logdir, seed_dirs)
        # A start that could not open its loggers (e.g. wandb online offline) is no start.
        record_start(logdir, run_info, step)
        print(_start_line(config, replays, sharding), flush=True)
        stopwatch = Stopwatch()
        acting = Acting(agent, config, env, replays, loop["seeds"], sharding, stopwatch)
        learning = Learning(agent, config, replays, sharding, loop, loggers[0], states, stopwatch)
        evaluating = Evaluating(agent, config, eval_env, replays, loggers, loop, sharding)
        logging = Logging(config, loggers, replays, loop, stopwatch)
        pieces = (acting, learning, evaluating, logging)
        checkpointing = Checkpointing(checkpointer, config, loggers, pieces, loop, resumed)
        stopping = lambda: stop.signum is not None
        step = _run_loop(config, step, *pieces, checkpointing, stopping)
        final = checkpointing.loop_state(step)  # as saved
        if stop.signum is not None:
            owed = owed_work(final, config.steps)
            left = f" ({in_words(owed)} left for the resumed run)" if owed else ""
            print(f"stopping on signal {stop.signum} at step {step}{left}", flush=True)
        print(f"checkpoint saved at step {step} in {checkpointer.directory}", flush=True)
        _print_returns(seeds, seed_dirs)
        waiting = not all(replay.ready for replay in replays)
        if learning.updates == 0 and learning.wait_announced and waiting:
            # Episodes that never reach a sample's length (a short time_limit or game, a
            # large replay.minlen): a run that exits 0 having trained nothing at all.
            print(f"warning: the run has made no update: {learning.waiting()}", file=sys.stderr)
        elif learning.owed and waiting and stop.signum is None:
            # Its replay lost under a checkpoint that owed them: a larger --steps pays them.
            print(
                f"warning: the run ends owing {learning.owed} update(s): {learning.waiting()}",
                file=sys.stderr,
            )
        return final


def _start_line(config: Config, replays: list[Replay], sharding) -> str:
    stats = [replay.stats for replay in replays]
    return (
        f"dreamer-jax: {config.task} on {jax.default_backend()}, "
        f"{seeds_text(run_seeds(config))} on {sharding.mesh.size} device(s), logs in "
        f"{config.logdir} (replay: {sum(s['num_episodes'] for s in stats)} episodes, "
        f"{sum(s['num_steps'] for s in stats)} steps, "
        f"{sum(s['skipped_files'] for s in stats)} files skipped)"
    )


def _print_returns(seeds: list[int], seed_dirs: list[pathlib.Path]) -> None:
    for seed, folder in zip(seeds, seed_dirs, strict=True):
        print(latest_returns(seed, folder / METRICS_FILE), flush=True)


def _check_run_files(folder: pathlib.Path) -> None:
    """A seed's folder and what a resume writes in it, checked before anything is written
    (a restore may move a damaged checkpoint aside, and a resume sets episodes aside)."""
    ensure_writable(folder, "log directory", LogdirError)
    replay = folder / "replay"
    if replay.exists():
        ensure_writable(replay, "replay directory", LogdirError)
    metrics = folder / METRICS_FILE
    if metrics.exists() and not metrics.is_file():
        raise LogdirError(f"{metrics} is not a file")


def _restore(
    config: Config,
    agent: Agent,
    logdir: pathlib.Path,
    checkpointer: Checkpointer,
    seed_dirs: list[pathlib.Path],
    sharding: jax.sharding.NamedSharding,
) -> tuple[TrainState, dict, bool]:
    """The run's states `[N, ...]` and loop state, from its latest good checkpoint or fresh,
    and whether they were restored. Refuses to start over in a logdir that holds a run."""
    # Built, and restored, split over the devices as they train: not all on the first.
    states = agent.init_seeds(jax.device_put(init_keys(config), sharding))
    loop = _fresh_loop(config)
    if checkpointer.steps():
        # `last_row` came later; a checkpoint saved without it gets `saved_last_row`'s.
        restored = checkpointer.restore_latest(states, loop_keys=set(loop) - {"last_row"})
        if restored is None:
            raise RunError(
                f"no checkpoint in {checkpointer.directory} could be restored; "
                "refusing to start over in a logdir that holds a run"
            )
        _, states, saved_loop = restored
        loop.update({"last_row": saved_last_row(saved_loop), **saved_loop})
        print(f"resuming from checkpoint at step {loop['step']}", flush=True)
        return states, loop, True
    if _holds_run_data(seed_dirs):
        aside = checkpointer.unreadable_directory
        moved = f"; unreadable ones are in {aside}" if aside.exists() else ""
        raise RunError(
            f"{logdir} holds a run's metrics or replay but no checkpoint{moved}; refusing to "
            "start over in it (use a new --logdir)"
        )
    return states, loop, False


def _open_replay(
    config: Config,
    folder: pathlib.Path,
    spec: dict,
    seed: int,
    seed_state: dict | None,
    step: int,
) -> Replay:
    """A seed's replay from `<folder>/replay`. Resumed (`seed_state` is the seed's part of the
    checkpoint's loop state): the episodes finished after the checkpoint set aside first, the
    sampler's generator restored, and a warning if it loads other episodes than were saved."""
    if seed_state is not None:
        _set_aside_replay(folder, seed_state.get("replay_next_index"), step)
    replay = Replay(
        folder / "replay",
        spec=spec,
        capacity=config.replay.capacity,
        minlen=config.replay.minlen,
        length=config.dataset.length,
        batch=config.dataset.batch,
        prioritize_ends=config.replay.prioritize_ends,
        seed=seed,
        prefetch=config.replay.prefetch,
        ongoing=config.replay.ongoing,
    )
    if seed_state is None:
        return replay
    replay.set_rng_state(seed_state["replay_rng"])
    saved, loaded = seed_state.get("replay_episodes"), replay.stats["num_episodes"]
    if saved is not None and loaded != saved:
        warnings.warn(
            f"seed {seed}: the replay holds {loaded} episodes where its checkpoint at step "
            f"{step} had {saved} (files missing or unreadable): the run goes on, but no longer "
            "as an uninterrupted one would",
            stacklevel=1,
        )
    return replay


def _save_configs(config: Config, logdir: pathlib.Path, seed_dirs: list[pathlib.Path]) -> None:
    """The run's config in the logdir; with several seeds, each seed folder also gets the
    config of the single run it is (`--seed s`), for evaluation and analysis."""
    files = [(logdir / "config.yaml", config)]
    if config.num_seeds > 1:
        files += [
            (folder / "config.yaml", seed_config(config, seed, folder))
            for seed, folder in zip(run_seeds(config), seed_dirs, strict=True)
        ]
    for path, content in files:
        try:
            content.save(path)
        except OSError as error:
            raise LogdirError(f"could not write {path}: {error}") from error


def _run_loop(
    config: Config,
    step: int,
    acting: Acting,
    learning: Learning,
    evaluating: Evaluating,
    logging: Logging,
    checkpointing: Checkpointing,
    stopping: Callable[[], bool],
) -> int:
    """Acts, learns, evaluates, logs and checkpoints from `step` until `config.steps` or
    `stopping()`; returns the step it ended at, saved."""
    watch = logging.stopwatch
    try:
        if checkpointing.saved is None:
            # Step 0 is saved before any data: a run killed in its prefill then resumes,
            # and a logdir with data but no checkpoint can only be a damaged one.
            checkpointing.save(step)
        while True:
            # This step's work, each part marked done once done: a checkpoint saved on an
            # error inside one, or a stop request, keeps it owed, and the resumed run does it
            # at this same step (its restored one) before it acts.
            learning.train(step, stopping)
            with watch("eval"):
                evaluated = evaluating.due(step, learning) and evaluating.run(
                    learning.states, step, stopping
                )
            with watch("log"):
                if logging.due(step, learning):
                    logging.write(step, acting, learning)
                elif evaluated:  # a row of its own: the next row's would replace its results
                    logging.write_rows(step)
            if evaluated:
                evaluating.done(step)
            logging.tick(step)
            with watch("checkpoint"):
                checkpointing.tick(step)
            if step >= config.steps or stopping():
                break
            acting.step(learning.states, prefill=step < config.prefill)
            step += config.envs
            learning.owe(step)
        logging.end_progress()
        if checkpointing.unsaved(step):  # the periodic save may have just written it
            checkpointing.save(step)
    except Exception as error:
        logging.end_progress()
        if not isinstance(error, CheckpointError | NonFiniteError):
            checkpointing.save_after_error(step, error)
        asked = out_of_memory(error)
        if asked is not None:
            raise RunError(out_of_memory_message(config, error, asked)) from error
        raise
    return step


def saved_last_row(loop: dict) -> int | None:
    """A loop state's `last_row`. One saved before it was recorded wrote the row of its
    step, unless it owed updates there (a row waits for its step's updates)."""
    if "last_row" in loop:
        return loop["last_row"]
    return None if loop["updates_owed"] else loop["step"]


def owed_work(loop: dict, steps: int) -> list[str]:
    """What a loop state still owes at its step, in words ([] for nothing): the updates a
    stop request left, the evaluation due there, and the log row due there (or the last row
    of a run of `steps`): `["3 updates", "the evaluation", "the log row"]`. A loop state
    without `next_log` owes no row due by the schedule."""
    owed, step = loop["updates_owed"], loop["step"]
    words = [f"{owed} update{'s' * (owed > 1)}"] if owed else []
    if loop["updates"] and step >= loop["next_eval"]:
        words.append("the evaluation")
    row_due = loop["updates"] and step >= loop.get("next_log", step + 1)
    if row_due or (step >= steps and saved_last_row(loop) != step):
        words.append("the log row")
    return words


def in_words(items: list[str]) -> str:
    """`["a", "b", "c"]` as "a, b and c"."""
    return " and ".join(filter(None, [", ".join(items[:-1]), *items[-1:]]))


def latest_returns(seed: int, metrics_path: pathlib.Path) -> str:
    """One line for the end of a run: the seed's latest logged eval and train return, each
    with its step, from its metrics.jsonl (so a resumed run reports its earlier rows too;
    a run that logged nothing has none)."""
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    parts = []
    for key in ("eval_return", "train_return"):
        logged = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if logged:
            parts.append(f"{key} {logged[-1][1]:.4g} (step {logged[-1][0]})")
    return f"seed {seed}: {', '.join(parts) or 'no return logged yet'}"


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with warnings.catch_warnings():
        warnings.showwarning = warn_in_one_line  # e.g. a skipped replay file: one line
        return _main(argv)


def _main(argv: list[str]) -> int:
    try:
        config = parse_cli(argv, program_name("dreamer_jax.train"), __doc__)
        if isinstance(config, str):  # --help or --print_config: print and run nothing
            print(config, end="")
            return 0
        if not config.logdir:
            raise ConfigError("--logdir is required (where metrics, checkpoints and replay go)")
        with StopSignal() as stop:
            if config.jit:
                train(config, stop, argv)
            else:
                with jax.disable_jit():
                    train(config, stop, argv)
    except (
        ConfigError, UnknownTaskError, DirectoryError, CheckpointError, RunError, WandbError,
    ) as error:  # fmt: skip
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # the output's reader has gone: `quiet_on_broken_pipe` ends the program
    except StorageError as error:  # a full disk, a quota, a read-only mount: fixable
        print(
            f"error: could not write {error.filename}: {error.strerror}; the run stopped with "
            "its saved checkpoints intact: fix that and run the same command to resume",
            file=sys.stderr,
        )
        return 2
    except (NonFiniteError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 128 + stop.signum if stop.signum is not None else 0


if __name__ == "__main__":
    sys.exit(main())
