import chex
import jax
import jax.numpy as jnp
import numpy as np
from helpers import tiny_config, vector_agent

from dreamer_jax.actor_critic import (
    critic_loss,
    imagination_targets,
    imagine,
    resolve_actor_grad,
)
from dreamer_jax.networks import initial_state


def _rollout(agent, state, n=6, terminal=None):
    c = agent.config
    start = initial_state(n, c.rssm.deter, c.rssm.stoch, c.rssm.discrete)
    start = start._replace(stoch=jax.nn.one_hot(jnp.zeros((n, c.rssm.stoch), int), c.rssm.discrete))
    terminal = jnp.zeros(n, bool) if terminal is None else terminal
    return imagine(
        agent.world_model, state.wm_params, agent.actor, state.actor_params,
        start, terminal, c.imag_horizon, jax.random.key(3), c,
    )  # fmt: skip


def test_imagination_shapes_weights_and_first_discount():
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    c, n, h = agent.config, 6, agent.config.imag_horizon
    terminal = jnp.array([True, False, False, False, False, False])
    seq = _rollout(agent, state, n, terminal)
    feat = c.rssm.stoch * c.rssm.discrete + c.rssm.deter
    chex.assert_shape(seq.feats, (h + 1, n, feat))
    chex.assert_shape(seq.states.stoch, (h + 1, n, c.rssm.stoch, c.rssm.discrete))
    chex.assert_shape(seq.actions, (h + 1, n, agent.num_actions))
    chex.assert_shape([seq.rewards, seq.discounts, seq.weights], (h + 1, n))
    np.testing.assert_array_equal(seq.actions[0], 0.0)
    np.testing.assert_allclose(seq.actions[1:].sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(seq.discounts[0], np.where(terminal, 0.0, c.discount))
    expected = np.cumprod(np.concatenate([np.ones((1, n)), seq.discounts[:-1]], 0), 0)
    np.testing.assert_allclose(seq.weights, expected, rtol=1e-6)
    np.testing.assert_array_equal(seq.weights[0], 1.0)
    np.testing.assert_array_equal(seq.weights[1:, 0], 0.0)  # a terminal start ends the rollout


def test_targets_and_critic_loss_match_numpy():
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    seq = _rollout(agent, state)
    values = np.random.default_rng(0).normal(size=seq.rewards.shape).astype(np.float32)
    lam = agent.config.discount_lambda
    returns = imagination_targets(seq, jnp.asarray(values), lam)
    r, d = np.asarray(seq.rewards), np.asarray(seq.discounts)
    expected = np.zeros_like(values[:-1])
    nxt = values[-1]
    for t in reversed(range(len(expected))):
        expected[t] = r[t] + d[t] * ((1 - lam) * values[t + 1] + lam * nxt)
        nxt = expected[t]
    np.testing.assert_allclose(returns, expected, rtol=1e-5, atol=1e-5)

    loss, _ = critic_loss(agent.critic, state.critic_params, seq, returns)
    v = np.asarray(agent.critic.apply(state.critic_params, seq.feats[:-1]))
    log_prob = -0.5 * (expected - v) ** 2 - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(loss, -(np.asarray(seq.weights[:-1]) * log_prob).mean(), rtol=1e-5)


def test_actor_grad_auto():
    config = tiny_config()
    assert resolve_actor_grad(config, discrete=True) == "reinforce"
    assert resolve_actor_grad(config, discrete=False) == "dynamics"
    assert resolve_actor_grad(tiny_config(actor_grad="both"), discrete=True) == "both"
