"""The DreamerV2 world model (SPEC §2): encoder, RSSM, decoder, reward and discount heads,
and the pure functions that observe a batch and compute its loss.

Batches are dicts of `[B, T, ...]` arrays as replay returns them: the observation
(`image` uint8 `[B, T, 64, 64, C]` or `vector` float `[B, T, D]`), `action` `[B, T, A]`
(the action that led to each step), `reward`, `is_first`, `is_last`, `is_terminal` `[B, T]`.
"""

from __future__ import annotations

import functools
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from dreamer_jax.config import Config
from dreamer_jax.losses import kl_balance
from dreamer_jax.networks import (
    MLP,
    RSSM,
    ConvDecoder,
    ConvEncoder,
    Dtype,
    MLPDecoder,
    RSSMState,
    ScalarHead,
    get_feat,
    initial_state,
    latent_dist,
    unit_normal,
)

Params = Any


class WorldModel(nn.Module):
    """All world-model networks under one parameter tree. Call its methods through
    `model.apply(params, ..., method=WorldModel.<name>)`.
    """

    obs_key: str  # 'image' or 'vector'
    obs_shape: tuple[int, ...]
    config: Config
    dtype: Dtype = jnp.float32

    def setup(self):
        c, dtype = self.config, self.dtype
        if self.obs_key == "image":
            self.encoder = ConvEncoder(c.encoder.cnn_depth, c.encoder.cnn_kernels, dtype)
            self.decoder = ConvDecoder(
                self.obs_shape[-1], c.decoder.cnn_depth, c.decoder.cnn_kernels, dtype
            )
        else:
            self.encoder = MLP(tuple(c.encoder.mlp_layers), dtype)
            self.decoder = MLPDecoder(self.obs_shape[-1], tuple(c.decoder.mlp_layers), dtype)
        self.rssm = RSSM(c.rssm.hidden, c.rssm.deter, c.rssm.stoch, c.rssm.discrete, dtype)
        self.reward_head = ScalarHead(c.reward_head.layers, c.reward_head.units, dtype)
        if c.pred_discount:
            self.discount_head = ScalarHead(c.discount_head.layers, c.discount_head.units, dtype)

    def encode(self, obs: jax.Array) -> jax.Array:
        return self.encoder(obs)

    def obs_step(self, prev, prev_action, embed, is_first, key):
        return self.rssm.obs_step(prev, prev_action, embed, is_first, key)

    def img_step(self, prev, prev_action, key):
        return self.rssm.img_step(prev, prev_action, key)

    def prior_logits(self, deter):
        return self.rssm.prior_logits(deter)

    def decode(self, feat: jax.Array) -> jax.Array:
        """Mean of the observation `[..., *obs_shape]`."""
        return self.decoder(feat).astype(jnp.float32)

    def reward(self, feat: jax.Array) -> jax.Array:
        """Predicted (transformed) reward mean `[...]`."""
        return self.reward_head(feat)

    def discount_logits(self, feat: jax.Array) -> jax.Array:
        """Bernoulli logits `[...]` whose mean predicts `γ·(1 − is_terminal)`."""
        return self.discount_head(feat)

    def __call__(self, obs, action, is_first, key):
        """Used only by `init`: touches every layer with a `[B, ...]` step."""
        embed = self.encode(obs)
        post = self.obs_step(
            initial_state(obs.shape[0], *rssm_sizes(self.config)), action, embed, is_first, key
        )
        self.prior_logits(post.deter)
        feat = get_feat(post)
        self.decode(feat)
        self.reward(feat)
        if self.config.pred_discount:
            self.discount_logits(feat)


def rssm_sizes(config: Config) -> tuple[int, int, int]:
    """`(deter, stoch, discrete)` of the configured RSSM."""
    return config.rssm.deter, config.rssm.stoch, config.rssm.discrete


def preprocess(batch: dict[str, jax.Array], config: Config) -> dict[str, jax.Array]:
    """Inside jit (SPEC §1): image → x/255 − 0.5, reward → tanh(r) on Atari, and the
    discount target `(1 − is_terminal)·γ`. Other keys pass through (actions as float32).
    """
    out = dict(batch)
    if "image" in batch:
        out["image"] = batch["image"].astype(jnp.float32) / 255.0 - 0.5
    if "vector" in batch:
        out["vector"] = batch["vector"].astype(jnp.float32)
    if "action" in batch:
        out["action"] = batch["action"].astype(jnp.float32)
    if "reward" in batch:
        reward = batch["reward"].astype(jnp.float32)
        out["reward"] = jnp.tanh(reward) if config.clip_rewards == "tanh" else reward
    if "is_terminal" in batch:
        out["discount"] = (1.0 - batch["is_terminal"].astype(jnp.float32)) * config.discount
    return out


def observe(
    model: WorldModel,
    params: Params,
    embed: jax.Array,
    action: jax.Array,
    is_first: jax.Array,
    key: jax.Array,
) -> tuple[RSSMState, jax.Array]:
    """Filter a batch of sequences with `lax.scan` over time, from the zero state (as the
    official code: each replayed chunk starts fresh).

    Args:
      embed: `[B, T, E]`; action: `[B, T, A]` (led to each step); is_first: `[B, T]`.
    Returns:
      `(posterior, prior_logits)`: an `RSSMState` with leaves `[B, T, ...]` and the logits
      `[B, T, S, K]` of each step's prior, computed from the posterior's `h_t` after the scan.
    """
    batch, length = action.shape[:2]
    initial = initial_state(batch, *rssm_sizes(model.config))
    keys = jax.random.split(key, length)
    time_major = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (action, embed, is_first))
    posterior = posterior_scan(model, params, initial, *time_major, keys)
    posterior = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), posterior)
    return posterior, model.apply(params, posterior.deter, method=WorldModel.prior_logits)


def cast_step_kernels(params: Params, dense_outputs: Params) -> Params:
    """`params` with the kernel of each Dense layer of one loop step cast to the dtype the
    layer computes in (bf16 under `precision: bf16`), for passing into the loop.

    `dense_outputs` is the `"perturbations"` collection of one step traced with `jax.eval_shape`
    (`networks.Dense`): one output per layer, in the layer's compute dtype. Each Dense casts
    its kernel itself, but XLA did not hoist that cast out of the imagination loop, nor out of
    the observe scan's backward loop, whose `jax.checkpoint` recomputes it: every step cast
    every kernel again (8 seeds on the H200: about 3.6 ms of a 62 ms update;
    docs/benchmarks.md).
    For kernels whose gradient is not taken through the loop (stopped, or computed after it
    as `posterior_scan` does): a cast kernel's gradient would be summed in its own dtype.
    """
    flat = flatten_dict(params)
    for path, output in flatten_dict(dense_outputs).items():  # path: (*layer, "y")
        kernel = ("params", *path[:-1], "kernel")
        flat[kernel] = flat[kernel].astype(output.dtype)
    return unflatten_dict(flat)


def posterior_scan(
    model: WorldModel,
    params: Params,
    initial: RSSMState,
    action: jax.Array,
    embed: jax.Array,
    is_first: jax.Array,
    keys: jax.Array,
) -> RSSMState:
    """`obs_step` scanned over time-major inputs `[T, B, ...]`: posterior leaves `[T, B, ...]`.

    The values and gradients of `jax.lax.scan` over `obs_step`, except that each of the
    step's Dense kernels gets its gradient after the loop, as one matmul `Σ_t x_tᵀ·dy_t` over
    all steps. Left to autodiff, the scan's backward loop adds every step's `[K, N]` kernel
    gradient to a carried sum, reading and writing every kernel in each of the T steps (with
    8 seeds on the H200 these additions took 4.8 of the 67.5 ms of an update;
    docs/benchmarks.md). Inside the loop here the kernels are constants; each Dense records
    its inputs `x_t`, and its output gradients `dy_t` are those of zero perturbations added
    to its outputs (`networks.Dense`).
    """

    def apply_step(variables, prev, inputs, mutable):
        return model.apply(variables, prev, *inputs, method=WorldModel.obs_step, mutable=mutable)

    # One step traced for shapes only: the step's Dense layers and their outputs.
    first_inputs = jax.tree.map(lambda x: x[0], (action, embed, is_first, keys))
    _, probe = jax.eval_shape(
        lambda: apply_step(params, initial, first_inputs, ["dense_inputs", "perturbations"])
    )
    layers = [path[:-1] for path in flatten_dict(probe["perturbations"])]  # (..., layer, "y")
    kernels = {("params", *layer, "kernel"): layer for layer in layers}
    zero_outputs = functools.partial(
        jax.tree.map, lambda y: jnp.zeros((len(keys), *y.shape), y.dtype), probe["perturbations"]
    )

    def scan(params, perturbations, initial, action, embed, is_first, keys):
        params = cast_step_kernels(params, probe["perturbations"])

        def body(params, perturbation, prev, step_inputs):
            variables = {**params, "perturbations": perturbation}
            post, recorded = apply_step(variables, prev, step_inputs, ["dense_inputs"])
            return post, recorded["dense_inputs"]

        # The backward loop recomputes the step's elementwise work from its matmul outputs
        # instead of reading it back: the forward loop stores 15 arrays per step, not 38 (on
        # the GPU the stores were 28 of the forward step's 52 kernels; docs/benchmarks.md).
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_saveable)

        def step(prev, inputs):
            *step_inputs, perturbation = inputs
            post, dense_inputs = body(params, perturbation, prev, step_inputs)
            return post, (post, dense_inputs)

        inputs = (action, embed, is_first, keys, perturbations)
        _, (posterior, dense_inputs) = jax.lax.scan(step, initial, inputs)
        return posterior, dense_inputs

    @jax.custom_vjp
    def run(params, initial, action, embed, is_first, keys):
        return scan(params, zero_outputs(), initial, action, embed, is_first, keys)[0]

    def forward(params, initial, action, embed, is_first, keys):
        def scan_with_constant_kernels(params, perturbations, initial, action, embed):
            flat = flatten_dict(params)
            flat |= {path: jax.lax.stop_gradient(flat[path]) for path in kernels}
            return scan(unflatten_dict(flat), perturbations, initial, action, embed, is_first, keys)

        posterior, vjp, dense_inputs = jax.vjp(
            scan_with_constant_kernels, params, zero_outputs(), initial, action, embed,
            has_aux=True,
        )  # fmt: skip
        return posterior, (vjp, dense_inputs)

    def backward(residuals, posterior_grad):
        vjp, dense_inputs = residuals
        params_grad, output_grads, initial_grad, action_grad, embed_grad = vjp(posterior_grad)
        params_grad, inputs, output_grads = map(
            flatten_dict, (params_grad, dense_inputs, output_grads)
        )
        for path, layer in kernels.items():
            (x,), y_grad = inputs[(*layer, "x")], output_grads[(*layer, "y")]
            kernel_grad = jnp.einsum(
                "...k,...n->kn", x.astype(y_grad.dtype), y_grad,
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            params_grad[path] = kernel_grad.astype(params_grad[path].dtype)
        return unflatten_dict(params_grad), initial_grad, action_grad, embed_grad, None, None

    run.defvjp(forward, backward)
    return run(params, initial, action, embed, is_first, keys)


def world_model_loss(
    params: Params,
    model: WorldModel,
    data: dict[str, jax.Array],
    key: jax.Array,
    config: Config,
) -> tuple[jax.Array, tuple[RSSMState, dict[str, jax.Array]]]:
    """The model loss (SPEC §2) on a preprocessed batch `[B, T, ...]`.

    loss = kl_scale·kl + image + reward_scale·reward + discount_scale·discount, each term the
    mean negative log-likelihood over `B×T`. Heads not in `config.grad_heads` see features
    with stopped gradients.

    Returns:
      `(loss, (posterior, metrics))`; posterior leaves `[B, T, ...]`.
    """
    embed = model.apply(params, data[model.obs_key], method=WorldModel.encode)
    posterior, prior_logits = observe(model, params, embed, data["action"], data["is_first"], key)
    kl_loss, kl_value = kl_balance(posterior.logits, prior_logits, **config.kl)
    feat = get_feat(posterior)

    def head_feat(name):
        return feat if name in config.grad_heads else jax.lax.stop_gradient(feat)

    obs_mean = model.apply(params, head_feat("decoder"), method=WorldModel.decode)
    obs_event_dims = len(model.obs_shape)
    losses = {
        "kl": kl_loss,
        model.obs_key: -unit_normal(obs_mean, obs_event_dims).log_prob(data[model.obs_key]).mean(),
        "reward": -unit_normal(
            model.apply(params, head_feat("reward"), method=WorldModel.reward), 0
        )
        .log_prob(data["reward"])
        .mean(),
    }
    if config.pred_discount:
        logits = model.apply(params, head_feat("discount"), method=WorldModel.discount_logits)
        # The target is γ or 0, a soft label: Bernoulli log-likelihood is defined for it.
        losses["discount"] = -distrax.Bernoulli(logits=logits).log_prob(data["discount"]).mean()
    scales = config.loss_scales
    model_loss = sum(scales.get(name, 1.0) * value for name, value in losses.items())
    metrics = {f"{name}_loss": value for name, value in losses.items()}
    metrics.update(
        model_loss=model_loss,
        kl=kl_value.mean(),
        prior_entropy=latent_dist(prior_logits).entropy().mean(),
        post_entropy=latent_dist(posterior.logits).entropy().mean(),
    )
    return model_loss, (posterior, metrics)


# The official report's context: 5 observed steps, then the prior alone.
OPEN_LOOP_CONTEXT = 5


def open_loop_prediction(
    model: WorldModel,
    params: Params,
    data: dict[str, jax.Array],
    key: jax.Array,
    context: int,
) -> tuple[jax.Array, jax.Array]:
    """SPEC §6: observe the first `context` steps with the posterior, then imagine the rest
    with the prior under the recorded actions, and decode both.

    Args:
      data: a preprocessed batch `[B, T, ...]`.
    Returns:
      `(truth, prediction)`, each `[B, T, *obs_shape]` in the preprocessed scale.
    """
    observe_key, imagine_key = jax.random.split(key)
    embed = model.apply(params, data[model.obs_key][:, :context], method=WorldModel.encode)
    posterior, _ = observe(
        model, params, embed, data["action"][:, :context], data["is_first"][:, :context],
        observe_key,
    )  # fmt: skip
    last = jax.tree.map(lambda x: x[:, -1], posterior)
    future_actions = jnp.swapaxes(data["action"][:, context:], 0, 1)  # [T - context, B, A]
    keys = jax.random.split(imagine_key, future_actions.shape[0])

    def step(state, inputs):
        action, step_key = inputs
        state = model.apply(params, state, action, step_key, method=WorldModel.img_step)
        return state, state

    _, imagined = jax.lax.scan(step, last, (future_actions, keys))
    imagined = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), imagined)
    feats = jnp.concatenate([get_feat(posterior), get_feat(imagined)], 1)
    prediction = model.apply(params, feats, method=WorldModel.decode)
    return data[model.obs_key], prediction
