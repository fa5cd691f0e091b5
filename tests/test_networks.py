import chex
import jax
import jax.numpy as jnp
import numpy as np

from dreamer_jax.networks import (
    RSSM,
    ConvDecoder,
    ConvEncoder,
    GRUCell,
    get_feat,
    initial_state,
    straight_through_onehot,
)


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


def test_gru_matches_numpy_formula():
    cell = GRUCell(size=3)
    x, h = (
        jax.random.normal(jax.random.key(0), (2, 4)),
        jax.random.normal(jax.random.key(1), (2, 3)),
    )
    params = cell.init(jax.random.key(2), x, h)
    out = cell.apply(params, x, h)
    p = jax.tree.map(np.asarray, params["params"])
    assert "bias" not in p["Dense_0"]  # the Dense has no bias; LayerNorm has one
    parts = np.concatenate([x, h], -1) @ p["Dense_0"]["kernel"]
    mean, var = parts.mean(-1, keepdims=True), parts.var(-1, keepdims=True)
    parts = (parts - mean) / np.sqrt(var + 1e-6) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"][
        "bias"
    ]
    reset, cand, update = np.split(parts, 3, -1)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))
    cand = np.tanh(sigmoid(reset) * cand)
    update = sigmoid(update - 1.0)
    np.testing.assert_allclose(
        out, update * cand + (1 - update) * np.asarray(h), rtol=1e-4, atol=1e-5
    )


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
    post_a, prior_a = step(prev, jnp.zeros_like(action))
    post_b, _ = step(other, action)
    chex.assert_shape([post_a.stoch, post_a.logits, prior_a.logits], (batch, 4, 5))
    chex.assert_shape([post_a.deter, prior_a.deter], (batch, 6))
    chex.assert_shape(get_feat(post_a), (batch, 4 * 5 + 6))
    np.testing.assert_array_equal(post_a.deter, prior_a.deter)  # posterior keeps the prior's h
    # is_first zeroes the previous state and action: env 0 is identical, others differ.
    np.testing.assert_allclose(post_a.logits[0], post_b.logits[0], rtol=1e-6)
    assert not np.allclose(post_a.logits[1], post_b.logits[1])
