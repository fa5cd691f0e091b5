"""λ-returns and KL balancing against independent numpy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamer_jax.losses import kl_balance, lambda_returns


def numpy_lambda_returns(rewards, values, discounts, bootstrap, lam):
    """Straight from SPEC §3: R_t = r_t + d_t((1-λ)v_{t+1} + λR_{t+1}), R_T = v_T = bootstrap."""
    horizon = len(rewards)
    returns = np.zeros_like(rewards)
    next_return, next_value = bootstrap, bootstrap
    for t in reversed(range(horizon)):
        returns[t] = rewards[t] + discounts[t] * ((1 - lam) * next_value + lam * next_return)
        next_return, next_value = returns[t], values[t]
    return returns


def test_lambda_returns_hand_checked():
    # T=2, λ=0.5, d=0.5: R_1 = 1 + 0.5(0.5·4 + 0.5·4) = 3; R_0 = 1 + 0.5(0.5·2 + 0.5·3) = 2.25
    rewards = jnp.array([1.0, 1.0])
    values = jnp.array([100.0, 2.0])  # values[0] never enters
    discounts = jnp.array([0.5, 0.5])
    out = lambda_returns(rewards, values, discounts, jnp.array(4.0), 0.5)
    np.testing.assert_allclose(out, [2.25, 3.0], rtol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_lambda_returns_match_numpy(lam):
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, 15, 3, 4)).astype(np.float32)
    discounts = rng.uniform(0.5, 1.0, size=(15, 3, 4)).astype(np.float32)
    bootstrap = rng.normal(size=(3, 4)).astype(np.float32)
    expected = np.stack(
        [
            numpy_lambda_returns(rewards[:, i, j], values[:, i, j], discounts[:, i, j],
                                 bootstrap[i, j], lam)
            for i in range(3) for j in range(4)
        ],
        -1,
    ).reshape(15, 3, 4)  # fmt: skip
    out = lambda_returns(rewards, values, discounts, bootstrap, lam)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_lambda_one_is_discounted_monte_carlo_and_zero_is_td():
    rewards = np.array([1.0, 2.0, 3.0], np.float32)
    values = np.array([0.0, 10.0, 20.0], np.float32)
    discounts = np.full(3, 0.9, np.float32)
    mc = lambda_returns(rewards, values, discounts, np.float32(5.0), 1.0)
    np.testing.assert_allclose(mc[0], 1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 5, rtol=1e-6)
    td = lambda_returns(rewards, values, discounts, np.float32(5.0), 0.0)
    np.testing.assert_allclose(td, [1 + 0.9 * 10, 2 + 0.9 * 20, 3 + 0.9 * 5], rtol=1e-6)


def numpy_kl(post_logits, prior_logits):
    """KL(post ‖ prior) summed over latents: [..., S, K] -> [...]."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(post_logits), log_softmax(prior_logits)
    return (np.exp(log_p) * (log_p - log_q)).sum((-2, -1))


def _logits(seed, shape=(3, 5, 4, 6)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_kl_balance_value_matches_numpy():
    post, prior = _logits(0), _logits(1)
    loss, kl_value = kl_balance(post, prior, balance=0.8, free=0.0)
    expected = numpy_kl(post.astype(np.float64), prior.astype(np.float64))
    np.testing.assert_allclose(kl_value, expected, rtol=1e-4)
    # Both terms have the same value; only their gradients differ.
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-4)


def test_kl_gradient_splits_point_eight_to_prior_and_point_two_to_posterior():
    post, prior = jnp.asarray(_logits(2)), jnp.asarray(_logits(3))

    def plain_kl(post, prior):  # independent of the library: explicit formula in jnp
        log_p, log_q = jax.nn.log_softmax(post), jax.nn.log_softmax(prior)
        return (jnp.exp(log_p) * (log_p - log_q)).sum((-2, -1)).mean()

    balanced = lambda a, b: kl_balance(a, b, balance=0.8, free=0.0)[0]
    grad_post, grad_prior = jax.grad(balanced, argnums=(0, 1))(post, prior)
    plain_post, plain_prior = jax.grad(plain_kl, argnums=(0, 1))(post, prior)
    np.testing.assert_allclose(grad_prior, 0.8 * plain_prior, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grad_post, 0.2 * plain_post, rtol=1e-4, atol=1e-7)
    assert np.abs(plain_post).max() > 1e-3  # the check above is not vacuous


def test_free_nats_clip_the_loss_and_stop_the_gradient():
    post = _logits(4) * 0.01
    prior = post + 0.01 * _logits(5)  # tiny KL
    kl = numpy_kl(post.astype(np.float64), prior.astype(np.float64))
    assert kl.mean() < 1.0
    loss, _ = kl_balance(post, prior, balance=0.8, free=1.0, free_avg=True)
    np.testing.assert_allclose(loss, 1.0)
    grads = jax.grad(lambda a, b: kl_balance(a, b, 0.8, 1.0, True)[0], argnums=(0, 1))(post, prior)
    assert all(np.all(g == 0) for g in grads)
    # free_avg=False clips each element before the mean: with a free level between the
    # smallest and largest element KL, the loss is the mean of the clipped values.
    post, prior = _logits(6), _logits(7)
    kl = numpy_kl(post.astype(np.float64), prior.astype(np.float64))
    free = float(np.median(kl))
    loss, _ = kl_balance(post, prior, balance=0.8, free=free, free_avg=False)
    np.testing.assert_allclose(loss, np.maximum(kl, free).mean(), rtol=1e-4)
    assert not np.isclose(np.maximum(kl, free).mean(), max(kl.mean(), free))
    # free_avg=True clips the mean instead: the same free level is below the mean KL, so the
    # loss is the unclipped mean (not the mean of the clipped values above).
    assert free < kl.mean()
    loss, _ = kl_balance(post, prior, balance=0.8, free=free, free_avg=True)
    np.testing.assert_allclose(loss, kl.mean(), rtol=1e-4)


def test_forward_kl_swaps_direction():
    post, prior = _logits(8), _logits(9)
    _, value = kl_balance(post, prior, balance=0.8, forward=True)
    np.testing.assert_allclose(value, numpy_kl(prior.astype(np.float64), post), rtol=1e-4)


def test_forward_kl_gradient_splits_balance_to_prior_and_rest_to_posterior():
    """Guards the `forward=True` mix: as the official DreamerV2 `kl_loss` (lhs, rhs = prior,
    post; mix = balance), a fraction α of KL(prior ‖ post)'s gradient reaches the prior and
    1 − α the posterior, as with the default direction."""
    post, prior = jnp.asarray(_logits(10)), jnp.asarray(_logits(11))

    def plain_forward_kl(post, prior):  # KL(prior ‖ post), explicit formula in jnp
        log_p, log_q = jax.nn.log_softmax(post), jax.nn.log_softmax(prior)
        return (jnp.exp(log_q) * (log_q - log_p)).sum((-2, -1)).mean()

    balanced = lambda a, b: kl_balance(a, b, balance=0.8, free=0.0, forward=True)[0]
    grad_post, grad_prior = jax.grad(balanced, argnums=(0, 1))(post, prior)
    plain_post, plain_prior = jax.grad(plain_forward_kl, argnums=(0, 1))(post, prior)
    np.testing.assert_allclose(grad_prior, 0.8 * plain_prior, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grad_post, 0.2 * plain_post, rtol=1e-4, atol=1e-7)
    assert np.abs(plain_post).max() > 1e-3 and np.abs(plain_prior).max() > 1e-3
