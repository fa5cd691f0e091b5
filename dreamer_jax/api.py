"""A run's agent, loaded for use in Python, read-only.

    run = dreamer_jax.load("runs/cartpole/0")
    env, carry = run.make_env(), run.agent.initial_carry(1)
    obs = env.reset()
    key, step_key = jax.random.split(key)  # a fresh key for every step
    action, carry = run.agent.policy_step(run.state, obs, carry, step_key, mode="eval")
    run.evaluate(episodes=10).returns  # whole episodes, as `python -m dreamer_jax.eval`

A run trained with `--num_seeds N` is loaded one seed at a time, from its folder
`<logdir>/seed_<s>`.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import TYPE_CHECKING, NamedTuple

import jax

from dreamer_jax.agent import Agent, TrainState
from dreamer_jax.checkpoint import Checkpointer, CheckpointError
from dreamer_jax.config import Config, load_run_config
from dreamer_jax.envs import VectorEnv
from dreamer_jax.seeds import (
    EVAL_PROGRAM_SEED_OFFSET,
    enclosing_run,
    init_keys,
    run_seeds,
    seeds_text,
    select,
    stack,
)

if TYPE_CHECKING:
    from dreamer_jax.eval import Evaluation


class LoadedRun(NamedTuple):
    """A run's agent, the `TrainState` of its newest checkpoint that restores, the run's
    config (a seed folder's: the single run that seed is) and that checkpoint's step."""

    agent: Agent
    state: TrainState
    config: Config
    step: int

    def make_env(self, num_envs: int = 1, seed: int = 0) -> VectorEnv:
        """`num_envs` fresh envs of the run's task, seeded `seed`, with the episode limit and
        action repeat it trained with (close it when done)."""
        config = self.config
        return VectorEnv(config.task, num_envs, seed, config.time_limit, config.action_repeat)

    def evaluate(
        self, episodes: int = 10, seed: int | None = None, num_envs: int = 1, video: bool = False
    ) -> Evaluation:
        """`episodes` whole episodes of the eval policy on `num_envs` fresh envs, exactly as
        `python -m dreamer_jax.eval` plays them with the same arguments (`seed` None: the
        run's seed + 2e6). `.returns` and `.lengths` per episode; `.frames` with `video`."""
        from dreamer_jax.eval import evaluate  # it imports this module

        seed = self.config.seed + EVAL_PROGRAM_SEED_OFFSET if seed is None else seed
        env = self.make_env(num_envs, seed)
        try:
            # One seed, on the seed axis every run uses.
            states, keys = stack([self.state]), jax.random.key(seed)[None]
            (result,) = evaluate(self.agent, env, states, episodes, keys, video)
        finally:
            env.close()
        return result


def make_agent(config: Config) -> Agent:
    """The agent of `config`, with the observation and action spaces of one env of its task."""
    env = VectorEnv(config.task, 1, config.seed, config.time_limit, config.action_repeat)
    try:
        return Agent(config, env.obs_space, env.num_actions, env.discrete)
    finally:
        env.close()


def _locate(logdir: pathlib.Path) -> tuple[pathlib.Path, Config, int, Config]:
    """`(run folder, run config, seed index, seed config)` of a run folder or of one seed
    folder (`<logdir>/seed_<s>`) of a many-seed run, whose checkpoints hold all seeds."""
    config = load_run_config(logdir / "config.yaml")
    if config.num_seeds > 1:
        seeds = run_seeds(config)
        example = logdir / f"seed_{seeds[0]}"
        raise CheckpointError(f"{logdir} holds {seeds_text(seeds)}; load one, e.g. {example}")
    run = enclosing_run(logdir)
    if run is not None:
        run_dir, run_config = run
        return run_dir, run_config, config.seed - run_config.seed, config
    return logdir, config, 0, config


def load(logdir: str | pathlib.Path) -> LoadedRun:
    """The run in `logdir` (`config.yaml` and `checkpoints/`) at its newest checkpoint that
    restores, ready for `agent.policy_step`; for a many-seed run, pass one seed's folder
    `<logdir>/seed_<s>`. Writes nothing, so a run still training can be loaded. Raises
    `ConfigError` (no or bad `config.yaml`), `CheckpointError` (no checkpoint restores, its
    shapes differ from the config's, or the folder holds several seeds) or
    `UnknownTaskError`: one line each."""
    logdir = pathlib.Path(logdir).expanduser()
    run_dir, run_config, index, config = _locate(logdir)
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {logdir}")
    agent = make_agent(run_config)
    # Only its structure is used, as the template that restoring fills in.
    template = agent.init_seeds(init_keys(run_config))
    checkpointer = Checkpointer(directory, keep=run_config.checkpoint_keep, read_only=True)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint in {directory} could be restored")
    step, states, _ = restored
    state = select(states, index)
    if int(state.updates) == 0:  # e.g. a run still in its prefill
        warnings.warn(
            f"{logdir}: its newest checkpoint (step {step}) is from before the first update, "
            "so the agent is untrained",
            stacklevel=2,
        )
    return LoadedRun(agent, state, config, step)
