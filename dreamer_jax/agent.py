"""The agent: one `TrainState` pytree, one jitted `train_step`, one jitted `policy_step`.

    agent = Agent(config, obs_space, num_actions, discrete)
    state = agent.init(jax.random.key(config.seed))
    state, metrics = agent.train_step(state, batch)          # batch leaves [B, T, ...]
    action, carry = agent.policy_step(state, obs, carry, key, mode="train")

The same three over a leading seed axis (`dreamer_jax.seeds`), N runs as one program:

    states = agent.init_seeds(keys)                          # keys [N]
    states, metrics = agent.train_seeds(states, batches)     # batch leaves [N, B, T, ...]
    action, carry, keys = agent.act_seeds(states, obs, carry, keys, mode="train")

`train_step` is world model + actor + critic in one XLA program with the state buffers
donated; it keeps its PRNG key in the state. An update whose loss or gradient is not finite
is skipped (state unchanged apart from the counters) and counted.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dreamer_jax.actor_critic import (
    actor_loss,
    critic_loss,
    critic_value,
    imagination_start,
    imagination_targets,
    imagine,
    make_actor,
    make_critic,
    reinforce_rollout_params,
    resolve_actor_grad,
)
from dreamer_jax.config import Config
from dreamer_jax.networks import RSSMState, action_noise, actor_mode, get_feat, initial_state
from dreamer_jax.world_model import (
    OPEN_LOOP_CONTEXT,
    WorldModel,
    open_loop_prediction,
    preprocess,
    rssm_sizes,
    world_model_loss,
)

Params = Any
ObsSpace = dict[str, tuple[tuple[int, ...], Any]]
sg = jax.lax.stop_gradient


@flax.struct.dataclass
class TrainState:
    """Everything the learner needs to continue exactly: params, optimizer states, the slow
    critic, counters and the PRNG key."""

    wm_params: Params
    actor_params: Params
    critic_params: Params
    slow_critic_params: Params
    wm_opt_state: optax.OptState
    actor_opt_state: optax.OptState
    critic_opt_state: optax.OptState
    updates: jax.Array  # int32, applied (finite) updates
    nonfinite_streak: jax.Array  # int32, consecutive skipped updates
    nonfinite_total: jax.Array  # int32, all skipped updates
    key: jax.Array


class PolicyParams(NamedTuple):
    """What the policy reads of a `TrainState`. The jitted policy gets only these: every
    array argument costs host time on each call, and the optimizer states and critics are
    171 of the 233 arrays at the Atari preset (8 seeds' policy step on the 2-core CPU: 0.49–0.51
    ms of dispatch instead of 0.79–0.87 ms; docs/benchmarks.md)."""

    wm_params: Params
    actor_params: Params

    @classmethod
    def of(cls, state: TrainState | PolicyParams) -> PolicyParams:
        return cls(state.wm_params, state.actor_params)


def scale_by_keras_adam(eps: float) -> optax.GradientTransformation:
    """`optax.scale_by_adam` with TensorFlow's (Keras') epsilon, which the official code's
    `tf.optimizers.Adam` uses: `√(1 − β₂ᵗ)/(1 − β₁ᵗ) · m/(√v + eps)`, i.e. `m̂/(√v̂ + eps′)`
    with `eps′ = eps/√(1 − β₂ᵗ)` (about 32× `eps` at the first update, within 1.1× of it
    after 2,000). The state is optax's, so checkpoints keep their layout."""
    adam = optax.scale_by_adam(eps=eps)
    b1, b2 = 0.9, 0.999  # optax's and Keras' defaults

    def update(updates, state, params=None):
        _, state = adam.update(updates, state, params)  # optax's moments and count
        t = state.count.astype(jnp.float32)
        step = jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree.map(lambda m, v: step * m / (jnp.sqrt(v) + eps), state.mu, state.nu)
        return updates, state

    return optax.GradientTransformation(adam.init, update)


def make_optimizer(opt: Config) -> optax.GradientTransformation:
    """Global-norm clip, Adam (Keras' epsilon), then decoupled weight decay
    `w ← (1 − wd)·w` (not scaled by the learning rate), as the official code."""
    return optax.chain(
        optax.clip_by_global_norm(opt.clip),
        scale_by_keras_adam(opt.eps),
        optax.scale(-opt.lr),
        optax.add_decayed_weights(-opt.wd),
    )


def _all_finite(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def over_seeds(fn):
    """`fn` mapped over the leading seed axis of all its arguments (`jax.vmap`). A seed axis
    of one runs `fn` itself on the slice: XLA optimizes that program better than a batch of
    one (9 % faster Atari update on the CPU), and a single run stays the unbatched program."""

    @functools.wraps(fn)  # jit names the program after fn
    def mapped(*args):
        if jax.tree.leaves(args)[0].shape[0] == 1:
            out = fn(*jax.tree.map(lambda x: x[0], args))
            return jax.tree.map(lambda x: x[None], out)
        return jax.vmap(fn)(*args)

    return mapped


class Agent:
    """Holds the (static) networks, optimizers and config; all array work is in pure
    functions of `TrainState`, compiled once."""

    def __init__(self, config: Config, obs_space: ObsSpace, num_actions: int, discrete: bool):
        obs_keys = [k for k in ("image", "vector") if k in obs_space]
        if len(obs_keys) != 1:
            raise ValueError(
                f"the observation space needs exactly one of 'image' and 'vector', got keys "
                f"{sorted(obs_space)}"
            )
        (self.obs_key,) = obs_keys
        self.obs_shape = tuple(obs_space[self.obs_key][0])
        self.config = config
        self.num_actions = num_actions
        self.discrete = discrete
        dtype = jnp.bfloat16 if config.precision == "bf16" else jnp.float32
        self.world_model = WorldModel(self.obs_key, self.obs_shape, config, dtype)
        self.actor = make_actor(config, num_actions, discrete, dtype)
        self.critic = make_critic(config, dtype)
        self.actor_grad = resolve_actor_grad(config, discrete)
        self.wm_opt = make_optimizer(config.model_opt)
        self.actor_opt = make_optimizer(config.actor_opt)
        self.critic_opt = make_optimizer(config.critic_opt)
        # Compiled once: run eagerly, flax init would compile every op on its own.
        self.init = jax.jit(self._init)
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self._policy_step_jit = jax.jit(self._policy_step, static_argnames="mode")
        # The seed axis: vmap keeps every seed's maths and PRNG stream those of a single run.
        self.init_seeds = jax.jit(over_seeds(self._init))
        self.train_seeds = jax.jit(over_seeds(self._train_step), donate_argnums=0)
        # Split over the devices like the states: no seed's parameters move.
        self.open_loop_seeds = jax.jit(over_seeds(self._open_loop))
        self._act_seeds_jit = jax.jit(self._act_seeds, static_argnames="mode")

    # ------------------------------------------------------------------ acting
    def policy_step(self, state: TrainState, obs, carry, key, mode: str = "train"):
        """The jitted `_policy_step` on `state`'s policy parameters (`PolicyParams`).

        `key` is used as given and not returned: split a fresh one for every step (a loop
        that passes the same key each step draws the same latents and actions' noise)."""
        return self._policy_step_jit(PolicyParams.of(state), obs, carry, key, mode=mode)

    def act_seeds(self, states: TrainState, obs, carry, keys, mode: str):
        """The jitted `_act_seeds` on `states`' policy parameters (`PolicyParams`)."""
        return self._act_seeds_jit(PolicyParams.of(states), obs, carry, keys, mode=mode)

    # ------------------------------------------------------------------ init
    def _init(self, key: jax.Array) -> TrainState:
        """A fresh `TrainState` (use the jitted `init`)."""
        wm_key, actor_key, critic_key, sample_key, state_key = jax.random.split(key, 5)
        obs = jnp.zeros((1, *self.obs_shape), jnp.float32)
        action = jnp.zeros((1, self.num_actions), jnp.float32)
        is_first = jnp.ones((1,), bool)
        wm_params = self.world_model.init(wm_key, obs, action, is_first, sample_key)
        feat = jnp.zeros((1, self.feat_size), jnp.float32)
        actor_params = self.actor.init(actor_key, feat)
        critic_params = self.critic.init(critic_key, feat)
        # Fresh buffers everywhere: the state is donated, and XLA refuses aliased donations.
        zero = lambda: jnp.zeros((), jnp.int32)
        return TrainState(
            wm_params=wm_params,
            actor_params=actor_params,
            critic_params=critic_params,
            slow_critic_params=jax.tree.map(jnp.copy, critic_params),
            wm_opt_state=self.wm_opt.init(wm_params),
            actor_opt_state=self.actor_opt.init(actor_params),
            critic_opt_state=self.critic_opt.init(critic_params),
            updates=zero(),
            nonfinite_streak=zero(),
            nonfinite_total=zero(),
            key=state_key,
        )

    @property
    def feat_size(self) -> int:
        r = self.config.rssm
        return r.stoch * r.discrete + r.deter

    # ------------------------------------------------------------ train step
    def _train_step(
        self, state: TrainState, batch: dict[str, jax.Array]
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One update of world model, actor and critic on a batch `[B, T, ...]`."""
        config = self.config
        key, wm_key, imag_key, ent_key = jax.random.split(state.key, 4)
        data = preprocess(batch, config)

        # World model.
        (_, (posterior, metrics)), wm_grads = jax.value_and_grad(world_model_loss, has_aux=True)(
            state.wm_params, self.world_model, data, wm_key, config
        )
        wm_updates, wm_opt_state = self.wm_opt.update(wm_grads, state.wm_opt_state, state.wm_params)
        wm_params = optax.apply_updates(state.wm_params, wm_updates)

        # Actor, through imagination from every posterior state of the batch.
        start, start_is_terminal = imagination_start(posterior, batch["is_terminal"])

        def actor_objective(actor_params):
            rollout_params = actor_params
            if self.actor_grad == "reinforce":  # no gradient through the rollout
                feat = get_feat(start)  # for the layers' shapes
                rollout_params = reinforce_rollout_params(self.actor, actor_params, feat)
            seq = imagine(
                self.world_model,
                sg(wm_params),
                self.actor,
                rollout_params,
                start,
                start_is_terminal,
                config.imag_horizon,
                imag_key,
                config,
            )
            slow_values = critic_value(self.critic, state.slow_critic_params, seq.feats)
            returns = imagination_targets(seq, slow_values, config.discount_lambda)
            loss, actor_metrics = actor_loss(
                self.actor, actor_params, seq, returns, slow_values, ent_key,
                self.actor_grad, config,
            )  # fmt: skip
            return loss, (seq, returns, actor_metrics)

        (_, (seq, returns, actor_metrics)), actor_grads = jax.value_and_grad(
            actor_objective, has_aux=True
        )(state.actor_params)
        actor_updates, actor_opt_state = self.actor_opt.update(
            actor_grads, state.actor_opt_state, state.actor_params
        )
        actor_params = optax.apply_updates(state.actor_params, actor_updates)

        # Critic, on the same imagined states and λ-returns (both gradient-stopped).
        (_, critic_metrics), critic_grads = jax.value_and_grad(
            critic_loss, argnums=1, has_aux=True
        )(self.critic, state.critic_params, seq, returns)
        critic_updates, critic_opt_state = self.critic_opt.update(
            critic_grads, state.critic_opt_state, state.critic_params
        )
        critic_params = optax.apply_updates(state.critic_params, critic_updates)
        # Slow critic, as the official `update_slow_target` after the critic's step: every
        # `slow_target_update` updates from update 0, moved `slow_target_fraction` of the way
        # to the updated critic (all the way at update 0). DEVIATION: update 0 reads `init`'s
        # copy of the critic (the official code's reads a target initialized apart).
        mix = jnp.where(state.updates == 0, 1.0, config.slow_target_fraction)
        slow_critic_params = optax.periodic_update(
            optax.incremental_update(critic_params, state.slow_critic_params, mix),
            state.slow_critic_params,
            state.updates,
            config.slow_target_update,
        )

        metrics.update(actor_metrics)
        metrics.update(critic_metrics)
        metrics.update(
            model_grad_norm=optax.global_norm(wm_grads),
            actor_grad_norm=optax.global_norm(actor_grads),
            critic_grad_norm=optax.global_norm(critic_grads),
            imag_reward_mean=seq.rewards.mean(),
            lambda_return_mean=returns.mean(),
        )

        finite = _all_finite(
            (metrics, wm_grads, actor_grads, critic_grads, wm_params, actor_params, critic_params)
        )
        updated = state.replace(
            wm_params=wm_params,
            actor_params=actor_params,
            critic_params=critic_params,
            slow_critic_params=slow_critic_params,
            wm_opt_state=wm_opt_state,
            actor_opt_state=actor_opt_state,
            critic_opt_state=critic_opt_state,
            updates=state.updates + 1,
        )
        # A non-finite update leaves every learned quantity as it was; the key still moves on
        # so the next batch is not retried with the same noise.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = new_state.replace(
            key=key,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        metrics.update(
            nonfinite=(~finite).astype(jnp.float32),
            nonfinite_streak=streak,
            nonfinite_total=new_state.nonfinite_total,
        )
        return new_state, metrics

    # ------------------------------------------------------------ open-loop report
    def _open_loop(
        self, wm_params: Params, batch: dict[str, jax.Array], key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """`open_loop_prediction` of a raw batch `[B, T, ...]` as the replay samples it, with
        the official context (fewer steps when chunks are shorter)."""
        context = min(OPEN_LOOP_CONTEXT, self.config.dataset.length - 1)
        data = preprocess(batch, self.config)
        return open_loop_prediction(self.world_model, wm_params, data, key, context)

    # ----------------------------------------------------------- policy step
    def initial_carry(
        self, num_envs: int, num_seeds: int | None = None
    ) -> tuple[RSSMState, jax.Array]:
        """`(latent, prev_action)` zeros for `num_envs` environments (`[num_envs, ...]`, or
        `[num_seeds, num_envs, ...]` on the seed axis); reset by `is_first` anyway."""
        lead = (num_envs,) if num_seeds is None else (num_seeds, num_envs)
        carry = initial_state(1, *rssm_sizes(self.config)), jnp.zeros((1, self.num_actions))
        return jax.tree.map(lambda x: jnp.zeros((*lead, *x.shape[1:]), jnp.float32), carry)

    def _act_seeds(self, params: PolicyParams, obs, carry, keys, mode: str):
        """`policy_step` for each seed `[N, E, ...]`, each splitting its own key `[N]` once
        per step as a single run's loop does. Returns `(action [N, E, A], carry, keys)`."""

        def act(params, obs, carry, key):
            key, step_key = jax.random.split(key)
            action, carry = self._policy_step(params, obs, carry, step_key, mode)
            return action, carry, key

        return over_seeds(act)(params, obs, carry, keys)

    def _check_policy_inputs(self, obs, carry) -> None:
        """One line naming what of `policy_step`'s inputs does not fit this agent (shapes
        are static: checked once per compile), where flax or XLA would name an internal."""
        key, shape = self.obs_key, self.obs_shape
        wanted = f"a dict of obs[{key!r}] [N, {', '.join(map(str, shape))}] and obs['is_first'] [N]"
        if not hasattr(obs, "keys") or key not in obs or "is_first" not in obs:
            got = f"keys {sorted(obs.keys())}" if hasattr(obs, "keys") else "no dict"
            raise ValueError(f"policy_step takes {wanted}; got {got}")
        images, is_first = jnp.shape(obs[key]), jnp.shape(obs["is_first"])
        if images[1:] != shape or is_first != images[:1]:
            raise ValueError(
                f"policy_step takes {wanted}; got {images} and {is_first} (one row per env)"
            )
        pair = isinstance(carry, tuple | list) and len(carry) == 2
        envs = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(carry)}
        if not pair or envs != {images[0]}:
            raise ValueError(
                f"the carry is not one for {images[0]} envs: start from "
                f"agent.initial_carry({images[0]}) and pass on what policy_step returns"
            )

    def _policy_step(
        self,
        params: PolicyParams,
        obs: dict[str, jax.Array],
        carry: tuple[RSSMState, jax.Array],
        key: jax.Array,
        mode: str = "train",
    ) -> tuple[jax.Array, tuple[RSSMState, jax.Array]]:
        """Act in `N` environments: filter the observation `[N, ...]` (with `is_first` `[N]`)
        into the latent, then sample (`train`) or take the mode (`eval`) of the actor, plus
        `expl_noise` or `eval_noise` (the official `action_noise`).

        Returns the action `[N, A]` (an exact one-hot for discrete actions) and the new carry.
        """
        self._check_policy_inputs(obs, carry)
        latent, prev_action = carry
        # With threefry partitionable (jax's default) the first two keys equal `split(key)`'s,
        # the keys from before the noise key existed: noise-free runs draw as they did.
        obs_key, action_key, noise_key = jax.random.split(key, 3)
        data = preprocess({self.obs_key: obs[self.obs_key]}, self.config)
        embed = self.world_model.apply(
            params.wm_params, data[self.obs_key], method=WorldModel.encode
        )
        posterior = self.world_model.apply(
            params.wm_params, latent, prev_action, embed, obs["is_first"], obs_key,
            method=WorldModel.obs_step,
        )  # fmt: skip
        policy = self.actor.apply(params.actor_params, get_feat(posterior))
        if mode == "train":
            # Not the straight-through sample of imagination: its float rounding (0.99999994)
            # would become 0 when replay stores the action as uint8.
            action, amount = policy.sample(seed=action_key), self.config.expl_noise
        elif mode == "eval":
            action, amount = actor_mode(policy), self.config.eval_noise
        else:
            raise ValueError(f"policy mode must be 'train' or 'eval', got {mode!r}")
        action = action_noise(action, amount, self.discrete, noise_key)
        return action, (posterior, action)
