"""Evaluate a trained run from its latest checkpoint, read-only.

    python -m dreamer_jax.eval --logdir runs/atari_pong/0 --episodes 10 [--video] [--seed 123]

Loads `<logdir>/config.yaml` and the newest checkpoint that restores, plays `episodes` whole
episodes with the eval (mode) policy on fresh environments, and prints the mean and std of
the returns (and one JSON line for scripts). Never writes to the checkpoints or the replay;
with `--video` it writes `<logdir>/eval_<step>.gif` of the first episode of env 0.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import yaml

from dreamer_jax.agent import Agent
from dreamer_jax.checkpoint import Checkpointer
from dreamer_jax.config import ConfigError, make_config
from dreamer_jax.envs import VectorEnv
from dreamer_jax.logger import save_gif


def play(agent, env, state, episodes, key, record_video):
    """Returns of `episodes` episodes and, if asked, uint8 frames of env 0's first one."""
    returns, frames = [], []
    obs = env.reset()
    carry = agent.initial_carry(env.num_envs)
    running = np.zeros(env.num_envs)
    recording = record_video and "image" in obs
    while len(returns) < episodes:
        if recording:
            frames.append(obs["image"][0])
        key, step_key = jax.random.split(key)
        action, carry = agent.policy_step(state, obs, carry, step_key, mode="eval")
        obs = env.step(np.asarray(action))
        running += obs["reward"]
        if obs["is_last"][0]:
            recording = False
        for i in np.flatnonzero(obs["is_last"]):
            returns.append(float(running[i]))
            running[i] = 0.0
    return returns[:episodes], frames


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--envs", type=int, default=1)
    parser.add_argument(
        "--seed", type=int, default=None, help="env/policy seed (default: run seed + 2e6)"
    )
    parser.add_argument("--video", action="store_true")
    args = parser.parse_args(argv)
    logdir = pathlib.Path(args.logdir)
    try:
        config_path = logdir / "config.yaml"
        if not config_path.exists():
            raise ConfigError(f"{config_path} not found: is {logdir} a dreamer-jax run?")
        config = make_config([], yaml.safe_load(config_path.read_text()))
        checkpoints = logdir / "checkpoints"
        if not checkpoints.is_dir():
            raise ConfigError(f"no checkpoints in {logdir}")
        seed = config.seed + 2_000_000 if args.seed is None else args.seed
        env = VectorEnv(config.task, args.envs, seed, config.time_limit, config.action_repeat)
        agent = Agent(config, env.obs_space, env.num_actions, env.discrete)
        template = agent.init(jax.random.key(0))
        restored = Checkpointer(checkpoints, keep=config.checkpoint_keep, read_only=True)
        restored = restored.restore_latest(template)
        if restored is None:
            raise ConfigError(f"no checkpoint in {checkpoints} could be restored")
    except (ConfigError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    step, state, _ = restored
    returns, frames = play(
        agent, env, state, args.episodes, jax.random.key(seed), record_video=args.video
    )
    env.close()
    mean, std = float(np.mean(returns)), float(np.std(returns))
    print(f"{config.task} step {step}: return {mean:.2f} ± {std:.2f} over {len(returns)} episodes")
    if frames:
        path = logdir / f"eval_{step}.gif"
        save_gif(path, np.stack(frames))
        print(f"video: {path}")
    print(json.dumps({"step": step, "episodes": len(returns), "mean": mean, "std": std,
                      "returns": returns}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
