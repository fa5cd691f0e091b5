"""The training run: collect with N envpool envs, replay, one jitted update every
`train_every` policy steps, evaluate, log, checkpoint, resume.

    python -m dreamer_jax.train --configs atari --task atari_pong --logdir runs/atari_pong/0
    python -m dreamer_jax.train --configs classic --task classic_cartpole --logdir runs/cartpole/0

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

import os
import pathlib
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from dreamer_jax.agent import Agent, TrainState
from dreamer_jax.api import make_agent
from dreamer_jax.checkpoint import Checkpointer, CheckpointError
from dreamer_jax.config import Config, ConfigError, load_run_config, parse_cli, program_name
from dreamer_jax.envs import UnknownTaskError, VectorEnv
from dreamer_jax.eval import evaluate
from dreamer_jax.logger import METRICS_FILE, LogdirError, Logger, WandbError
from dreamer_jax.paths import DirectoryError, ensure_writable, lock_directory
from dreamer_jax.provenance import provenance, record_start
from dreamer_jax.replay import Replay
from dreamer_jax.report import open_loop_video
from dreamer_jax.world_model import open_loop_prediction, preprocess

OPENL_SEQUENCES = 6
EVAL_SEED_OFFSET = 1_000_000
# Keys a resumed run may change freely: run length, logging and bookkeeping.
RESUMABLE_KEYS = (
    "logdir", "steps", "log_every", "eval_every", "eval_eps", "checkpoint_every",
    "checkpoint_keep", "wandb", "jit", "resume", "max_nonfinite", "eval_video_frames",
)  # fmt: skip


class RunError(Exception):
    """A problem with the run's inputs, reported as one line with exit code 2."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good checkpoint is kept."""


def make_env(config: Config, num_envs: int, seed: int) -> VectorEnv:
    return VectorEnv(config.task, num_envs, seed, config.time_limit, config.action_repeat)


def env_seed(config: Config, step: int, resumed: bool, offset: int = 0) -> int:
    """A fresh run uses the config seed; a resumed run reseeds from (seed, step), so it does
    not replay the episodes the run began with, and two resumes from one checkpoint agree."""
    if not resumed:
        return config.seed + offset
    return int(np.random.SeedSequence([config.seed, step, offset]).generate_state(1)[0])


def replay_record(obs: dict[str, np.ndarray], prev_action: np.ndarray, spec: dict) -> dict:
    """The replay record of the current observation: `action` is what led to it (zeros on
    the first step of an episode), in the replay's dtype (uint8 one-hot when discrete)."""
    action = np.where(obs["is_first"][:, None], 0.0, prev_action)
    return {**obs, "action": action.astype(spec["action"][1])}


def changed_keys(saved: Config, config: Config) -> list[str]:
    """Dotted keys whose values differ from the saved config, except `RESUMABLE_KEYS`."""
    old, new = saved.flat(), config.flat()
    free = lambda key: key.split(".")[0] in RESUMABLE_KEYS
    return sorted(k for k in new if not free(k) and old.get(k) != new[k])


_open_loop = jax.jit(open_loop_prediction, static_argnums=(0, 4))


def open_loop_frames(agent: Agent, state: TrainState, batch: dict, key: jax.Array) -> np.ndarray:
    """The SPEC §6 picture for up to 6 replayed chunks, as uint8 frames `[T, 3H, n·W, C]`."""
    batch = {k: v[:OPENL_SEQUENCES] for k, v in batch.items()}
    context = min(5, agent.config.dataset.length - 1)
    data = preprocess(batch, agent.config)
    truth, prediction = _open_loop(agent.world_model, state.wm_params, data, key, context)
    return open_loop_video(np.asarray(truth), np.asarray(prediction))


def _key_data(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).tolist()


def _wrap_key(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def _generator(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


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
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in self.SIGNALS:
            # The watcher acts; the handler only keeps Python from raising KeyboardInterrupt.
            self._previous[signum] = signal.signal(signum, lambda *_: None)
        self._watcher = threading.Thread(target=self._watch, name="stop-signal", daemon=True)
        self._watcher.start()
        return self

    def _watch(self) -> None:
        while data := self._reader.recv(64):
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                if self.signum is None:
                    self.signum = signum
                    print(
                        f"\nsignal {signum}: stopping after this step (checkpoint, then exit); "
                        "Ctrl-C again to quit now",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    print("second signal: quitting now; the last checkpoint is kept",
                          file=sys.stderr, flush=True)  # fmt: skip
                    os._exit(128 + signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        self._writer.close()  # the watcher's recv() returns b"" and it ends
        self._watcher.join(timeout=5)
        self._reader.close()


def check_inputs(config: Config, logdir: pathlib.Path) -> Agent:
    """Every check that needs no write: the saved config (if any) matches, the task exists.
    Returns the agent of this config."""
    config_path = logdir / "config.yaml"
    if config_path.exists():
        changed = changed_keys(load_run_config(config_path), config)
        if changed and not config.resume.allow_config_change:
            raise RunError(
                f"config differs from the saved run in {logdir} at {', '.join(changed)}; "
                "pass --resume.allow_config_change true to resume anyway"
            )
    return make_agent(config)


def _holds_run_data(logdir: pathlib.Path) -> bool:
    metrics = logdir / METRICS_FILE
    has_metrics = metrics.exists() and metrics.stat().st_size > 0
    return has_metrics or any((logdir / "replay").glob("*.npz"))


def train(config: Config, stop: StopSignal, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) training to `config.steps`; returns the final loop state. `argv` is
    the command line, recorded in `run.json`."""
    logdir = pathlib.Path(config.logdir).expanduser()
    agent = check_inputs(config, logdir)
    ensure_writable(logdir, "log directory", LogdirError)
    with lock_directory(logdir):
        return _train(config, agent, logdir, stop, argv)


def _train(
    config: Config, agent: Agent, logdir: pathlib.Path, stop: StopSignal, argv: Sequence[str]
) -> dict:
    checkpointer = Checkpointer(logdir / "checkpoints", keep=config.checkpoint_keep)
    init_key, act_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    state = agent.init(init_key)
    loop = {
        "step": 0,
        "updates": 0,
        "updates_owed": 0,
        "next_log": 0,
        "next_eval": 0,
        "next_checkpoint": config.checkpoint_every,
        "act_key": _key_data(act_key),
        "eval_key": _key_data(eval_key),
        "random_rng": np.random.default_rng(config.seed).bit_generator.state,
        "replay_rng": None,
        # The open-loop report samples its chunks from a stream of its own, so that a
        # report never shifts the batches the learner sees (exact resume across evals).
        "report_rng": np.random.default_rng([config.seed, 1]).bit_generator.state,
    }
    restored = None
    if checkpointer.steps():
        restored = checkpointer.restore_latest(state)
        if restored is None:
            raise RunError(
                f"no checkpoint in {checkpointer.directory} could be restored; "
                "refusing to start over in a logdir that holds a run"
            )
        _, state, saved_loop = restored
        loop.update(saved_loop)
        print(f"resuming from checkpoint at step {loop['step']}", flush=True)
    elif _holds_run_data(logdir):
        aside = checkpointer.unreadable_directory
        moved = f"; unreadable ones are in {aside}" if aside.exists() else ""
        raise RunError(
            f"{logdir} holds a run's metrics or replay but no checkpoint{moved}; refusing to "
            "start over in it (use a new --logdir)"
        )
    resumed = restored is not None

    env = make_env(config, config.envs, env_seed(config, loop["step"], resumed))
    eval_env = make_env(
        config, config.eval_envs, env_seed(config, loop["step"], resumed, EVAL_SEED_OFFSET)
    )
    run_info = record_start(logdir, provenance(argv), loop["step"])
    logger = Logger(
        logdir,
        {**config.flat(), "run": {k: v for k, v in run_info.items() if k != "starts"}},
        wandb_mode=config.wandb.mode,
        wandb_project=config.wandb.project,
        wandb_entity=config.wandb.entity,
        run_name=f"{config.task}-{config.seed}",
        wandb_group=config.wandb.group,
        wandb_tags=config.wandb.tags,
        wandb_notes=config.wandb.notes,
        total_steps=config.steps,
        action_repeat=config.action_repeat,
        resume_step=loop["step"] if resumed else None,
    )
    try:
        config.save(logdir / "config.yaml")
    except OSError as error:
        raise LogdirError(f"could not write {logdir / 'config.yaml'}: {error}") from error
    replay = Replay(
        logdir / "replay",
        spec=env.step_spec,
        capacity=config.replay.capacity,
        minlen=config.replay.minlen,
        length=config.dataset.length,
        batch=config.dataset.batch,
        prioritize_ends=config.replay.prioritize_ends,
        seed=config.seed,
        prefetch=config.replay.prefetch,
    )
    if loop["replay_rng"] is not None:
        replay.set_rng_state(loop["replay_rng"])
    stats = replay.stats
    print(
        f"dreamer-jax: {config.task} on {jax.default_backend()}, logs in {logdir} "
        f"(replay: {stats['num_episodes']} episodes, {stats['num_steps']} steps, "
        f"{stats['skipped_files']} files skipped)",
        flush=True,
    )

    act_key, eval_key = _wrap_key(loop["act_key"]), _wrap_key(loop["eval_key"])
    random_rng, report_rng = _generator(loop["random_rng"]), _generator(loop["report_rng"])
    dataset = replay.dataset()
    step, updates = loop["step"], loop["updates"]

    def save_checkpoint():
        loop.update(
            step=step,
            updates=updates,
            act_key=_key_data(act_key),
            eval_key=_key_data(eval_key),
            random_rng=random_rng.bit_generator.state,
            replay_rng=replay.get_rng_state(),
            report_rng=report_rng.bit_generator.state,
            replay_episodes=replay.stats["num_episodes"],
        )
        checkpointer.save(step, state, loop)

    train_metrics: list[dict] = []
    last_metrics: dict | None = None
    episode_returns: list[float] = []
    step_spec = env.step_spec
    obs = env.reset()
    prev_action = np.zeros((env.num_envs, env.num_actions), np.float32)
    carry = agent.initial_carry(env.num_envs)
    clock, clock_step, clock_updates = time.perf_counter(), step, updates
    try:
        if not resumed:
            # Step 0 is saved before any data: a run killed in its prefill then resumes,
            # and a logdir with data but no checkpoint can only be a damaged one.
            save_checkpoint()
        while step < config.steps and stop.signum is None:
            for episode in replay.add(replay_record(obs, prev_action, step_spec)):
                episode_returns.append(float(episode["reward"].sum()))
            if step < config.prefill:
                action = env.random_actions(random_rng)
            else:
                act_key, step_key = jax.random.split(act_key)
                action, carry = agent.policy_step(state, obs, carry, step_key, mode="train")
                action = np.asarray(action)
            obs = env.step(action)
            prev_action = action
            step += env.num_envs

            # Train once the prefill is done and some episode is long enough to sample.
            if step >= config.prefill and replay.stats["num_episodes"]:
                if updates == 0:
                    loop["updates_owed"] += config.pretrain  # the official one-off pretraining
                loop["updates_owed"] += config.train_steps * (
                    step // config.train_every - (step - env.num_envs) // config.train_every
                )
                while loop["updates_owed"] > 0:
                    # Checked one update late, so the host never waits on the update in flight.
                    if last_metrics and last_metrics["nonfinite_streak"] >= config.max_nonfinite:
                        raise NonFiniteError(
                            f"{config.max_nonfinite} consecutive non-finite updates at step "
                            f"{step}; stopping with the last good checkpoint kept"
                        )
                    state, metrics = agent.train_step(state, next(dataset))
                    train_metrics.append(metrics)
                    last_metrics = metrics
                    updates += 1
                    loop["updates_owed"] -= 1

            if step >= loop["next_eval"] and updates > 0:
                loop["next_eval"] = (step // config.eval_every + 1) * config.eval_every
                eval_key, episodes_key, openl_key = jax.random.split(eval_key, 3)
                result = evaluate(
                    agent, eval_env, state, config.eval_eps, episodes_key,
                    record_video=config.eval_video_frames > 0,
                    max_frames=config.eval_video_frames,
                )  # fmt: skip
                logger.scalar("eval_return", float(np.mean(result.returns)))
                logger.scalar("eval_length", float(np.mean(result.lengths)))
                if result.frames:
                    logger.video("eval_policy", np.stack(result.frames), step=step)
                frames = open_loop_frames(agent, state, replay.sample(report_rng), openl_key)
                logger.video("openl", frames, step=step)

            if step >= loop["next_log"] and updates > 0:
                loop["next_log"] = (step // config.log_every + 1) * config.log_every
                now = time.perf_counter()
                if train_metrics:
                    host = jax.device_get(train_metrics)
                    logger.scalars({k: float(np.mean([m[k] for m in host])) for k in host[0]})
                if episode_returns:
                    logger.scalar("train_return", float(np.mean(episode_returns)))
                    logger.scalar("train_episodes", len(episode_returns))
                logger.scalars(
                    {
                        "fps": (step - clock_step) * config.action_repeat / (now - clock),
                        "updates_per_sec": (updates - clock_updates) / (now - clock),
                        "updates": updates,
                        "replay_steps": replay.stats["num_steps"],
                        "replay_episodes": replay.stats["num_episodes"],
                    }
                )
                last = logger.write(step)
                logger.progress(step, {k: last[k] for k in ("fps", "train_return") if k in last})
                train_metrics, episode_returns = [], []
                clock, clock_step, clock_updates = now, step, updates

            if step >= loop["next_checkpoint"]:
                loop["next_checkpoint"] = (
                    step // config.checkpoint_every + 1
                ) * config.checkpoint_every
                save_checkpoint()
        if stop.signum is not None:
            print(f"stopping on signal {stop.signum} at step {step}", flush=True)
        if step not in checkpointer.steps():  # the periodic save may have just written it
            save_checkpoint()
        print(f"checkpoint saved at step {step} in {checkpointer.directory}", flush=True)
    except Exception as error:
        if not isinstance(error, CheckpointError | NonFiniteError):
            _save_after_error(save_checkpoint, state, step, checkpointer)
        asked = out_of_memory(error)
        if asked is not None:
            raise RunError(
                f"out of memory with dataset.batch {config.dataset.batch} (an allocation of "
                f"{asked} failed); use a smaller --dataset.batch"
            ) from error
        raise
    finally:
        replay.close()
        logger.close()
        env.close()
        eval_env.close()
        checkpointer.close()
    return loop


def _save_after_error(save_checkpoint, state: TrainState, step: int, checkpointer) -> None:
    """An unexpected error still keeps the steps since the last checkpoint, when the state
    is intact (not donated to the failed update, all finite)."""
    if step in checkpointer.steps() or not _restorable(state):
        return
    try:
        save_checkpoint()
    except CheckpointError as error:
        print(f"warning: could not save a checkpoint after the error: {error}", file=sys.stderr)
        return
    print(f"saved a checkpoint at step {step} before stopping on the error", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
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
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 128 + stop.signum if stop.signum is not None else 0


if __name__ == "__main__":
    sys.exit(main())
