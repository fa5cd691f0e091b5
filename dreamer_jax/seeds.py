"""The seed axis: N independent runs of one config trained as one program.

Seed `s = config.seed + i` is index `i` of a leading axis on every array of the run: the
`TrainState`, the batch `[N, B, T, ...]`, the observations `[N, E, ...]` of its `E` envs,
the PRNG keys `[N]`. A single run is the same code path with N = 1 (whose program
`agent.over_seeds` leaves unbatched). The axis is split over the local devices
(`seed_sharding`); seeds never exchange data, so several hosts need no communication: give
each host its own `--seed` range.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dreamer_jax.config import Config, load_run_config

SEED_AXIS = "seed"


def run_seeds(config: Config) -> list[int]:
    """The seeds of the run: `seed, seed + 1, …, seed + num_seeds − 1`."""
    return [config.seed + i for i in range(config.num_seeds)]


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Seed `seed`'s init, acting and evaluation keys, the same in every run of that seed."""
    init_key, act_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, act_key, eval_key


# A seed's env seeds: its training envs take the seed itself, the evaluation envs of a run
# these offsets from it (train's periodic evaluation; `dreamer_jax.eval`'s own episodes).
TRAIN_EVAL_SEED_OFFSET = 1_000_000
EVAL_PROGRAM_SEED_OFFSET = 2_000_000

# A seed's host-side numpy streams, one per purpose: `Replay(seed=s)` draws its training
# batches from `default_rng(s)`, so the others are seeded `[s, n]`, never `s` alone.
HOST_STREAMS = {"report": 1, "random_actions": 2}


def host_rng_state(seed: int, stream: str) -> dict[str, Any]:
    """The starting `bit_generator.state` of seed `seed`'s numpy stream `stream` (one of
    `HOST_STREAMS`), for `np.random.default_rng().bit_generator.state = ...`."""
    return np.random.default_rng([seed, HOST_STREAMS[stream]]).bit_generator.state


def init_keys(config: Config) -> jax.Array:
    """The init keys `[N]` of the run's seeds (for `Agent.init_seeds`)."""
    return jnp.stack([seed_keys(seed)[0] for seed in run_seeds(config)])


def seed_logdir(logdir: pathlib.Path, config: Config, seed: int) -> pathlib.Path:
    """Where seed `seed` keeps what a single run keeps (config, metrics, events, replay):
    the logdir itself for a single run, `<logdir>/seed_<s>` with several seeds."""
    return logdir if config.num_seeds == 1 else logdir / f"seed_{seed}"


def enclosing_run(folder: pathlib.Path) -> tuple[pathlib.Path, Config] | None:
    """`(run folder, run config)` of the many-seed run whose seed folder `folder` is (a
    `<run>/seed_<s>` of one of its seeds, with the checkpoints in `<run>`), else None."""
    folder = pathlib.Path(os.path.abspath(folder))  # "." inside a seed folder has no name
    parent = folder.parent
    if (
        not folder.name.startswith("seed_")
        or (folder / "checkpoints").is_dir()
        or not (parent / "config.yaml").is_file()
    ):
        return None
    config = load_run_config(parent / "config.yaml")
    if config.num_seeds > 1 and folder.name in [f"seed_{s}" for s in run_seeds(config)]:
        return parent, config
    return None


def seed_config(config: Config, seed: int, logdir: pathlib.Path) -> Config:
    """The config of a single run with `--seed seed`: what seed `seed` of `config` is."""
    return config.update({"seed": seed, "num_seeds": 1, "logdir": str(logdir)})


def stack(trees: Sequence[Any]) -> Any:
    """One tree with a leading seed axis from a tree per seed (jax or numpy leaves)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def select(tree: Any, index: int) -> Any:
    """Seed `index`'s slice of a tree with a leading seed axis."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def policy_inputs(obs: dict[str, np.ndarray], obs_key: str, num_seeds: int) -> dict:
    """What the policy reads of a pool's step, `[N·E, ...]` (seed-major rows) as
    `[N, E, ...]`: the observation and `is_first`."""
    return {k: obs[k].reshape(num_seeds, -1, *obs[k].shape[1:]) for k in (obs_key, "is_first")}


def seed_sharding(num_seeds: int) -> jax.sharding.NamedSharding:
    """Splits the seed axis over the largest number of local devices that divides
    `num_seeds` (all of them when N is a multiple of the device count)."""
    devices = jax.local_devices()
    count = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
    mesh = jax.sharding.Mesh(np.asarray(devices[:count]), (SEED_AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(SEED_AXIS))


def seeds_text(seeds: list[int]) -> str:
    """'seed 3', 'seeds 3, 4, 5' or, past five (they are consecutive), 'seeds 3-1026 (1024)'."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if len(seeds) <= 5:
        return f"seeds {', '.join(map(str, seeds))}"
    return f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)})"
