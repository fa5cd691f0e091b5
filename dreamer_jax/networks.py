"""Flax (linen) networks of DreamerV2 (SPEC §2-§3) and the distributions they output.

Shapes: `B` batch, `S` stochastic latents, `K` classes per latent, `D` deterministic size,
`A` action size. Modules accept any number of leading dims unless a docstring says otherwise.
Parameters are always fp32; `dtype` is the compute dtype (bf16 under mixed precision). Every
distribution is built in fp32 so losses are fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype

# The official code uses Keras defaults, not flax's (lecun-normal kernels): glorot-uniform
# kernels and zero biases on every Dense/Conv/ConvTranspose, LayerNorm epsilon 1e-3.
_glorot = nn.initializers.xavier_uniform()


class Dense(nn.Dense):
    """`nn.Dense` with the official glorot-uniform kernel.

    Applied with the mutable collection `"dense_inputs"`, it also records its input `x`
    there and adds the zero `"perturbations"` variable `y` to its output, whose gradient is
    then the output's: `world_model.posterior_scan` computes the observe scan's kernel
    gradients from both after the loop.
    """

    kernel_init: nn.initializers.Initializer = _glorot

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.is_mutable_collection("dense_inputs") and not self.is_initializing():
            self.sow("dense_inputs", "x", x)
            y = self.perturb("y", y)
        return y


class RSSMState(NamedTuple):
    """The latent state of the RSSM; a pytree. Leading dims are whatever the caller uses."""

    deter: jax.Array  # [..., D] GRU state h
    stoch: jax.Array  # [..., S, K] one-hot sample z (straight-through)
    logits: jax.Array  # [..., S, K] logits of the distribution z was drawn from


def initial_state(batch: int, deter: int, stoch: int, discrete: int) -> RSSMState:
    """The all-zeros state `[batch, ...]` every sequence starts from."""
    zeros = jnp.zeros((batch, stoch, discrete), jnp.float32)
    return RSSMState(jnp.zeros((batch, deter), jnp.float32), zeros, zeros)


def first_max_onehot(values: jax.Array) -> jax.Array:
    """`[..., K]` -> one-hot of each row's first maximum, `jax.nn.one_hot(argmax(values))`.

    Why not `argmax`: XLA:CPU runs arg-max as a reduction over (value, index) pairs that it
    does not vectorize; with a max, a min over indices and a comparison instead, the classic
    preset's update ran 1.16x faster and the Atari one 1.03x (docs/benchmarks.md).
    """
    classes = jax.lax.broadcasted_iota(jnp.int32, values.shape, values.ndim - 1)
    is_max = values == values.max(-1, keepdims=True)
    first = jnp.min(jnp.where(is_max, classes, values.shape[-1]), -1, keepdims=True)
    return (classes == first).astype(jnp.float32)


def onehot_sample(logits: jax.Array, key: jax.Array) -> jax.Array:
    """One-hot draw `[..., K]` of `OneHotCategorical(logits)`: the Gumbel-max draw of
    `distrax`'s `sample(seed=key)` (`jax.random.categorical`), up to XLA's float rounding of
    the noise."""
    return first_max_onehot(jax.random.gumbel(key, logits.shape) + logits.astype(jnp.float32))


def straight_through_onehot(logits: jax.Array, key: jax.Array) -> jax.Array:
    """One-hot sample of `OneHotCategorical(logits)` over the last axis with straight-through
    gradients: the forward value is the one-hot sample, the gradient is the softmax's.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    return onehot_sample(logits, key) + probs - jax.lax.stop_gradient(probs)


def latent_dist(logits: jax.Array) -> distrax.Distribution:
    """`[..., S, K]` logits -> S independent one-hot categoricals (event shape `[S, K]`)."""
    return distrax.Independent(
        distrax.OneHotCategorical(logits=logits.astype(jnp.float32), dtype=jnp.float32), 1
    )


def get_feat(state: RSSMState) -> jax.Array:
    """`[..., S*K + D]` features the heads read: flattened sample and deterministic state."""
    stoch = state.stoch.reshape(*state.stoch.shape[:-2], -1)
    return jnp.concatenate([stoch, state.deter.astype(stoch.dtype)], -1)


def unit_normal(mean: jax.Array, event_dims: int) -> distrax.Distribution:
    """Normal(mean, 1) whose last `event_dims` axes form the event (log-prob summed)."""
    mean = mean.astype(jnp.float32)
    dist = distrax.Normal(mean, jnp.ones_like(mean))
    return distrax.Independent(dist, event_dims) if event_dims else dist


class MLP(nn.Module):
    """Dense layers of `widths` (one entry per layer) with ELU."""

    widths: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        for width in self.widths:
            x = nn.elu(Dense(width, dtype=self.dtype)(x))
        return x


def _patches(x: jax.Array, taps: int, rows: int, cols: int) -> jax.Array:
    """Stride-1 im2col by slicing: `[N, H, W, C]` -> `[N, rows, cols, taps*taps*C]`, where
    pixel `(i, j)` holds window `x[i:i+taps, j:j+taps]` in `(tap row, tap col, C)` order."""
    return jnp.concatenate(
        [x[:, i : i + rows, j : j + cols] for i in range(taps) for j in range(taps)], -1
    )


@jax.custom_vjp
def patch_matmul(patches: jax.Array, kernel: jax.Array) -> jax.Array:
    """`patches @ kernel` (`[..., K] @ [K, O]`) whose gradient XLA:CPU computes without a
    transposed copy of the output gradient: left to autodiff, XLA materializes each conv
    layer's output gradient twice, once transposed for the kernel's gradient (up to 138 MB
    per layer at the Atari preset); as one dot contracting the flattened rows of both it needs
    none (the Atari update 1.03–1.07× faster, docs/benchmarks.md). Same maths as `@`."""
    return patches @ kernel


def _patch_matmul_fwd(patches, kernel):
    return patches @ kernel, (patches, kernel)


def _patch_matmul_bwd(residuals, out_grad):
    patches, kernel = residuals
    # Materialized once, in the layout both gradient dots read.
    out_grad = jax.lax.optimization_barrier(out_grad)
    rows = out_grad.reshape(-1, out_grad.shape[-1])
    kernel_grad = jax.lax.dot_general(
        patches.reshape(-1, patches.shape[-1]), rows, (((0,), (0,)), ((), ()))
    )
    return (out_grad @ kernel.T).astype(patches.dtype), kernel_grad.astype(kernel.dtype)


patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


def _stride2_operands(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The patches `[N, H', W', t*t*4*C]` and kernel `[t*t*4*C, O]` whose product is
    `conv_stride2(x, kernel)`."""
    k, _, c, o = kernel.shape
    t = (k + 1) // 2
    n, h, w, _ = x.shape
    rows, cols = (h - k) // 2 + 1, (w - k) // 2 + 1
    # Exactly the 2(rows+t-1) input rows the windows read: crops, or pads one zero row that
    # only a zero kernel row reads.
    pads = [(0, 0, 0), (0, 2 * (rows + t - 1) - h, 0), (0, 2 * (cols + t - 1) - w, 0), (0, 0, 0)]
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    x = x.reshape(n, rows + t - 1, 2, cols + t - 1, 2, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, rows + t - 1, cols + t - 1, 4 * c)
    kernel = jnp.pad(kernel, ((0, 2 * t - k), (0, 2 * t - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(t, 2, t, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(-1, o)
    return _patches(x, t, rows, cols), kernel


def conv_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`nn.Conv(strides=2, padding="VALID")` without bias as one matmul: `[N, H, W, C]`,
    kernel `[k, k, C, O]` -> `[N, (H-k)//2+1, (W-k)//2+1, O]`.

    Space-to-depth turns the stride-2 k×k window into a stride-1 t×t window (`t = ceil(k/2)`)
    over 2×2 pixel blocks; an odd kernel gets a zero last row and column to fit the blocks.
    """
    return patch_matmul(*_stride2_operands(x, kernel))


def _stride2_taps(out: jax.Array, k: int, rows: int, cols: int) -> jax.Array:
    """The windows of a stride-2 k×k convolution, exact taps: `[N, 2·rows+k-2, 2·cols+k-2,
    O]` -> `[N, rows, cols, k*k*O]`, pixel `(i, j)` holding `out[2i+a, 2j+b]` in `(a, b, O)`
    order. Read from the 2×2 pixel blocks (one zero row and column pad an odd size). The
    encoder's `_stride2_operands` reads the same windows as t×t slices of 4·C channels instead
    (fewer, wider copies)."""
    n, _, _, o = out.shape
    t = (k + 1) // 2
    pads = ((0, 0), (0, 2 * (rows + t - 1) - out.shape[1]), (0, 2 * (cols + t - 1) - out.shape[2]))
    blocks = jnp.pad(out, (*pads, (0, 0))).reshape(n, rows + t - 1, 2, cols + t - 1, 2, o)
    return jnp.concatenate(
        [
            blocks[:, a // 2 : a // 2 + rows, a % 2, b // 2 : b // 2 + cols, b % 2]
            for a in range(k)
            for b in range(k)
        ],
        -1,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def overlap_add(taps: jax.Array, k: int) -> jax.Array:
    """The adjoint of `_stride2_taps`: `[N, H, W, k*k*O]` -> `[N, 2H+k-2, 2W+k-2, O]`, adding
    tap `(a, b)` of input pixel `(i, j)` to output pixel `(2i+a, 2j+b)`.

    Each output phase (row, column parity) is a sum of ⌈k/2⌉² shifted tap arrays. The gradient
    is `_stride2_taps` of the output gradient, one concatenation: left to autodiff, XLA builds
    one full-size array per tap (the Atari decoder 1.3× slower).
    """
    n, h, w, _ = taps.shape
    t = (k + 1) // 2
    taps = taps.reshape(n, h, w, k, k, -1)

    def phase(r: int, s: int) -> jax.Array:  # `[N, H+t-1, W+t-1, O]`
        shifted = [
            jnp.pad(
                taps[:, :, :, 2 * p + r, 2 * q + s],
                ((0, 0), (p, t - 1 - p), (q, t - 1 - q), (0, 0)),
            )
            for p in range(t)
            for q in range(t)
            if 2 * p + r < k and 2 * q + s < k
        ]
        return functools.reduce(jnp.add, shifted)

    phases = jnp.stack([jnp.stack([phase(r, s) for s in (0, 1)], 3) for r in (0, 1)], 2)
    out = phases.reshape(n, 2 * (h + t - 1), 2 * (w + t - 1), -1)
    return out[:, : 2 * h + k - 2, : 2 * w + k - 2]


def _overlap_add_fwd(taps, k):
    return overlap_add(taps, k), taps.shape


def _overlap_add_bwd(k, shape, out_grad):
    return (_stride2_taps(out_grad, k, shape[1], shape[2]),)


overlap_add.defvjp(_overlap_add_fwd, _overlap_add_bwd)


def conv_transpose_stride2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`nn.ConvTranspose(strides=2, padding="VALID")` without bias as one matmul:
    `[N, H, W, C]`, kernel `[k, k, C, O]` -> `[N, 2H+k-2, 2W+k-2, O]`.

    flax does not flip the kernel: input pixel `i` adds `x[i]·kernel[k-1-a]` to output pixel
    `2i+a`. Two exact lowerings; each materializes one large array, so the smaller wins:
    - direct: one matmul maps each input pixel to its k²·O contributions (the flipped kernel),
      and `overlap_add` sums them into the output. No multiply is wasted.
    - sub-pixel: each of the 4 output phases (row, column parity) is a stride-1 t×t
      convolution (`t = ceil(k/2)`), so one matmul of the input's t×t patches (t²·C values
      per pixel) computes all 4 and depth-to-space interleaves them. It multiplies the zeros
      around the input's border, and for odd k a zero kernel row and column.
    """
    k, _, c, o = kernel.shape
    n, h, w, _ = x.shape
    t = (k + 1) // 2
    rows, cols = h + t - 1, w + t - 1
    if h * w * k * k * o <= rows * cols * t * t * c:
        flipped = kernel[::-1, ::-1].transpose(2, 0, 1, 3).reshape(c, k * k * o)
        return overlap_add(patch_matmul(x, flipped), k)
    # A zero first row and column make an odd kernel even (and add one zero output row and
    # column, cropped below). Then tap i of phase r reads kernel row 2i + 1 - r.
    kernel = jnp.pad(kernel, ((2 * t - k, 0), (2 * t - k, 0), (0, 0), (0, 0)))
    kernel = kernel.reshape(t, 2, t, 2, c, o)[:, ::-1, :, ::-1]
    kernel = kernel.transpose(0, 2, 4, 1, 3, 5).reshape(t * t * c, 4 * o)
    x = jnp.pad(x, ((0, 0), (t - 1, t - 1), (t - 1, t - 1), (0, 0)))
    y = patch_matmul(_patches(x, t, rows, cols), kernel).reshape(n, rows, cols, 2, 2, o)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * rows, 2 * cols, o)
    return y[:, : 2 * h + k - 2, : 2 * w + k - 2]


class _Stride2Conv(nn.Module):
    """A stride-2 VALID `nn.Conv` (or `nn.ConvTranspose` if `transpose`) with the same
    parameters and maths, lowered to matmuls: XLA:CPU runs matmuls several times faster than
    its convolutions (docs/benchmarks.md). `[N, H, W, C]` -> `[N, H', W', features]`.
    """

    features: int
    kernel_size: int
    transpose: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", _glorot, shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        conv = conv_transpose_stride2 if self.transpose else conv_stride2
        return conv(x, kernel) + bias


class ConvEncoder(nn.Module):
    """`[..., 64, 64, C]` image in [-0.5, 0.5] -> `[..., 2*2*8*depth]` embedding."""

    depth: int = 48
    kernels: Sequence[int] = (4, 4, 4, 4)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        lead = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).astype(self.dtype)
        for i, kernel in enumerate(self.kernels):
            conv = _Stride2Conv(2**i * self.depth, kernel, dtype=self.dtype, name=f"Conv_{i}")
            x = nn.elu(conv(x))
        return x.reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """`[..., F]` features -> `[..., 64, 64, channels]` mean image."""

    channels: int
    depth: int = 48
    kernels: Sequence[int] = (5, 5, 6, 6)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        lead = feat.shape[:-1]
        x = Dense(32 * self.depth, dtype=self.dtype)(feat.astype(self.dtype))
        x = x.reshape(-1, 1, 1, 32 * self.depth)
        for i, kernel in enumerate(self.kernels):
            last = i == len(self.kernels) - 1
            depth = self.channels if last else 2 ** (len(self.kernels) - i - 2) * self.depth
            name = f"ConvTranspose_{i}"
            x = _Stride2Conv(depth, kernel, transpose=True, dtype=self.dtype, name=name)(x)
            x = x if last else nn.elu(x)
        return x.reshape(*lead, *x.shape[1:])


class MLPDecoder(nn.Module):
    """`[..., F]` features -> `[..., size]` mean of a vector observation."""

    size: int
    widths: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        x = MLP(self.widths, self.dtype)(feat)
        return Dense(self.size, dtype=self.dtype)(x)


class ScalarHead(nn.Module):
    """MLP -> one scalar per input: `[..., F]` -> `[...]` (reward/value mean or logit).

    The output layer computes in fp32 whatever `dtype` is: values reach the hundreds at
    discount 0.999, where bf16's 8-bit mantissa rounds to steps of 2 (DEVIATION: the official
    fp16 policy rounds there too, 8x finer). One `[units] -> 1` product costs nothing.
    """

    layers: int
    units: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> jax.Array:
        x = MLP((self.units,) * self.layers, self.dtype)(feat)
        return Dense(1, dtype=jnp.float32)(x)[..., 0]


class GRUCell(nn.Module):
    """The DreamerV2 GRU: one Dense over `[x, h]`, LayerNorm (fp32), update bias -1.

    The Dense has a bias: the official `use_bias=norm is not None` is always true.
    """

    size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        parts = Dense(3 * self.size, dtype=self.dtype)(
            jnp.concatenate([x.astype(self.dtype), h.astype(self.dtype)], -1)
        )
        parts = nn.LayerNorm(epsilon=1e-3, dtype=jnp.float32)(parts.astype(jnp.float32))
        reset, cand, update = jnp.split(parts, 3, -1)
        reset = jax.nn.sigmoid(reset)
        cand = jnp.tanh(reset * cand)
        update = jax.nn.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * h.astype(jnp.float32)


class RSSM(nn.Module):
    """Recurrent state-space model with `stoch` categorical latents of `discrete` classes.

    `img_step` is the prior (imagination) step, `obs_step` adds the posterior from an
    embedding. Both take the previous state and action with leading dims `[B]`.
    """

    hidden: int
    deter: int
    stoch: int = 32
    discrete: int = 32
    dtype: Dtype = jnp.float32

    def setup(self):
        self.img_in = Dense(self.hidden, dtype=self.dtype)
        self.cell = GRUCell(self.deter, dtype=self.dtype)
        self.img_out = Dense(self.hidden, dtype=self.dtype)
        self.img_logits = Dense(self.stoch * self.discrete, dtype=self.dtype)
        self.obs_out = Dense(self.hidden, dtype=self.dtype)
        self.obs_logits = Dense(self.stoch * self.discrete, dtype=self.dtype)

    def _logits(self, layer: nn.Dense, x: jax.Array) -> jax.Array:
        logits = layer(x).astype(jnp.float32)
        return logits.reshape(*logits.shape[:-1], self.stoch, self.discrete)

    def deter_step(self, prev: RSSMState, prev_action: jax.Array) -> jax.Array:
        """`h_t = GRU(elu(img_in([z_{t-1}, a_{t-1}])), h_{t-1})`: `[B, D]`."""
        prev_stoch = prev.stoch.reshape(*prev.stoch.shape[:-2], -1)
        x = jnp.concatenate([prev_stoch, prev_action.astype(prev_stoch.dtype)], -1)
        x = nn.elu(self.img_in(x.astype(self.dtype)))
        return self.cell(x, prev.deter)

    def prior_logits(self, deter: jax.Array) -> jax.Array:
        """`[..., D]` -> `[..., S, K]`: the logits of the prior `p(ẑ_t | h_t)`."""
        return self._logits(self.img_logits, nn.elu(self.img_out(deter.astype(self.dtype))))

    def img_step(self, prev: RSSMState, prev_action: jax.Array, key: jax.Array) -> RSSMState:
        """Prior: `(h, z)_{t-1}, a_{t-1} -> (h_t, ẑ_t)`."""
        deter = self.deter_step(prev, prev_action)
        logits = self.prior_logits(deter)
        return RSSMState(deter, straight_through_onehot(logits, key), logits)

    def obs_step(
        self,
        prev: RSSMState,
        prev_action: jax.Array,
        embed: jax.Array,
        is_first: jax.Array,
        key: jax.Array,
    ) -> RSSMState:
        """Posterior for one step: `(h, z)_{t-1}, a_{t-1}, e_t -> (h_t, z_t)`. `is_first` `[B]`
        zeroes the previous state and action, so every episode (and every replayed chunk)
        starts from the initial state.

        The step's prior is `prior_logits(posterior.deter)`: it reads only `h_t` and nothing
        here needs its sample, so a sequence's priors are one batched call after the scan
        (`world_model.observe`) instead of small ones in every step.
        """
        keep = 1.0 - is_first.astype(jnp.float32)
        prev, prev_action = jax.tree.map(
            lambda x: x * keep.reshape(-1, *[1] * (x.ndim - 1)), (prev, prev_action)
        )
        deter = self.deter_step(prev, prev_action)
        x = jnp.concatenate([deter.astype(self.dtype), embed.astype(self.dtype)], -1)
        logits = self._logits(self.obs_logits, nn.elu(self.obs_out(x)))
        return RSSMState(deter, straight_through_onehot(logits, key), logits)

    def __call__(self, prev, prev_action, embed, is_first, key):
        """Used only by `init`: touches every layer."""
        posterior = self.obs_step(prev, prev_action, embed, is_first, key)
        self.prior_logits(posterior.deter)
        return posterior


class Actor(nn.Module):
    """`[..., F]` features -> action distribution (one-hot categorical or tanh-Normal)."""

    num_actions: int
    discrete: bool
    layers: int
    units: int
    min_std: float = 0.1
    init_std: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feat: jax.Array) -> distrax.Distribution:
        x = MLP((self.units,) * self.layers, self.dtype)(feat)
        # The output layer in fp32, as ScalarHead's: its products are few.
        if self.discrete:
            logits = Dense(self.num_actions, dtype=jnp.float32)(x)
            return distrax.OneHotCategorical(logits=logits, dtype=jnp.float32)
        out = Dense(2 * self.num_actions, dtype=jnp.float32)(x)
        mean, std = jnp.split(out, 2, -1)
        mean = 5.0 * jnp.tanh(mean / 5.0)  # keep pre-tanh means in a range tanh can resolve
        std = jax.nn.softplus(std + self.init_std) + self.min_std
        return distrax.Independent(
            distrax.Transformed(distrax.Normal(mean, std), distrax.Tanh()), 1
        )


def actor_sample(dist: distrax.Distribution, key: jax.Array) -> jax.Array:
    """A differentiable action sample for imagination: straight-through one-hot, or
    reparameterized tanh-Normal. The one-hot is exact only up to float rounding; acting uses
    `dist.sample(seed=key)`, the same draw without the gradient terms.
    """
    if isinstance(dist, distrax.OneHotCategorical):
        return straight_through_onehot(dist.logits, key)
    return dist.sample(seed=key)


def actor_mode(dist: distrax.Distribution) -> jax.Array:
    """The greedy action: arg-max one-hot, or tanh of the Normal's mean.

    DEVIATION: the official code estimates the tanh-Normal mode from 100 samples; tanh(mean)
    is its deterministic limit (and its continuous default is a truncated Normal; SPEC.md's
    tanh-Normal is used here).
    """
    if isinstance(dist, distrax.OneHotCategorical):
        return jax.nn.one_hot(jnp.argmax(dist.logits, -1), dist.logits.shape[-1])
    return jnp.tanh(dist.distribution.distribution.loc)


def action_noise(action: jax.Array, amount: float, discrete: bool, key: jax.Array) -> jax.Array:
    """The official exploration noise on actions `[N, A]`: discrete, a one-hot drawn from
    `amount/A + (1 − amount)·action`; continuous, `clip(Normal(action, amount), −1, 1)`.
    `amount` is static; 0 returns the action unchanged (and draws nothing).
    """
    if amount == 0:
        return action
    if discrete:
        probs = amount / action.shape[-1] + (1.0 - amount) * action
        return distrax.OneHotCategorical(probs=probs, dtype=jnp.float32).sample(seed=key)
    return jnp.clip(action + amount * jax.random.normal(key, action.shape), -1.0, 1.0)


def actor_entropy(dist: distrax.Distribution, key: jax.Array) -> jax.Array:
    """Entropy `[...]`: exact for categoricals, a one-sample reparameterized estimate
    `-log π(a)` for the tanh-Normal (whose entropy has no closed form).
    """
    if isinstance(dist, distrax.OneHotCategorical):
        return dist.entropy()
    sample, log_prob = dist.sample_and_log_prob(seed=key)
    del sample
    return -log_prob


def action_log_prob(dist: distrax.Distribution, action: jax.Array) -> jax.Array:
    """`log π(action)`; tanh-Normal actions are pulled inside (-1, 1) where log-prob is finite."""
    if isinstance(dist, distrax.OneHotCategorical):
        return dist.log_prob(action)
    return dist.log_prob(jnp.clip(action, -1 + 1e-6, 1 - 1e-6))
