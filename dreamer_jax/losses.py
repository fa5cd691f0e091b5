"""Reusable pure loss and return functions (rlax style). No Flax, no config.

Each function is documented with the exact formula of ../shared/SPEC.md it implements and
is tested against an independent numpy implementation in tests/test_losses.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from dreamer_jax.networks import latent_dist


def lambda_returns(
    rewards: jax.Array,
    values: jax.Array,
    discounts: jax.Array,
    bootstrap: jax.Array,
    lambda_: float,
) -> jax.Array:
    """TD(λ) returns, computed backwards in time (SPEC §3).

        R_t = r_t + d_t · ((1 − λ) · v_{t+1} + λ · R_{t+1}),   v_T = R_T = bootstrap

    Args:
      rewards, values, discounts: `[T, ...]`, time-major. `values[t]` is the value of the
        state at t; `values[0]` is not used (only `v_{t+1}` enters the recursion).
      bootstrap: `[...]`, the value after the last step.
      lambda_: λ; 1 gives discounted Monte-Carlo returns, 0 one-step TD targets.
    Returns:
      `[T, ...]` λ-returns.
    """
    chex.assert_equal_shape([rewards, values, discounts])
    chex.assert_equal_shape([rewards[0], bootstrap])
    next_values = jnp.concatenate([values[1:], bootstrap[None]], 0)
    inputs = rewards + discounts * (1.0 - lambda_) * next_values

    def backward(next_return, step):
        step_input, discount = step
        ret = step_input + discount * lambda_ * next_return
        return ret, ret

    _, returns = jax.lax.scan(backward, bootstrap, (inputs, discounts), reverse=True)
    return returns


def kl_balance(
    post_logits: jax.Array,
    prior_logits: jax.Array,
    balance: float = 0.8,
    free: float = 0.0,
    free_avg: bool = True,
    forward: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """KL balancing between posterior and prior over `[..., S, K]` categorical latents (SPEC §2).

        loss = (1 − α) · max(mean KL(post ‖ sg(prior)), free)
             +      α  · max(mean KL(sg(post) ‖ prior), free)

    so a fraction α (`balance`) of the gradient trains the prior towards the posterior and
    1 − α regularizes the posterior. The KL is summed over the S latents and averaged over
    the leading dims; with `free_avg=False` the free-nats clip applies per element before the
    mean. `forward=True` swaps the KL direction (prior ‖ post), as the official option.

    Returns:
      `(loss, kl_value)`: the scalar loss and the per-element KL `[...]` (post ‖ prior, or
      prior ‖ post with `forward`), gradient stopped, for logging.
    """
    chex.assert_equal_shape([post_logits, prior_logits])
    sg = jax.lax.stop_gradient
    lhs, rhs = (prior_logits, post_logits) if forward else (post_logits, prior_logits)
    mix = balance if forward else 1.0 - balance
    value_lhs = latent_dist(lhs).kl_divergence(latent_dist(sg(rhs)))
    value_rhs = latent_dist(sg(lhs)).kl_divergence(latent_dist(rhs))
    if free_avg:
        loss_lhs = jnp.maximum(value_lhs.mean(), free)
        loss_rhs = jnp.maximum(value_rhs.mean(), free)
    else:
        loss_lhs = jnp.maximum(value_lhs, free).mean()
        loss_rhs = jnp.maximum(value_rhs, free).mean()
    loss = mix * loss_lhs + (1.0 - mix) * loss_rhs
    return loss, sg(value_lhs)
