"""Evaluate a trained run from its latest checkpoint, read-only.

    python -m dreamer_jax.eval --logdir runs/atari_pong/0 --episodes 10 [--video] [--seed 123]

Loads `<logdir>/config.yaml` and the newest checkpoint that restores, plays `episodes` whole
episodes with the eval (mode) policy on fresh environments, and prints the mean and std of
the returns (and one JSON line for scripts). Never writes to the checkpoints or the replay;
with `--video` it writes `<logdir>/eval_<step>_seed<eval seed>.gif` of the first episode of env 0
(one file per eval seed: an evaluation with another `--seed` keeps the earlier one's).
"""

from __future__ import annotations

if __name__ == "__main__":  # a program: set up XLA:CPU as training does before jax is imported
    from dreamer_jax.startup import prepare, quit_on_signals

    quit_on_signals()
    prepare()

import argparse
import json
import pathlib
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from dreamer_jax import __version__
from dreamer_jax.api import load
from dreamer_jax.checkpoint import CheckpointError
from dreamer_jax.config import MAX_SEED, ConfigError, OneLineParser, program_name, warn_in_one_line
from dreamer_jax.envs import UnknownTaskError
from dreamer_jax.logger import save_gif
from dreamer_jax.seeds import EVAL_PROGRAM_SEED_OFFSET, policy_inputs
from dreamer_jax.startup import quiet_on_broken_pipe


class Evaluation(NamedTuple):
    """Returns and lengths (policy steps) of the evaluated episodes, env-major and in episode
    order within an env, and uint8 frames `[H, W, C]` of env 0's first episode if recorded."""

    returns: list[float]
    lengths: list[int]
    frames: list[np.ndarray]


def episode_shares(episodes: int, num_envs: int) -> list[int]:
    """How many episodes each env plays: `episodes` split as evenly as possible, lower envs
    first (5 over 3 envs -> [2, 2, 1])."""
    return [episodes // num_envs + (i < episodes % num_envs) for i in range(num_envs)]


def evaluate(
    agent, env, states, episodes: int, keys: jax.Array, record_video=False, max_frames=None,
    stop: Callable[[], bool] = lambda: False,
) -> list[Evaluation] | None:  # fmt: skip
    """Play `episodes` whole episodes per seed with the eval (mode) policy: `states` and
    `keys` have a leading seed axis `[N]`, and `env` holds N equal groups of envs, group i
    seed i's (`VectorEnv` with a list of seeds). Returns one `Evaluation` per seed.

    Each env plays its fixed share of its seed's episodes from reset, so the result does not
    favour short episodes the way keeping the first ones to finish would. A seed's envs step
    together until its last share is done (an env whose share is done keeps running, its
    further episodes ignored), then stop, so seed i's result and env streams are those of a
    single run of seed i. Each key is split once per policy step. `record_video` keeps the
    frames of each seed's first env's first episode (image tasks), at most `max_frames`.
    Returns None, unfinished, as soon as `stop()` is true (checked before each policy step):
    an Atari evaluation can take minutes, longer than a scheduler waits after its signal.
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    num_seeds = keys.shape[0]
    per_seed = env.num_envs // num_seeds
    shares = episode_shares(episodes, per_seed) * num_seeds  # env-major over all seeds
    returns: list[list[float]] = [[] for _ in shares]
    lengths: list[list[int]] = [[] for _ in shares]
    frames: list[list[np.ndarray]] = [[] for _ in range(num_seeds)]
    obs = env.reset()
    # Placed like the keys (and the states): the jitted policy then compiles once.
    carry = jax.device_put(agent.initial_carry(per_seed, num_seeds), keys.sharding)
    running = np.zeros(env.num_envs)
    steps = np.zeros(env.num_envs, int)
    firsts = np.arange(num_seeds) * per_seed  # each seed's first env
    recording = np.full(num_seeds, record_video and "image" in obs)

    def seeds_done() -> np.ndarray:
        done = [len(r) >= share for r, share in zip(returns, shares, strict=True)]
        return np.asarray(done).reshape(num_seeds, per_seed).all(1)

    while not (done := seeds_done()).all():
        if stop():
            return None
        for i in np.flatnonzero(recording):
            frames[i].append(obs["image"][firsts[i]])
            recording[i] = max_frames is None or len(frames[i]) < max_frames
        inputs = policy_inputs(obs, agent.obs_key, num_seeds)
        action, carry, keys = agent.act_seeds(states, inputs, carry, keys, mode="eval")
        active = np.repeat(~done, per_seed)
        obs = env.step(np.asarray(action).reshape(env.num_envs, -1), active)
        running += obs["reward"]
        # A first step is the env's reset, not a transition of the episode.
        steps = np.where(obs["is_first"], 0, steps + active)
        recording &= ~obs["is_last"][firsts]
        for i in np.flatnonzero(obs["is_last"]):
            if len(returns[i]) < shares[i]:
                returns[i].append(float(running[i]))
                lengths[i].append(int(steps[i]))
            running[i] = 0.0
    return [
        Evaluation(
            sum(returns[i * per_seed : (i + 1) * per_seed], []),
            sum(lengths[i * per_seed : (i + 1) * per_seed], []),
            frames[i],
        )
        for i in range(num_seeds)
    ]


class EvalError(ValueError):
    """A bad argument or run directory. The message is one line."""


@quiet_on_broken_pipe
def main(argv=None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = warn_in_one_line  # e.g. a checkpoint skipped: one line
        return _main(argv)


def _main(argv) -> int:
    parser = OneLineParser(
        error=EvalError,
        prog=program_name("dreamer_jax.eval"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--logdir", help="the run (config.yaml, checkpoints/)")
    # As dreamer-analyze and dreamer-sweep take their folder: `dreamer-eval runs/pong/0`.
    parser.add_argument("run", nargs="?", metavar="LOGDIR", help="the same as --logdir")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to play (default: 10)")
    parser.add_argument(
        "--envs", type=int, default=1, help="parallel envs sharing the episodes (default: 1)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="env/policy seed (default: run seed + 2e6)"
    )
    parser.add_argument(
        "--video",
        action="store_true",
        help="write <logdir>/eval_<step>_seed<seed>.gif (image tasks)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    try:
        args = parser.parse_args(argv)
        if (args.logdir is None) == (args.run is None):
            raise EvalError("name the run once: --logdir DIR, or DIR alone")
        logdir = pathlib.Path(args.logdir if args.logdir is not None else args.run)
        for name in ("episodes", "envs"):
            if getattr(args, name) < 1:
                raise EvalError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.seed is not None and not 0 <= args.seed <= MAX_SEED:  # as train's --seed
            raise EvalError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
        run = load(logdir)
    # Only the errors of bad input: a bug in the code keeps its traceback.
    except (ConfigError, CheckpointError, EvalError, UnknownTaskError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config, step = run.config, run.step
    seed = config.seed + EVAL_PROGRAM_SEED_OFFSET if args.seed is None else args.seed
    result = run.evaluate(args.episodes, seed, args.envs, args.video)
    returns = result.returns
    mean, std = float(np.mean(returns)), float(np.std(returns))
    print(
        f"{config.task} seed {config.seed} step {step}: return {mean:.2f} ± {std:.2f} over "
        f"{len(returns)} episodes (eval seed {seed})"
    )
    if result.frames:
        path = logdir / f"eval_{step}_seed{seed}.gif"
        save_gif(path, np.stack(result.frames))
        print(f"video: {path}")
    elif args.video:
        print(f"video: none, {config.task} has no image observations")
    print(json.dumps({"seed": config.seed, "eval_seed": seed, "step": step,
                      "episodes": len(returns),
                      "mean": mean, "std": std,
                      "returns": returns, "lengths": result.lengths}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
