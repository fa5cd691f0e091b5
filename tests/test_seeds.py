"""The seed axis: seed lists, folders, configs, stacking, and the split over devices."""

import os
import pathlib
import re
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from helpers import tiny_config

from dreamer_jax.seeds import (
    init_keys,
    policy_inputs,
    run_seeds,
    seed_config,
    seed_keys,
    seed_logdir,
    seed_sharding,
    seeds_text,
    select,
    stack,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_seeds_folders_and_configs():
    config = tiny_config(seed=7, num_seeds=3)
    assert run_seeds(config) == [7, 8, 9]
    logdir = pathlib.Path("/runs/pong")
    assert seed_logdir(logdir, config, 8) == logdir / "seed_8"
    assert seed_logdir(logdir, tiny_config(seed=8), 8) == logdir  # a single run: the logdir
    single = seed_config(config, 8, logdir / "seed_8")
    assert single == tiny_config(seed=8, logdir="/runs/pong/seed_8")


def test_seed_keys_do_not_depend_on_the_other_seeds():
    keys = jax.random.key_data(init_keys(tiny_config(seed=4, num_seeds=3)))
    alone = jax.random.key_data(init_keys(tiny_config(seed=5)))
    np.testing.assert_array_equal(keys[1:2], alone)
    init, act, evaluation = (jax.random.key_data(k) for k in seed_keys(5))
    assert len({init.tobytes(), act.tobytes(), evaluation.tobytes()}) == 3


def test_stack_select_and_policy_inputs():
    trees = [{"a": np.full(2, i), "b": (np.full((1, 3), 10 * i),)} for i in range(3)]
    stacked = stack(trees)
    chex.assert_shape(stacked["b"][0], (3, 1, 3))
    chex.assert_trees_all_equal(select(stacked, 2), trees[2])
    obs = {"image": np.arange(6)[:, None] * np.ones((6, 4)), "is_first": np.arange(6) % 2 == 0}
    obs["reward"] = np.zeros(6)
    inputs = policy_inputs(obs, "image", num_seeds=2)
    assert set(inputs) == {"image", "is_first"}
    np.testing.assert_array_equal(inputs["image"][1, :, 0], [3, 4, 5])  # seed-major rows


def test_one_device_holds_every_seed():
    assert seed_sharding(5).mesh.size == 1


SHARDED = """
import jax, numpy as np
from dreamer_jax.seeds import seed_sharding
assert jax.local_device_count() == 4
for n in (8, 4, 6, 3, 5):
    sharding = seed_sharding(n)
    x = jax.device_put(np.arange(n * 2.0).reshape(n, 2), sharding)
    print(n, sharding.mesh.size, len({s.device for s in x.addressable_shards}))
"""


def _four_devices() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")


def test_seed_axis_splits_over_the_devices_that_divide_it():
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], cwd=ROOT, env=_four_devices(), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:5] == ["8 4 4", "4 4 4", "6 3 3", "3 3 3", "5 1 1"]


RESTORED = """
import pathlib, sys, jax
from dreamer_jax import train
from dreamer_jax.api import make_agent
from dreamer_jax.checkpoint import Checkpointer
from dreamer_jax.config import make_config
from dreamer_jax.seeds import seed_sharding
logdir = pathlib.Path(sys.argv[1])
config = make_config(["classic", "debug"], {"task": "classic_cartpole", "num_seeds": 4})
agent, sharding = make_agent(config), seed_sharding(4)
checkpointer = Checkpointer(logdir / "checkpoints", keep=2)
for fresh in (True, False):
    states, loop, resumed = train._restore(config, agent, logdir, checkpointer, [], sharding)
    print(resumed, *{len(leaf.devices()) for leaf in jax.tree.leaves(states)})
    checkpointer.save(0, states, loop)
checkpointer.close()
"""


def test_the_states_are_built_and_restored_split_over_the_devices(tmp_path):
    """Fresh or restored, each seed's state is on its own device from the start (review:
    all N seeds were built, and restored, on the first device, then moved: a run that fits
    the devices together could run out of memory on the first)."""
    result = subprocess.run(
        [sys.executable, "-c", RESTORED, str(tmp_path)], cwd=ROOT, env=_four_devices(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("True", "False"))]
    assert lines == ["False 4", "True 4"]


@pytest.mark.slow
def test_four_seeds_on_four_devices_train_as_on_one(tmp_path):
    """The real CLI with the seed axis split over 4 (forced host) devices: the same metrics
    as on one device, within float rounding, and no program of the run exchanges data
    between devices (seeds are independent; an eager index into the sharded states once
    compiled to an all-reduce, whose rendezvous could stall the run on a busy CPU)."""
    args = [
        sys.executable, "-m", "dreamer_jax.train", "--configs", "classic", "debug",
        "--task", "classic_cartpole", "--num_seeds", "4", "--steps", "500",
        "--prefill", "300", "--log_every", "250", "--eval_every", "500",
        "--wandb.mode", "disabled",
    ]  # fmt: skip
    rows = {}
    hlo = tmp_path / "hlo"
    four = _four_devices()
    four["XLA_FLAGS"] += f" --xla_dump_to={hlo} --xla_dump_hlo_as_text"
    for name, env in (("one", dict(os.environ)), ("four", four)):
        logdir = tmp_path / name
        result = subprocess.run(
            [*args, "--logdir", str(logdir)], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        devices = "4 device(s)" if name == "four" else "1 device(s)"
        assert devices in result.stdout
        from dreamer_jax.logger import read_metrics

        rows[name] = [read_metrics(logdir / f"seed_{s}" / "metrics.jsonl") for s in range(4)]
    for one, four in zip(rows["one"], rows["four"], strict=True):
        assert [r["step"] for r in one] == [r["step"] for r in four] and one
        for a, b in zip(one, four, strict=True):
            for key in ("model_loss", "actor_loss", "critic_loss", "eval_return"):
                if key in a:
                    np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=key)
            assert a.get("train_return") == b.get("train_return")
    programs = list(hlo.glob("*after_optimizations.txt"))
    assert any("_train_step" in p.name for p in programs)
    collectives = re.compile(r"all-reduce|all-gather|all-to-all|reduce-scatter|collective-")
    assert [p.name for p in programs if collectives.search(p.read_text())] == []


def test_the_startup_line_names_many_seeds_as_a_range():
    assert seeds_text([7]) == "seed 7"
    assert seeds_text([3, 4, 5, 6, 7]) == "seeds 3, 4, 5, 6, 7"
    assert seeds_text(list(range(3, 1027))) == "seeds 3-1026 (1024)"
