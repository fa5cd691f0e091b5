"""`dreamer_jax.load`: a run's agent and newest checkpoint, read-only."""

import chex
import jax
import numpy as np
import pytest
from helpers import tiny_config

import dreamer_jax
from dreamer_jax.api import load, make_agent
from dreamer_jax.checkpoint import Checkpointer, CheckpointError
from dreamer_jax.config import ConfigError
from dreamer_jax.envs import VectorEnv
from dreamer_jax.seeds import seed_config, stack


def _files(logdir):
    return {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder as train.py leaves it, without the training: config.yaml and checkpoints
    at steps 3 and 7 of two different states. Returns `(logdir, state at step 7)`."""
    logdir = tmp_path_factory.mktemp("api") / "run"
    config = tiny_config(logdir=str(logdir))
    logdir.mkdir()
    config.save(logdir / "config.yaml")
    agent = make_agent(config)
    checkpointer = Checkpointer(logdir / "checkpoints")
    for step, seed in ((3, 1), (7, 2)):
        state = agent.init(jax.random.key(seed)).replace(updates=jax.numpy.int32(step))
        checkpointer.save(step, stack([state]), {"step": step})  # a single run: one seed
    checkpointer.close()
    return logdir, state


def test_load_gives_the_newest_checkpoint_ready_to_act(saved_run):
    logdir, newest = saved_run
    before = _files(logdir)
    run = dreamer_jax.load(str(logdir))
    assert run.step == 7 and run.config.task == "classic_cartpole"
    assert run.config == tiny_config(logdir=str(logdir))
    chex.assert_trees_all_equal(jax.random.key_data(run.state.key), jax.random.key_data(newest.key))
    chex.assert_trees_all_equal(run.state.replace(key=None), newest.replace(key=None))
    env = VectorEnv(run.config.task, 2, seed=0)
    obs = env.reset()
    action, _ = run.agent.policy_step(
        run.state, obs, run.agent.initial_carry(2), jax.random.key(0), mode="eval"
    )
    env.close()
    chex.assert_shape(action, (2, env.num_actions))
    np.testing.assert_array_equal(np.sum(action, -1), 1.0)  # one-hot
    assert _files(logdir) == before


def test_a_checkpoint_from_before_the_first_update_loads_with_a_warning(tmp_path):
    """A run loaded during its prefill has only its step-0 checkpoint: untrained, said so."""
    config = tiny_config(logdir=str(tmp_path))
    config.save(tmp_path / "config.yaml")
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(0, stack([make_agent(config).init(jax.random.key(0))]), {"step": 0})
    checkpointer.close()
    with pytest.warns(UserWarning, match="step 0.* before the first update, so the agent is"):
        assert dreamer_jax.load(tmp_path).step == 0


def test_package_attribute_is_the_api_function():
    assert dreamer_jax.load is load
    assert "load" in dir(dreamer_jax)  # tab completion finds the lazy attribute
    with pytest.raises(AttributeError, match="no attribute 'lode'"):
        dreamer_jax.lode  # noqa: B018


def test_no_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml not found: is .* a dreamer-jax run\?$"):
        load(tmp_path)
    with pytest.raises(ConfigError, match=r"missing does not exist$"):  # a typo in the path
        load(tmp_path / "missing")


def test_no_checkpoints_is_one_line_and_creates_nothing(saved_run, tmp_path):
    logdir, _ = saved_run
    (tmp_path / "config.yaml").write_bytes((logdir / "config.yaml").read_bytes())
    with pytest.raises(CheckpointError, match=f"^no checkpoints in {tmp_path}$"):
        load(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_checkpoint_of_other_sizes_is_one_line(saved_run, tmp_path):
    logdir, _ = saved_run
    tiny_config(logdir=str(tmp_path), **{"rssm.deter": 40}).save(tmp_path / "config.yaml")
    (tmp_path / "checkpoints").symlink_to(logdir / "checkpoints")
    with pytest.raises(CheckpointError, match="other network sizes") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


def test_each_seed_of_a_many_seed_run_loads_from_its_folder(tmp_path, monkeypatch):
    """A `--num_seeds 3 --seed 4` run: checkpoints hold all seeds; `seed_<s>/` holds the
    config of the single run it is. Loading a seed folder gives that seed's state."""
    config = tiny_config(logdir=str(tmp_path), seed=4, num_seeds=3)
    config.save(tmp_path / "config.yaml")
    for seed in (4, 5, 6):
        (tmp_path / f"seed_{seed}").mkdir()
        seed_config(config, seed, tmp_path / f"seed_{seed}").save(
            tmp_path / f"seed_{seed}" / "config.yaml"
        )
    agent = make_agent(config)
    states = [agent.init(jax.random.key(k)) for k in (10, 11, 12)]
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(5, stack(states), {"step": 5})
    checkpointer.close()

    run = load(tmp_path / "seed_5")
    assert run.step == 5 and run.config.seed == 5 and run.config.num_seeds == 1
    chex.assert_trees_all_equal(run.state.replace(key=None), states[1].replace(key=None))
    monkeypatch.chdir(tmp_path / "seed_6")  # "." has no folder name to find the seed by
    chex.assert_trees_all_equal(load(".").state.replace(key=None), states[2].replace(key=None))
    with pytest.raises(CheckpointError, match=r"holds seeds 4, 5, 6; load one, e\.g\. .*seed_4$"):
        load(tmp_path)
