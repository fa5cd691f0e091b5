import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import NUM_ACTIONS, structured_batch, tiny_config, vector_agent


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def _is_key(x):
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def test_two_hundred_updates_reduce_model_loss_without_retracing():
    agent = vector_agent()
    config = agent.config
    state = agent.init(jax.random.key(0))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    losses = []
    for _ in range(200):
        state, metrics = agent.train_step(state, batch)
        losses.append(float(metrics["model_loss"]))
    assert agent.train_step._cache_size() == 1  # compiled once, never retraced
    for name, value in metrics.items():
        assert np.isfinite(value), name
    # Gaussian NLLs carry a constant 0.5·log(2π) per dimension (4 observation + 1 reward)
    # that no model can remove; compare what is left above it.
    floor = 5 * 0.5 * np.log(2 * np.pi)
    first, last = np.mean(losses[:5]) - floor, np.mean(losses[-5:]) - floor
    assert last < 0.5 * first, (first, last)
    assert int(state.updates) == 200 and int(state.nonfinite_total) == 0
    for key in ("vector_loss", "reward_loss", "discount_loss", "kl", "actor_loss",
                "critic_loss", "actor_entropy", "model_grad_norm"):  # fmt: skip
        assert key in metrics, key


def test_jit_and_disable_jit_agree():
    # Small sizes: without jit every op runs eagerly.
    agent = vector_agent(
        tiny_config(**{"dataset.batch": 2, "dataset.length": 3, "imag_horizon": 2})
    )
    batch = structured_batch(2, 3)
    # The same initial state for both (init is not under test; eager init is slow).
    initial = _host(agent.init(jax.random.key(1)))
    fresh = lambda: initial.replace(key=jax.random.wrap_key_data(initial.key))
    jitted_state, jitted = agent.train_step(jax.tree.map(jax.numpy.asarray, fresh()), batch)
    with jax.disable_jit():
        eager_state, eager = agent._train_step(fresh(), batch)
    for name in jitted:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=2e-4, atol=2e-5, err_msg=name)
    chex.assert_trees_all_close(
        _host(jitted_state.wm_params), _host(eager_state.wm_params), rtol=1e-4, atol=1e-6
    )


def test_nonfinite_update_is_skipped_and_counted():
    agent = vector_agent()
    config = agent.config
    state = agent.init(jax.random.key(2))
    good = structured_batch(config.dataset.batch, config.dataset.length)
    state, _ = agent.train_step(state, good)
    before = _host(state)
    bad = dict(good, reward=np.full_like(good["reward"], np.nan))
    state, metrics = agent.train_step(state, bad)
    assert metrics["nonfinite"] == 1.0 and int(state.nonfinite_streak) == 1
    after = _host(state)
    for name in ("wm_params", "actor_params", "critic_params", "wm_opt_state", "updates"):
        chex.assert_trees_all_equal(getattr(before, name), getattr(after, name))
    assert not np.array_equal(before.key, after.key)  # the key still moves on
    state, metrics = agent.train_step(state, good)
    assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1
    assert int(state.updates) == 2


def test_slow_critic_copied_every_hundred_updates():
    agent = vector_agent(tiny_config(slow_target_update=3))
    config = agent.config
    state = agent.init(jax.random.key(3))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    critic_before = {}
    for step in range(7):
        critic_before[step] = _host(state.critic_params)
        state, _ = agent.train_step(state, batch)
        slow = _host(state.slow_critic_params)
        # Updated at the start of updates 0, 3, 6 from the critic as it was before them.
        expected_source = critic_before[step - step % 3]
        chex.assert_trees_all_equal(slow, expected_source)


def test_policy_step_modes_and_reset():
    agent = vector_agent()
    state = agent.init(jax.random.key(4))
    carry = agent.initial_carry(5)
    obs = {"vector": np.ones((5, 4), np.float32), "is_first": np.ones(5, bool)}
    action, carry = agent.policy_step(state, obs, carry, jax.random.key(5), mode="train")
    chex.assert_shape(action, (5, NUM_ACTIONS))
    np.testing.assert_allclose(action.sum(-1), 1.0, atol=1e-6)
    # Eval takes the actor's mode; the latent is still sampled (as the official code), so the
    # same key gives the same action and the action is the argmax of the policy.
    eval_a, _ = agent.policy_step(state, obs, carry, jax.random.key(6), mode="eval")
    eval_b, _ = agent.policy_step(state, obs, carry, jax.random.key(6), mode="eval")
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(eval_a.sum(-1), 1.0)
    with pytest.raises(ValueError, match="mode"):
        agent.policy_step(state, obs, carry, jax.random.key(8), mode="explore")


def test_bf16_computes_in_bf16_with_fp32_params():
    agent = vector_agent(tiny_config(precision="bf16"))
    state = agent.init(jax.random.key(5))
    config = agent.config
    state, metrics = agent.train_step(
        state, structured_batch(config.dataset.batch, config.dataset.length)
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.wm_params))
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["model_loss"].dtype == jnp.float32


def test_continuous_actions_use_dynamics_backprop():
    config = tiny_config()
    from dreamer_jax.agent import Agent

    agent = Agent(config, {"vector": ((4,), np.float32)}, 2, discrete=False)
    assert agent.actor_grad == "dynamics"
    state = agent.init(jax.random.key(6))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    batch["action"] = np.tanh(np.random.default_rng(0).normal(size=(*batch["reward"].shape, 2)))
    state, metrics = agent.train_step(state, batch)
    assert np.isfinite(metrics["actor_loss"]) and metrics["actor_grad_norm"] > 0
    action, _ = agent.policy_step(
        state, {"vector": np.zeros((3, 4), np.float32), "is_first": np.ones(3, bool)},
        agent.initial_carry(3), jax.random.key(7),
    )  # fmt: skip
    assert action.shape == (3, 2) and np.all(np.abs(action) <= 1)
