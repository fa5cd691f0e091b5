"""Actor-critic learning in imagination (SPEC §3): rollout, λ-return targets, losses.

`N` is the number of start states (`B·T` of a batch), `H` the horizon. Imagined
sequences are time-major `[H+1, N, ...]`: the start state followed by H imagined states.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamer_jax.config import Config, ConfigError
from dreamer_jax.losses import lambda_returns
from dreamer_jax.networks import (
    Actor,
    RSSMState,
    ScalarHead,
    action_log_prob,
    actor_entropy,
    actor_sample,
    get_feat,
    unit_normal,
)
from dreamer_jax.world_model import WorldModel, cast_step_kernels

Params = Any
sg = jax.lax.stop_gradient


class Imagination(NamedTuple):
    """An imagined rollout, time-major."""

    states: RSSMState  # leaves [H+1, N, ...]
    feats: jax.Array  # [H+1, N, F]
    actions: jax.Array  # [H+1, N, A]; actions[t+1] was taken in state t, actions[0] = 0
    rewards: jax.Array  # [H+1, N] reward-head mean of each state
    # [H+1, N]; with pred_discount, entry 0 is the start's real (1 − is_terminal)·γ and the
    # rest are predicted; without, γ everywhere (as the official code).
    discounts: jax.Array
    weights: jax.Array  # [H+1, N] cumulative product of earlier discounts, weight_0 = 1


def resolve_actor_grad(config: Config, discrete: bool) -> str:
    """`auto` is REINFORCE for discrete actions, dynamics backprop for continuous ones."""
    if config.actor_grad == "auto":
        return "reinforce" if discrete else "dynamics"
    return config.actor_grad


def imagination_start(posterior: RSSMState, is_terminal: jax.Array) -> tuple[RSSMState, jax.Array]:
    """Every posterior state of a batch as a start state, gradient stopped: leaves
    `[B, T, ...]` -> `[B·T, ...]`, and their `is_terminal` `[B, T]` -> `[B·T]` in the same order.
    """
    flatten = lambda x: x.reshape(-1, *x.shape[2:])
    return jax.tree.map(lambda x: sg(flatten(x)), posterior), flatten(is_terminal)


def imagine(
    world_model: WorldModel,
    wm_params: Params,
    actor: Actor,
    actor_params: Params,
    start: RSSMState,
    start_is_terminal: jax.Array,
    horizon: int,
    key: jax.Array,
    config: Config,
) -> Imagination:
    """Roll the prior forward `horizon` steps from `start` (leaves `[N, ...]`) with actions
    sampled from the actor on stopped-gradient features (`lax.scan`).

    Gradients reach `actor_params` through the straight-through / reparameterized actions
    and the dynamics (used by dynamics backprop); pass stopped params to cut that path.
    `wm_params` are the world model's, stopped: the loop gets its Dense kernels already cast
    to their compute dtype (`cast_step_kernels`).
    """
    start_feat = get_feat(start)
    first_action = jnp.zeros((*start.deter.shape[:-1], actor.num_actions), jnp.float32)
    _, probe = jax.eval_shape(
        lambda: world_model.apply(
            wm_params, start, first_action, key, method=WorldModel.img_step,
            mutable=["dense_inputs", "perturbations"],
        )
    )  # fmt: skip
    step_params = cast_step_kernels(wm_params, probe["perturbations"])

    def step(carry, step_key):
        state, feat = carry
        action_key, dyn_key = jax.random.split(step_key)
        action = actor_sample(actor.apply(actor_params, sg(feat)), action_key)
        state = world_model.apply(step_params, state, action, dyn_key, method=WorldModel.img_step)
        feat = get_feat(state)
        return (state, feat), (state, feat, action)

    keys = jax.random.split(key, horizon)
    _, (states, feats, actions) = jax.lax.scan(step, (start, start_feat), keys)
    prepend = lambda first, rest: jnp.concatenate([first[None], rest], 0)
    states = jax.tree.map(prepend, start, states)
    feats = prepend(start_feat, feats)
    actions = prepend(jnp.zeros_like(actions[0]), actions)

    rewards = world_model.apply(wm_params, feats, method=WorldModel.reward)
    first_discount = (1.0 - start_is_terminal.astype(jnp.float32)) * config.discount
    if config.pred_discount:
        logits = world_model.apply(wm_params, feats, method=WorldModel.discount_logits)
        discounts = prepend(first_discount, jax.nn.sigmoid(logits[1:]))
    else:
        discounts = jnp.full(rewards.shape, config.discount, jnp.float32)
    # A discount says whether the *next* state is valid, so weight_t multiplies d_0..d_{t-1}.
    weights = jnp.cumprod(prepend(jnp.ones_like(discounts[0]), discounts[:-1]), 0)
    return Imagination(states, feats, actions, rewards, discounts, weights)


def reinforce_rollout_params(actor: Actor, params: Params, feat: jax.Array) -> Params:
    """The actor's parameters for an imagination that takes no gradient through them
    (REINFORCE): stopped, so XLA skips that work, and with each Dense kernel already cast to
    its compute dtype, which the loop would otherwise cast again in every step (as the world
    model's, `cast_step_kernels`). `feat` `[..., F]`: any features, for the layers' shapes."""
    probe = jax.eval_shape(
        lambda: actor.apply(params, feat, mutable=["dense_inputs", "perturbations"])[1]
    )
    return cast_step_kernels(sg(params), probe["perturbations"])


def critic_value(critic: ScalarHead, params: Params, feats: jax.Array) -> jax.Array:
    """Mean of the critic's unit-variance Normal, `[...]`."""
    return critic.apply(params, feats)


def imagination_targets(seq: Imagination, slow_values: jax.Array, lambda_: float) -> jax.Array:
    """λ-returns `[H, N]` over t = 0..H−1, bootstrapped with the slow critic's `value_H`.

    Keeps the official indexing: `reward_t` of the state at t pairs with the step t→t+1.
    """
    return lambda_returns(
        seq.rewards[:-1], slow_values[:-1], seq.discounts[:-1], slow_values[-1], lambda_
    )


def actor_loss(
    actor: Actor,
    actor_params: Params,
    seq: Imagination,
    returns: jax.Array,
    slow_values: jax.Array,
    key: jax.Array,
    actor_grad: str,
    config: Config,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Actor loss on states 0..H−2 (SPEC §3): REINFORCE, dynamics backprop or both, plus an
    entropy bonus, weighted by the stopped cumulative discounts.

    Args:
      returns: λ-returns `[H, N]`; slow_values: slow-critic values `[H+1, N]`.
    """
    policy = actor.apply(actor_params, sg(seq.feats[:-2]))
    target = returns[1:]  # R_{t+1}
    if actor_grad == "dynamics":
        objective = target
    else:
        advantage = sg(target - slow_values[:-2])
        # The taken action is a constant, as the official code for `reinforce`. DEVIATION: for
        # `both` the official code lets the straight-through gradient of the sample leak in.
        reinforce = action_log_prob(policy, sg(seq.actions[1:-1])) * advantage
        if actor_grad == "reinforce":
            objective = reinforce
        else:
            mix = config.actor_grad_mix
            objective = mix * target + (1.0 - mix) * reinforce
    entropy = actor_entropy(policy, key)
    objective = objective + config.actor_ent * entropy
    loss = -(sg(seq.weights[:-2]) * objective).mean()
    return loss, {"actor_loss": loss, "actor_entropy": entropy.mean()}


def critic_loss(
    critic: ScalarHead,
    critic_params: Params,
    seq: Imagination,
    returns: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Critic loss on states 0..H−1: −mean(sg(weight_t)·log N(sg(R_t); v(s_t), 1))."""
    values = critic_value(critic, critic_params, sg(seq.feats[:-1]))
    log_prob = unit_normal(values, 0).log_prob(sg(returns))
    loss = -(sg(seq.weights[:-1]) * log_prob).mean()
    return loss, {"critic_loss": loss, "value_mean": values.mean()}


def make_actor(config: Config, num_actions: int, discrete: bool, dtype=jnp.float32) -> Actor:
    c = config.actor
    if c.dist not in ("auto", "onehot" if discrete else "tanh_normal"):
        kind = "discrete" if discrete else "continuous"
        raise ConfigError(f"config key 'actor.dist' is {c.dist}, which does not fit {kind} actions")
    return Actor(num_actions, discrete, c.layers, c.units, c.min_std, c.init_std, dtype)


def make_critic(config: Config, dtype=jnp.float32) -> nn.Module:
    return ScalarHead(config.critic.layers, config.critic.units, dtype)
