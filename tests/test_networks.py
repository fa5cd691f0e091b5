import functools

import chex
import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FlaxConvDecoder, FlaxConvEncoder, product_input_dtypes, vector_agent

from dreamer_jax.agent import Agent
from dreamer_jax.config import make_config
from dreamer_jax.networks import (
    RSSM,
    Actor,
    ConvDecoder,
    ConvEncoder,
    GRUCell,
    ScalarHead,
    action_noise,
    conv_transpose_stride2,
    first_max_onehot,
    get_feat,
    initial_state,
    onehot_sample,
    patch_matmul,
    straight_through_onehot,
)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_matmul_value_and_gradients_are_those_of_matmul_also_per_seed(dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    patches = jax.random.normal(keys[0], (3, 2, 5, 4, 12)).astype(dtype)  # [seed, N, H, W, K]
    kernel = jax.random.normal(keys[1], (3, 12, 6)).astype(dtype)  # [seed, K, O]
    weights = jax.random.normal(keys[2], (3, 2, 5, 4, 6))

    def loss(matmul):
        per_seed = lambda x, w, c: (matmul(x, w).astype(jnp.float32) * c).sum()
        return lambda x, w: jax.vmap(per_seed)(x, w, weights).sum()

    ours = jax.value_and_grad(loss(patch_matmul), argnums=(0, 1))(patches, kernel)
    reference = jax.value_and_grad(loss(jnp.matmul), argnums=(0, 1))(patches, kernel)
    chex.assert_trees_all_equal_dtypes(ours, reference)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    chex.assert_trees_all_close(ours, reference, rtol=tol, atol=tol * 10)


def test_first_max_onehot_marks_the_first_maximum_of_each_row():
    values = np.array(
        [
            [1.0, 3.0, 3.0, 0.0],
            [-2.0, -5.0, -2.0, -9.0],
            [0.5, 0.0, 0.0, 0.5],
            [0.0, 1.0, 2.0, 7.0],
        ],
        np.float32,
    )
    expected = np.eye(4, dtype=np.float32)[values.argmax(-1)]  # numpy: first index on ties
    np.testing.assert_array_equal(first_max_onehot(jnp.asarray(values)), expected)
    np.testing.assert_array_equal(first_max_onehot(jnp.asarray(values[:, None])), expected[:, None])


def test_onehot_sample_draws_what_distrax_draws_for_the_same_key():
    logits = 3 * jax.random.normal(jax.random.key(0), (6, 32, 32))
    for key in jax.random.split(jax.random.key(1), 5):
        reference = distrax.OneHotCategorical(logits=logits, dtype=jnp.float32).sample(seed=key)
        np.testing.assert_array_equal(onehot_sample(logits, key), reference)


def test_straight_through_forward_is_onehot_and_gradient_is_softmax():
    logits = jax.random.normal(jax.random.key(0), (5, 4, 7))
    weights = jax.random.normal(jax.random.key(1), (5, 4, 7))
    sample = straight_through_onehot(logits, jax.random.key(2))
    # Forward value: a one-hot sample (up to the float rounding of `+ p − sg(p)`).
    onehot = jax.nn.one_hot(jnp.argmax(sample, -1), 7)
    np.testing.assert_allclose(sample, onehot, atol=1e-6)
    st_grad = jax.grad(lambda x: (weights * straight_through_onehot(x, jax.random.key(2))).sum())
    softmax_grad = jax.grad(lambda x: (weights * jax.nn.softmax(x)).sum())
    np.testing.assert_allclose(st_grad(logits), softmax_grad(logits), rtol=1e-5, atol=1e-6)


def test_straight_through_samples_follow_the_softmax():
    logits = jnp.log(jnp.array([0.7, 0.2, 0.1]))
    keys = jax.random.split(jax.random.key(3), 4000)
    samples = jax.vmap(lambda k: straight_through_onehot(logits, k))(keys)
    np.testing.assert_allclose(samples.mean(0), [0.7, 0.2, 0.1], atol=0.03)


def test_conv_encoder_decoder_shapes():
    image = jnp.zeros((2, 3, 64, 64, 1))
    encoder = ConvEncoder(depth=48)
    params = encoder.init(jax.random.key(0), image)
    chex.assert_shape(encoder.apply(params, image), (2, 3, 1536))
    decoder = ConvDecoder(channels=3, depth=4)
    feat = jnp.zeros((2, 3, 40))
    out = decoder.apply(decoder.init(jax.random.key(0), feat), feat)
    chex.assert_shape(out, (2, 3, 64, 64, 3))


def _conv_pairs(depth=4, lead=(2,), enc_kernels=(4, 4, 4, 4), dec_kernels=(5, 5, 6, 6), channels=1):
    """(module, flax reference, random input) for the encoder and for the decoder."""
    rng = np.random.default_rng(0)
    image = rng.uniform(-0.5, 0.5, (*lead, 64, 64, channels)).astype(np.float32)
    feat = rng.normal(size=(*lead, 24)).astype(np.float32)
    return [
        (ConvEncoder(depth, enc_kernels), FlaxConvEncoder(depth, enc_kernels), image),
        (
            ConvDecoder(channels, depth, dec_kernels),
            FlaxConvDecoder(channels, depth, dec_kernels),
            feat,
        ),
    ]


def _random_params(module, x, seed=1):
    """Random (non-init) values in `module`'s parameter tree: init biases are zero and would
    hide errors. Kernels are scaled by 1/sqrt(fan-in) so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    scale = lambda shape: 1 / np.sqrt(np.prod(shape[:-1])) if len(shape) > 1 else 0.3
    return jax.tree.map(
        lambda leaf: (scale(leaf.shape) * rng.normal(size=leaf.shape)).astype(np.float32),
        jax.eval_shape(module.init, jax.random.key(0), x),
    )


def _assert_trees_close(actual, desired, rtol=2e-5):
    """Leafwise `|a − d| <= rtol·(|d| + max|d|)`: relative, with an absolute floor for the
    near-zero entries of a large tensor."""
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        chex.assert_equal_shape([a, d])
        np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * float(np.max(np.abs(d))))


@functools.partial(jax.jit, static_argnums=0)
def _output_and_grads(module, params, x, weights):
    """The output and the gradients w.r.t. every parameter and the input of a loss that
    weights each output entry differently (so a misplaced entry changes every gradient)."""
    loss = lambda params, x: jnp.sum(weights * module.apply(params, x) ** 2)
    return module.apply(params, x), jax.grad(loss, (0, 1))(params, x)


# The debug size, the Atari shapes on 2 frames, and odd kernels; between them the decoder runs
# both lowerings with even kernels and the direct one with odd ones (each lowering with each
# parity on its own: the next test).
@pytest.mark.parametrize(
    "depth, lead, enc_kernels, dec_kernels, channels",
    [
        (4, (2, 3), (4, 4, 4, 4), (5, 5, 6, 6), 3),
        (48, (2,), (4, 4, 4, 4), (5, 5, 6, 6), 1),
        (4, (2,), (3, 5, 3, 4), (3, 5, 4, 5), 1),
    ],
)
def test_conv_encoder_decoder_equal_flax_conv_layers(
    depth, lead, enc_kernels, dec_kernels, channels
):
    for module, reference, x in _conv_pairs(depth, lead, enc_kernels, dec_kernels, channels):
        # Same parameter tree: names and shapes.
        chex.assert_trees_all_equal_shapes_and_dtypes(
            jax.eval_shape(module.init, jax.random.key(0), x),
            jax.eval_shape(reference.init, jax.random.key(0), x),
        )
        params = _random_params(reference, x)
        shape = jax.eval_shape(reference.apply, params, x).shape
        weights = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        _assert_trees_close(
            _output_and_grads(module, params, x, weights),
            _output_and_grads(reference, params, x, weights),
        )


# (H, k, C, O), with the lowering the size rule picks (docstring of conv_transpose_stride2):
# direct for a 1×1 input, odd k and even k; sub-pixel for even and odd k.
@pytest.mark.parametrize(
    "h, k, c, o", [(1, 5, 16, 8), (5, 5, 16, 8), (30, 6, 4, 1), (13, 6, 8, 4), (13, 5, 8, 4)]
)
def test_conv_transpose_stride2_equals_flax_conv_transpose_in_each_lowering(h, k, c, o):
    rng = np.random.default_rng(h + k)
    x = rng.normal(size=(2, h, h, c)).astype(np.float32)
    kernel = (rng.normal(size=(k, k, c, o)) / np.sqrt(k * k * c)).astype(np.float32)
    flax_layer = nn.ConvTranspose(o, (k, k), strides=(2, 2), padding="VALID", use_bias=False)
    reference = lambda x, kernel: flax_layer.apply({"params": {"kernel": kernel}}, x)
    size = 2 * h + k - 2
    weights = rng.normal(size=(2, size, size, o)).astype(np.float32)

    def output_and_grads(conv):
        loss = lambda x, kernel: jnp.sum(weights * conv(x, kernel) ** 2)
        return conv(x, kernel), jax.grad(loss, (0, 1))(x, kernel)

    _assert_trees_close(
        jax.jit(output_and_grads, static_argnums=0)(conv_transpose_stride2),
        jax.jit(output_and_grads, static_argnums=0)(reference),
    )


def test_conv_encoder_decoder_init_equals_flax_conv_layers():
    # Same names, so the same per-parameter init keys: bit-identical glorot kernels, zero biases.
    for module, reference, x in _conv_pairs():
        chex.assert_trees_all_equal(
            module.init(jax.random.key(3), x), reference.init(jax.random.key(3), x)
        )


def test_conv_encoder_decoder_compute_in_bf16_with_fp32_params():
    for module, _, x in _conv_pairs():
        params = _random_params(module, x)
        half = module.clone(dtype=jnp.bfloat16)
        assert product_input_dtypes(half.apply, params, x) == {jnp.dtype(jnp.bfloat16)}
        out, full = jax.jit(half.apply)(params, x), jax.jit(module.apply)(params, x)
        assert out.dtype == jnp.bfloat16
        _assert_trees_close(out.astype(jnp.float32), full, rtol=3e-2)


def test_heads_output_layer_computes_in_fp32_under_bf16():
    # A value near 300 (returns at discount 0.999): bf16 rounds it to steps of 2, so an
    # output layer in bf16 is up to 1 off; in fp32 only the hidden layers' rounding is left.
    feat = jax.random.normal(jax.random.key(0), (64, 8))
    head = ScalarHead(layers=2, units=16)
    params = head.init(jax.random.key(1), feat)
    params["params"]["Dense_0"]["bias"] = jnp.array([300.3])
    full = head.apply(params, feat)
    half = head.clone(dtype=jnp.bfloat16).apply(params, feat)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.05)
    actor = Actor(num_actions=3, discrete=True, layers=2, units=16, dtype=jnp.bfloat16)
    actor_params = actor.init(jax.random.key(2), feat)
    logits = lambda params: actor.apply(params, feat).logits
    # The hidden layers' products in bf16, the output layer's in fp32.
    assert product_input_dtypes(logits, actor_params) == {
        jnp.dtype(jnp.bfloat16),
        jnp.dtype(jnp.float32),
    }
    assert product_input_dtypes(
        lambda p: head.clone(dtype=jnp.bfloat16).apply(p, feat), params
    ) == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}


def test_gru_matches_numpy_formula_with_bias_and_layernorm_eps():
    cell = GRUCell(size=3)
    # Small inputs give a pre-activation variance near LayerNorm's epsilon, where Keras' 1e-3
    # and flax's default 1e-6 give visibly different outputs.
    x, h, bias = (
        0.01 * jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(2, 4), (2, 3), (9,)])
    )
    params = cell.init(jax.random.key(3), x, h)
    assert "bias" in params["params"]["Dense_0"]  # the official GRU Dense has a bias
    params["params"]["Dense_0"]["bias"] = bias
    out = cell.apply(params, x, h)
    p = jax.tree.map(np.asarray, params["params"])
    parts = np.concatenate([x, h], -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    assert parts.var(-1).max() < 1e-3
    mean, var = parts.mean(-1, keepdims=True), parts.var(-1, keepdims=True)
    norm = p["LayerNorm_0"]
    parts = (parts - mean) / np.sqrt(var + 1e-3) * norm["scale"] + norm["bias"]
    reset, cand, update = np.split(parts, 3, -1)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    cand = np.tanh(sigmoid(reset) * cand)
    update = sigmoid(update - 1.0)
    np.testing.assert_allclose(
        out, update * cand + (1 - update) * np.asarray(h), rtol=1e-4, atol=1e-6
    )


def test_kernels_are_glorot_uniform_and_biases_zero():
    # Every Dense/Conv/ConvTranspose of an image and a vector agent (world model, actor,
    # critic). Glorot uniform is U(-b, b), b = sqrt(6 / (fan_in + fan_out)), variance b²/3;
    # flax's default lecun normal reaches 2.3/sqrt(fan_in), beyond b for most shapes.
    image_agent = Agent(
        make_config(["atari", "debug"]), {"image": ((64, 64, 1), np.uint8)}, 4, True
    )
    trees = []
    for agent in (image_agent, vector_agent()):
        state = agent.init(jax.random.key(0))
        trees += [state.wm_params, state.actor_params, state.critic_params]
    kernels, biases = [], []
    for tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = jax.tree_util.keystr(path)
            if "LayerNorm" not in name:
                (kernels if name.endswith("['kernel']") else biases).append(
                    (name, np.asarray(leaf))
                )
    assert len(kernels) > 20 and any(k.ndim == 4 for _, k in kernels)
    for name, kernel in kernels:
        receptive = int(np.prod(kernel.shape[:-2]))
        fan_in, fan_out = receptive * kernel.shape[-2], receptive * kernel.shape[-1]
        scaled = kernel / np.sqrt(6 / (fan_in + fan_out))  # U(-1, 1) under glorot uniform
        assert np.abs(scaled).max() <= 1.0, name
        if scaled.size >= 100:  # 4 standard errors of a uniform's sample variance
            rtol = 4 * np.sqrt(0.8 / scaled.size)
            np.testing.assert_allclose(scaled.var(), 1 / 3, rtol=rtol, err_msg=name)
    for name, bias in biases:
        np.testing.assert_array_equal(bias, 0.0, err_msg=name)


def test_rssm_step_shapes_and_is_first_reset():
    rssm = RSSM(hidden=8, deter=6, stoch=4, discrete=5)
    batch = 3
    prev = initial_state(batch, 6, 4, 5)
    action, embed = jnp.ones((batch, 2)), jnp.ones((batch, 7))
    is_first = jnp.array([True, False, False])
    params = rssm.init(jax.random.key(0), prev, action, embed, is_first, jax.random.key(1))
    other = prev._replace(deter=jnp.full((batch, 6), 3.0), stoch=jnp.ones((batch, 4, 5)))
    step = lambda state, act: rssm.apply(
        params, state, act, embed, is_first, jax.random.key(1), method=RSSM.obs_step
    )
    post_a = step(prev, jnp.zeros_like(action))
    post_b = step(other, action)
    prior_a = rssm.apply(
        params, prev, jnp.zeros_like(action), jax.random.key(2),
        method=RSSM.img_step,
    )  # fmt: skip
    chex.assert_shape([post_a.stoch, post_a.logits, prior_a.logits], (batch, 4, 5))
    chex.assert_shape([post_a.deter, prior_a.deter], (batch, 6))
    chex.assert_shape(get_feat(post_a), (batch, 4 * 5 + 6))
    # The posterior keeps the prior's h (from the zero state: row 0 is reset, rows 1-2 are 0).
    np.testing.assert_allclose(post_a.deter, prior_a.deter, rtol=1e-6)
    prior_logits = rssm.apply(params, post_a.deter, method=RSSM.prior_logits)
    np.testing.assert_allclose(prior_logits, prior_a.logits, rtol=1e-6)
    # is_first zeroes the previous state and action: env 0 is identical, others differ.
    np.testing.assert_allclose(post_a.logits[0], post_b.logits[0], rtol=1e-6)
    assert not np.allclose(post_a.logits[1], post_b.logits[1])


def _noise_frequencies(amount, num_actions=4, draws=20000):
    action = jax.nn.one_hot(jnp.zeros(draws, int), num_actions)  # action 0 chosen everywhere
    noisy = np.asarray(action_noise(action, amount, True, jax.random.key(0)))
    assert np.all((noisy == 0) | (noisy == 1)) and np.all(noisy.sum(-1) == 1)
    return noisy.mean(0)


def test_discrete_action_noise_mixes_the_onehot_with_uniform():
    # amount 1: uniform; amount 0.5: the chosen action keeps 0.5 + 0.5/A, the others 0.5/A.
    np.testing.assert_allclose(_noise_frequencies(1.0), [0.25] * 4, atol=0.015)
    np.testing.assert_allclose(_noise_frequencies(0.5), [0.625, 0.125, 0.125, 0.125], atol=0.015)
    action = jax.nn.one_hot(jnp.array([2, 0]), 3)
    assert action_noise(action, 0.0, True, jax.random.key(1)) is action


def test_continuous_action_noise_is_a_clipped_normal():
    action = jnp.full((20000, 2), 0.3)
    small = np.asarray(action_noise(action, 0.05, False, jax.random.key(0)))
    np.testing.assert_allclose(small.mean(), 0.3, atol=0.002)
    np.testing.assert_allclose(small.std(), 0.05, rtol=0.03)
    large = np.asarray(action_noise(action, 2.0, False, jax.random.key(1)))
    assert large.min() == -1.0 and large.max() == 1.0
