"""The training run: collect with N envpool envs, replay, one jitted update every
`train_every` policy steps, evaluate, log.

    python -m dreamer_jax.train --configs atari --task atari_pong --logdir runs/atari_pong/0

Counts are policy steps summed over the parallel envs (as the official code);
frames = steps × action_repeat. Bad input (unknown task or key, bad value, unwritable
logdir) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from dreamer_jax.agent import Agent, TrainState
from dreamer_jax.config import Config, ConfigError, load_config
from dreamer_jax.envs import UnknownTaskError, VectorEnv
from dreamer_jax.logger import LogdirError, Logger
from dreamer_jax.replay import Replay, ReplayDirectoryError
from dreamer_jax.report import open_loop_video
from dreamer_jax.world_model import open_loop_prediction, preprocess

OPENL_SEQUENCES = 6


class RunError(Exception):
    """A problem with the run's inputs, reported as one line with exit code 2."""


def make_envs(config: Config, num_envs: int, seed: int) -> VectorEnv:
    return VectorEnv(config.task, num_envs, seed, config.time_limit, config.action_repeat)


def collect_step(env, obs, prev_action, discrete):
    """The replay record of the current observation: `action` is what led to it (zeros on
    the first step of an episode), stored as uint8 one-hot for discrete actions."""
    action = np.where(obs["is_first"][:, None], 0.0, prev_action)
    return {**obs, "action": action.astype(np.uint8 if discrete else np.float32)}


class Evaluator:
    """Plays `episodes` whole episodes with the eval (mode) policy on its own envs."""

    def __init__(self, agent: Agent, env: VectorEnv):
        self.agent, self.env = agent, env

    def __call__(self, state: TrainState, episodes: int, key: jax.Array) -> list[float]:
        returns: list[float] = []
        obs = self.env.reset()
        carry = self.agent.initial_carry(self.env.num_envs)
        running = np.zeros(self.env.num_envs)
        while len(returns) < episodes:
            key, step_key = jax.random.split(key)
            action, carry = self.agent.policy_step(state, obs, carry, step_key, mode="eval")
            obs = self.env.step(np.asarray(action))
            running += obs["reward"]
            for i in np.flatnonzero(obs["is_last"]):
                returns.append(float(running[i]))
                running[i] = 0.0
        return returns[:episodes]


def train(config: Config) -> dict[str, float]:
    """Run training to `config.steps`; returns the last logged metrics."""
    logdir = pathlib.Path(config.logdir).expanduser()
    logger = Logger(
        logdir,
        config.flat(),
        wandb_mode=config.wandb.mode,
        wandb_project=config.wandb.project,
        wandb_entity=config.wandb.entity,
        run_name=f"{config.task}-{config.seed}",
        total_steps=config.steps,
        action_repeat=config.action_repeat,
    )
    config.save(logdir / "config.yaml")
    env = make_envs(config, config.envs, config.seed)
    eval_env = make_envs(config, config.eval_envs, config.seed + 1_000_000)
    agent = Agent(config, env.obs_space, env.num_actions, env.discrete)
    replay = Replay(
        logdir / "replay",
        capacity=config.replay.capacity,
        minlen=config.replay.minlen,
        length=config.dataset.length,
        batch=config.dataset.batch,
        prioritize_ends=config.replay.prioritize_ends,
        seed=config.seed,
        prefetch=config.replay.prefetch,
    )
    print(f"dreamer-jax: {config.task} on {jax.default_backend()}, logs in {logdir}", flush=True)

    init_key, act_key, eval_key, report_key = jax.random.split(jax.random.key(config.seed), 4)
    state = agent.init(init_key)
    evaluate = Evaluator(agent, eval_env)
    random_rng = np.random.default_rng(config.seed)
    dataset = replay.dataset()

    step = updates_owed = 0
    next_log, next_eval = 0, 0
    train_metrics: list[dict] = []
    episode_returns: list[float] = []
    last = {}
    running_return = np.zeros(env.num_envs)
    obs = env.reset()
    prev_action = np.zeros((env.num_envs, env.num_actions), np.float32)
    carry = agent.initial_carry(env.num_envs)
    clock = time.perf_counter()
    clock_step, clock_updates, updates = 0, 0, 0

    try:
        while step < config.steps:
            for episode in replay.add(collect_step(env, obs, prev_action, env.discrete)):
                episode_returns.append(float(episode["reward"].sum()))
            if step < config.prefill:
                action = env.random_actions(random_rng)
            else:
                act_key, step_key = jax.random.split(act_key)
                action, carry = agent.policy_step(state, obs, carry, step_key, mode="train")
                action = np.asarray(action)
            obs = env.step(action)
            prev_action = action
            running_return += obs["reward"]
            step += env.num_envs

            if step >= config.prefill:
                if updates == 0:
                    updates_owed += config.pretrain  # the official one-off pretraining
                updates_owed += config.train_steps * (
                    step // config.train_every - (step - env.num_envs) // config.train_every
                )
                while updates_owed > 0:
                    state, metrics = agent.train_step(state, next(dataset))
                    train_metrics.append(metrics)
                    updates += 1
                    updates_owed -= 1

            if step >= next_eval and updates > 0:
                next_eval = (step // config.eval_every + 1) * config.eval_every
                eval_key, episodes_key, openl_key = jax.random.split(eval_key, 3)
                returns = evaluate(state, config.eval_eps, episodes_key)
                logger.scalar("eval_return", float(np.mean(returns)))
                frames = open_loop_frames(agent, state, replay.sample(), openl_key)
                logger.video("openl", frames, step=step)

            if step >= next_log and updates > 0:
                next_log = (step // config.log_every + 1) * config.log_every
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
    finally:
        replay.close()
        logger.close()
        env.close()
        eval_env.close()
    return last


def open_loop_frames(agent: Agent, state: TrainState, batch: dict, key: jax.Array) -> np.ndarray:
    """The SPEC §6 picture for up to 6 replayed chunks, as uint8 frames `[T, 3H, n·W, C]`."""
    batch = {k: v[:OPENL_SEQUENCES] for k, v in batch.items()}
    data = preprocess(batch, agent.config)
    context = min(5, agent.config.dataset.length - 1)
    truth, prediction = jax.jit(open_loop_prediction, static_argnums=(0, 4))(
        agent.world_model, state.wm_params, data, key, context
    )
    return open_loop_video(np.asarray(truth), np.asarray(prediction))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = load_config(argv)
        if not config.logdir:
            raise ConfigError("--logdir is required (where metrics, checkpoints and replay go)")
        if config.jit:
            train(config)
        else:
            with jax.disable_jit():
                train(config)
    except (ConfigError, UnknownTaskError, LogdirError, ReplayDirectoryError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
