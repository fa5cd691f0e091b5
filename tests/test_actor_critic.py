import chex
import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import structured_batch, tiny_config, vector_agent

from dreamer_jax.actor_critic import (
    Imagination,
    actor_loss,
    critic_loss,
    imagination_start,
    imagination_targets,
    imagine,
    make_actor,
    resolve_actor_grad,
)
from dreamer_jax.config import ConfigError
from dreamer_jax.networks import get_feat, initial_state, straight_through_onehot
from dreamer_jax.world_model import WorldModel, observe, preprocess


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
    # Each imagined state's reward and discount are the heads' predictions for that state.
    heads = lambda method: agent.world_model.apply(state.wm_params, seq.feats, method=method)
    np.testing.assert_allclose(seq.rewards, heads(WorldModel.reward), rtol=1e-6)
    predicted = jax.nn.sigmoid(heads(WorldModel.discount_logits))
    np.testing.assert_allclose(seq.discounts[1:], predicted[1:], rtol=1e-6)


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


def test_imagination_start_flattens_states_and_terminals_alike():
    agent = vector_agent()
    config, (b, t) = agent.config, (4, 10)
    state = agent.init(jax.random.key(0))
    batch = structured_batch(b, t)
    batch["is_terminal"][:] = False
    batch["is_terminal"][2, 7] = True  # flattened index 2·T + 7 = 27
    data = preprocess(batch, config)
    model, params = agent.world_model, state.wm_params
    embed = model.apply(params, data["vector"], method=WorldModel.encode)
    posterior, _ = observe(
        model, params, embed, data["action"], data["is_first"], jax.random.key(1)
    )
    start, is_terminal = imagination_start(posterior, batch["is_terminal"])
    chex.assert_shape(start.deter, (b * t, config.rssm.deter))
    np.testing.assert_array_equal(np.flatnonzero(is_terminal), [2 * t + 7])
    rows = np.concatenate([np.asarray(x).reshape(b * t, -1) for x in start], -1)
    assert len(np.unique(rows, axis=0)) == b * t  # distinct start states
    for flat, full in zip(start, posterior, strict=True):
        np.testing.assert_array_equal(flat[2 * t + 7], full[2, 7])
        np.testing.assert_array_equal(flat[t + 3], full[1, 3])
    # The start states are constants for the actor-critic.
    grad = jax.grad(
        lambda d: imagination_start(posterior._replace(deter=d), is_terminal)[0].deter.sum()
    )
    np.testing.assert_array_equal(grad(posterior.deter), 0.0)
    seq = imagine(
        model, params, agent.actor, state.actor_params, start, is_terminal,
        config.imag_horizon, jax.random.key(2), config,
    )  # fmt: skip
    expected = np.full(b * t, config.discount, np.float32)
    expected[2 * t + 7] = 0.0
    np.testing.assert_allclose(seq.discounts[0], expected)


class _LogitsActor:
    """Stands in for the actor: the features are the policy's logits, set by hand."""

    def apply(self, params, feat):
        del params
        return distrax.OneHotCategorical(logits=feat, dtype=jnp.float32)


def test_actor_loss_matches_numpy():
    # H + 1 = 4 states, N = 2 start states, 3 actions; the loss reads states 0..H−2 = 0, 1.
    logits = np.array(
        [[[1.0, 0.0, -1.0], [0.5, 0.2, 0.0]],
         [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]],
         [[0.3, 0.3, 0.0], [2.0, 1.0, 0.0]],
         [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], np.float32,
    )  # fmt: skip
    taken = np.array([[0, 0], [2, 1], [0, 2], [1, 0]])  # taken[t + 1]: chosen in state t
    returns = np.array([[9.0, 8.0], [1.5, -0.5], [2.0, 0.7]], np.float32)  # R_0..R_{H−1}
    values = np.array([[5.0, 5.0], [0.5, 1.0], [-0.4, 0.2], [3.0, 3.0]], np.float32)
    weights = np.array([[1.0, 1.0], [0.9, 0.5], [0.8, 0.25], [0.7, 0.1]], np.float32)
    seq = Imagination(
        states=None, feats=jnp.asarray(logits), actions=jnp.eye(3)[taken],
        rewards=None, discounts=None, weights=jnp.asarray(weights),
    )  # fmt: skip
    config = tiny_config(actor_ent=0.1, actor_grad_mix=0.3)

    log_pi = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    entropy = -(np.exp(log_pi) * log_pi).sum(-1)[:2]
    log_pi_taken = np.take_along_axis(log_pi[:2], taken[1:3, :, None], -1)[..., 0]
    reinforce = log_pi_taken * (returns[1:3] - values[:2])  # log π(a_{t+1}|s_t)·(R_{t+1} − v_t)
    dynamics = returns[1:3]
    objectives = {
        "reinforce": reinforce,
        "dynamics": dynamics,
        "both": 0.3 * dynamics + 0.7 * reinforce,
    }
    for mode, objective in objectives.items():
        loss, metrics = actor_loss(
            _LogitsActor(), None, seq, jnp.asarray(returns), jnp.asarray(values),
            jax.random.key(0), mode, config,
        )  # fmt: skip
        expected = -(weights[:2] * (objective + 0.1 * entropy)).mean()
        np.testing.assert_allclose(loss, expected, rtol=1e-6, err_msg=mode)
        np.testing.assert_allclose(metrics["actor_entropy"], entropy.mean(), rtol=1e-6)


def test_actor_loss_treats_the_taken_action_as_a_constant():
    """Guards the stop-gradient on the taken action in the REINFORCE term: no gradient of
    the actor loss reaches `seq.actions` (the straight-through samples), in either mode."""
    logits = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    taken = jnp.eye(3)[np.array([[0, 0], [2, 1], [0, 2], [1, 0]])]
    returns = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32))
    values = jnp.asarray(np.random.default_rng(2).normal(size=(4, 2)).astype(np.float32))
    config = tiny_config(actor_ent=0.1, actor_grad_mix=0.3)

    def loss(actions, mode):
        seq = Imagination(
            states=None, feats=jnp.asarray(logits), actions=actions,
            rewards=None, discounts=None, weights=jnp.ones((4, 2)),
        )  # fmt: skip
        return actor_loss(
            _LogitsActor(), None, seq, returns, values, jax.random.key(0), mode, config
        )[0]

    for mode in ("reinforce", "both"):
        np.testing.assert_array_equal(jax.grad(loss)(taken, mode), 0.0, err_msg=mode)


def test_imagined_actions_get_no_gradient_from_the_features():
    """Guards `actor(sg(feat))` in `imagine`: the straight-through actions carry no gradient
    back into the start state (nor, via the dynamics, into later features). A plain sum of
    one-hots has zero gradient anyway, so the actions are weighted by fixed random weights."""
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    c, n = agent.config, 6
    start = initial_state(n, c.rssm.deter, c.rssm.stoch, c.rssm.discrete)
    start = start._replace(stoch=jax.nn.one_hot(jnp.zeros((n, c.rssm.stoch), int), c.rssm.discrete))
    deter = jnp.asarray(np.random.default_rng(0).normal(size=start.deter.shape), jnp.float32)
    w = jnp.asarray(
        np.random.default_rng(1).normal(size=(c.imag_horizon, n, agent.num_actions)), jnp.float32
    )

    def weighted_actions(d):
        seq = imagine(
            agent.world_model, state.wm_params, agent.actor, state.actor_params,
            start._replace(deter=d), jnp.zeros(n, bool), c.imag_horizon, jax.random.key(3), c,
        )  # fmt: skip
        return (w * seq.actions[1:]).sum()

    np.testing.assert_array_equal(jax.grad(weighted_actions)(deter), 0.0)


def test_imagination_draws_action_and_dynamics_with_separate_keys():
    """Guards the key scheme of `imagine`: step t uses `split(key, H)[t]`, split once more
    into the actor's key and the dynamics' key, so the two draws are independent. The first
    two steps are reproduced by hand."""
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    c, n, key = agent.config, 6, jax.random.key(3)
    seq = _rollout(agent, state, n)  # imagines with jax.random.key(3)
    model, params = agent.world_model, state.wm_params
    prev = jax.tree.map(lambda x: x[0], seq.states)
    keys = jax.random.split(key, c.imag_horizon)
    for t in range(2):
        action_key, dyn_key = jax.random.split(keys[t])
        logits = agent.actor.apply(state.actor_params, get_feat(prev)).logits
        np.testing.assert_allclose(
            seq.actions[t + 1], straight_through_onehot(logits, action_key), atol=1e-6
        )
        nxt = model.apply(params, prev, seq.actions[t + 1], dyn_key, method=WorldModel.img_step)
        np.testing.assert_allclose(seq.states.stoch[t + 1], nxt.stoch, atol=1e-6)
        np.testing.assert_allclose(seq.states.deter[t + 1], nxt.deter, rtol=1e-5, atol=1e-6)
        prev = jax.tree.map(lambda x, t=t: x[t + 1], seq.states)
    # Not vacuous: a dynamics draw with the step's own key gives another sample.
    start = jax.tree.map(lambda x: x[0], seq.states)
    other = model.apply(params, start, seq.actions[1], keys[0], method=WorldModel.img_step)
    assert np.abs(other.stoch - seq.states.stoch[1]).max() > 0.5


def test_actor_dist_that_does_not_fit_the_actions_is_a_config_error():
    with pytest.raises(ConfigError, match="'actor.dist' is tanh_normal, which does not fit"):
        make_actor(tiny_config(**{"actor.dist": "tanh_normal"}), 3, discrete=True)
