"""Checkpoint round trip, corrupt-checkpoint fallback and exact learner resume."""

import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
from helpers import structured_batch, vector_agent

from dreamer_jax.checkpoint import Checkpointer, CheckpointError

TESTS = pathlib.Path(__file__).resolve().parent


def _host(state):
    return jax.device_get(state.replace(key=jax.random.key_data(state.key)))


def _batch(agent, index):
    return structured_batch(agent.config.dataset.batch, agent.config.dataset.length, seed=index)


def test_full_state_round_trip(tmp_path):
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    state, _ = agent.train_step(state, _batch(agent, 0))
    loop = {"step": 10, "replay_rng": {"state": {"state": 2**100, "inc": 3}}, "keys": [1, 2]}
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    checkpointer.save(10, state, loop)
    step, restored, restored_loop = checkpointer.restore_latest(agent.init(jax.random.key(9)))
    assert step == 10 and restored_loop == loop
    chex.assert_trees_all_equal(_host(restored), _host(state))
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)


def test_keeps_last_k_and_falls_back_from_a_corrupt_latest(tmp_path):
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, state.replace(updates=state.updates + step), {"step": step})
    assert checkpointer.steps() == [2, 3]
    # Truncate every file of the latest checkpoint's state.
    damaged = [p for p in (tmp_path / "ckpt" / "3" / "state").rglob("*") if p.is_file()]
    for path in damaged:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        step, restored, loop = Checkpointer(tmp_path / "ckpt").restore_latest(state)
    assert step == 2 and loop == {"step": 2} and int(restored.updates) == 2
    assert all(path.exists() for path in damaged)  # nothing deleted


def test_unwritable_checkpoint_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        Checkpointer(blocker / "ckpt")


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, jax, numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import structured_batch, vector_agent
    from dreamer_jax.checkpoint import Checkpointer
    agent = vector_agent()
    c = agent.config
    ckpt = Checkpointer({ckpt!r})
    state = agent.init(jax.random.key(0))
    start = 0
    if ckpt.steps():
        start, state, _ = ckpt.restore_latest(state)
    for i in range(start, start + {n}):
        state, _ = agent.train_step(
            state, structured_batch(c.dataset.batch, c.dataset.length, seed=i)
        )
    ckpt.save(start + {n}, state, {{}})
    leaves = jax.tree.leaves(jax.device_get(state.replace(key=jax.random.key_data(state.key))))
    np.savez({out!r}, *leaves)
    """
)


def test_interrupted_and_resumed_learner_is_bit_identical(tmp_path):
    """N updates, checkpoint, restore in a fresh process, N more == 2N uninterrupted."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(ckpt, n, out):
        script = RESUME_SCRIPT.format(tests=str(TESTS), ckpt=str(ckpt), n=n, out=str(out))
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        with np.load(out) as data:
            return [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]

    run(tmp_path / "split", 3, tmp_path / "first.npz")
    resumed = run(tmp_path / "split", 3, tmp_path / "resumed.npz")
    straight = run(tmp_path / "straight", 6, tmp_path / "straight.npz")
    assert len(resumed) == len(straight)
    for a, b in zip(resumed, straight, strict=True):
        np.testing.assert_array_equal(a, b)
