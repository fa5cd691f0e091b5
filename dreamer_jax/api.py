"""A run's agent, loaded for use in Python, read-only.

    run = dreamer_jax.load("runs/cartpole/0")
    carry = run.agent.initial_carry(1)
    action, carry = run.agent.policy_step(run.state, obs, carry, key, mode="eval")

`python -m dreamer_jax.eval` plays whole episodes with it.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax

from dreamer_jax.agent import Agent, TrainState
from dreamer_jax.checkpoint import Checkpointer, CheckpointError
from dreamer_jax.config import Config, load_run_config
from dreamer_jax.envs import VectorEnv


class LoadedRun(NamedTuple):
    """A run's agent, the `TrainState` of its newest checkpoint that restores, that
    checkpoint's step and the run's config."""

    agent: Agent
    state: TrainState
    config: Config
    step: int


def make_agent(config: Config) -> Agent:
    """The agent of `config`, with the observation and action spaces of one env of its task."""
    env = VectorEnv(config.task, 1, config.seed, config.time_limit, config.action_repeat)
    try:
        return Agent(config, env.obs_space, env.num_actions, env.discrete)
    finally:
        env.close()


def load(logdir: str | pathlib.Path) -> LoadedRun:
    """The run in `logdir` (`config.yaml` and `checkpoints/`) at its newest checkpoint that
    restores, ready for `agent.policy_step`. Writes nothing, so a run still training can be
    loaded. Raises `ConfigError` (no or bad `config.yaml`), `CheckpointError` (no checkpoint
    restores, or its shapes differ from the config's) or `UnknownTaskError`: one line each."""
    logdir = pathlib.Path(logdir).expanduser()
    config = load_run_config(logdir / "config.yaml")
    directory = logdir / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {logdir}")
    agent = make_agent(config)
    # Only its structure is used, as the template that restoring fills in.
    template = agent.init(jax.random.key(0))
    checkpointer = Checkpointer(directory, keep=config.checkpoint_keep, read_only=True)
    try:
        restored = checkpointer.restore_latest(template)
    finally:
        checkpointer.close()
    if restored is None:
        raise CheckpointError(f"no checkpoint in {directory} could be restored")
    step, state, _ = restored
    return LoadedRun(agent, state, config, step)
