import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    NUM_ACTIONS,
    VECTOR_SIZE,
    structured_batch,
    tiny_config,
    traced_eqns,
    vector_agent,
)

from dreamer_jax.agent import Agent
from dreamer_jax.networks import RSSMState, get_feat, initial_state
from dreamer_jax.world_model import (
    WorldModel,
    observe,
    open_loop_prediction,
    posterior_scan,
    preprocess,
    rssm_sizes,
    world_model_loss,
)


def test_preprocess_image_reward_discount():
    config = tiny_config(clip_rewards="tanh", discount=0.9)
    batch = {
        "image": np.array([[0, 255]], np.uint8),
        "reward": np.array([[2.0, -0.5]], np.float32),
        "is_terminal": np.array([[False, True]]),
    }
    out = preprocess(batch, config)
    np.testing.assert_allclose(out["image"], [[-0.5, 0.5]])
    np.testing.assert_allclose(out["reward"], np.tanh([[2.0, -0.5]]), rtol=1e-6)
    np.testing.assert_allclose(out["discount"], [[0.9, 0.0]])
    identity = preprocess(batch, tiny_config(clip_rewards="identity"))
    np.testing.assert_allclose(identity["reward"], batch["reward"])


def _observe_inputs(config=None):
    """A vector agent's config, world model and initial parameters, a preprocessed structured
    batch `[B, T, ...]` and its embedding."""
    agent = vector_agent(config)
    config = agent.config
    params = agent.init(jax.random.key(0)).wm_params
    data = preprocess(structured_batch(config.dataset.batch, config.dataset.length), config)
    embed = agent.world_model.apply(params, data["vector"], method=WorldModel.encode)
    return config, agent.world_model, params, data, embed


def test_vector_encoder_and_decoder_have_one_layer_per_listed_width():
    """`mlp_layers` lists each layer's width, as in the official config: `[24, 8]` is two
    layers of 24 then 8 units, not two of 24."""
    config = tiny_config(**{"encoder.mlp_layers": [24, 8], "decoder.mlp_layers": [16, 12, 4]})
    params = vector_agent(config).init(jax.random.key(0)).wm_params["params"]
    kernel_shapes = lambda mlp: [mlp[f"Dense_{i}"]["kernel"].shape for i in range(len(mlp))]
    assert kernel_shapes(params["encoder"]) == [(VECTOR_SIZE, 24), (24, 8)]
    feat = config.rssm.deter + config.rssm.stoch * config.rssm.discrete
    assert kernel_shapes(params["decoder"]["MLP_0"]) == [(feat, 16), (16, 12), (12, 4)]


def test_the_observation_at_t_reaches_the_posterior_at_t_and_not_the_prior():
    """The posterior of step t reads that step's embedding; the prior of step t, computed
    from h_t before the observation, does not."""
    _, model, params, data, embed = _observe_inputs()
    moved = jnp.asarray(embed).at[:, 4].add(1.0)
    args = (data["action"], data["is_first"], jax.random.key(1))
    posterior, prior_logits = observe(model, params, embed, *args)
    posterior_moved, prior_moved = observe(model, params, moved, *args)
    np.testing.assert_array_equal(posterior_moved.logits[:, :4], posterior.logits[:, :4])
    assert not np.allclose(posterior_moved.logits[:, 4], posterior.logits[:, 4])
    np.testing.assert_array_equal(prior_moved[:, :5], prior_logits[:, :5])


def test_posterior_prior_shapes_and_chunk_reset():
    config, model, params, data, embed = _observe_inputs()
    posterior, prior_logits = observe(
        model, params, embed, data["action"], data["is_first"], jax.random.key(1)
    )
    b, t, s, k = (
        config.dataset.batch,
        config.dataset.length,
        config.rssm.stoch,
        config.rssm.discrete,
    )
    chex.assert_shape([posterior.stoch, posterior.logits, prior_logits], (b, t, s, k))
    chex.assert_shape(posterior.deter, (b, t, config.rssm.deter))
    # is_first at step 3 makes everything from step 3 on independent of steps 0..2.
    first = jnp.asarray(data["is_first"]).at[:, 3].set(True)
    action = jnp.asarray(data["action"])
    changed = action.at[:, :3].set(1.0 - action[:, :3])
    embed_changed = embed.at[:, :3].add(1.0)
    key = jax.random.key(1)
    post_a, _ = observe(model, params, embed, data["action"], first, key)
    post_b, _ = observe(model, params, embed_changed, changed, first, key)
    np.testing.assert_allclose(post_a.logits[:, 3:], post_b.logits[:, 3:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(post_a.logits[:, :3], post_b.logits[:, :3])


def test_world_model_loss_terms_match_numpy():
    # Atari's loss scales (kl 0.1, discount 5), so that each scale shows in the total.
    agent = vector_agent(tiny_config(**{"loss_scales.kl": 0.1, "loss_scales.discount": 5.0}))
    state = agent.init(jax.random.key(0))
    config = agent.config
    data = preprocess(structured_batch(config.dataset.batch, config.dataset.length), config)
    loss, (posterior, metrics) = world_model_loss(
        state.wm_params, agent.world_model, data, jax.random.key(2), config
    )
    feat = get_feat(posterior)

    def head(method):
        return np.asarray(agent.world_model.apply(state.wm_params, feat, method=method), float)

    def unit_normal_nll(x, mean):  # -log N(x; mean, 1) per element
        return 0.5 * (np.asarray(x, float) - mean) ** 2 + 0.5 * np.log(2 * np.pi)

    # The observation's log-likelihood is summed over its dimensions, then averaged.
    vector_nll = unit_normal_nll(data["vector"], head(WorldModel.decode)).sum(-1).mean()
    np.testing.assert_allclose(metrics["vector_loss"], vector_nll, rtol=1e-5)
    reward_nll = unit_normal_nll(data["reward"], head(WorldModel.reward)).mean()
    np.testing.assert_allclose(metrics["reward_loss"], reward_nll, rtol=1e-5)
    logits, target = head(WorldModel.discount_logits), np.asarray(data["discount"], float)
    # Bernoulli with the soft label γ·(1 − is_terminal): −[d·log σ(l) + (1 − d)·log(1 − σ(l))].
    discount_nll = target * np.log1p(np.exp(-logits)) + (1 - target) * np.log1p(np.exp(logits))
    np.testing.assert_allclose(metrics["discount_loss"], discount_nll.mean(), rtol=1e-5)
    expected = 0.1 * metrics["kl_loss"] + vector_nll + reward_nll + 5.0 * discount_nll.mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # KL(posterior ‖ prior) of each step's S categoricals, summed over S; the prior is the
    # one the posterior's own h_t gives. Without free nats the loss's value is the KL's.
    prior = agent.world_model.apply(
        state.wm_params, posterior.deter, method=WorldModel.prior_logits
    )
    log_post, log_prior = (
        jax.nn.log_softmax(np.asarray(x, float)) for x in (posterior.logits, prior)
    )
    kl = (np.exp(log_post) * (log_post - log_prior)).sum((-2, -1)).mean()
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(metrics["kl_loss"], kl, rtol=1e-4)
    assert all(np.isfinite(v) for v in jax.tree.leaves(metrics))
    assert jnp.all(posterior.stoch.sum(-1) > 0.99)


def test_image_loss_is_the_unit_gaussian_nll_summed_over_height_width_and_channels():
    """An image's log-likelihood sums its H·W·C pixels (one event), then averages over
    `[B, T]`, as a vector's sums its entries."""
    config = tiny_config()
    agent = Agent(config, {"image": ((64, 64, 1), np.uint8)}, NUM_ACTIONS, discrete=True)
    state = agent.init(jax.random.key(0))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    del batch["vector"]
    shape = (config.dataset.batch, config.dataset.length, 64, 64, 1)
    batch["image"] = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    data = preprocess(batch, config)
    _, (posterior, metrics) = world_model_loss(
        state.wm_params, agent.world_model, data, jax.random.key(2), config
    )
    mean = agent.world_model.apply(state.wm_params, get_feat(posterior), method=WorldModel.decode)
    error = np.asarray(data["image"], float) - np.asarray(mean, float)
    nll = (0.5 * error**2).sum((-3, -2, -1)) + 64 * 64 * 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(metrics["image_loss"], nll.mean(), rtol=1e-5)


def test_heads_left_out_of_grad_heads_do_not_train_the_representation():
    # A head not in grad_heads learns on stopped features (the official dmc setting leaves the
    # discount head out): its loss has no gradient into the encoder or the RSSM.
    def grads(grad_heads, loss_name):
        agent = vector_agent(tiny_config(grad_heads=grad_heads))
        config = agent.config
        state = agent.init(jax.random.key(0))
        data = preprocess(structured_batch(config.dataset.batch, config.dataset.length), config)

        def loss(params):
            _, (_, metrics) = world_model_loss(
                params, agent.world_model, data, jax.random.key(2), config
            )
            return metrics[f"{loss_name}_loss"]

        return jax.grad(loss)(state.wm_params)["params"]

    def largest(tree):
        return max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(tree))

    for head in ("reward", "discount"):
        left_out = grads(["decoder"], head)
        assert largest(left_out["encoder"]) == 0.0 and largest(left_out["rssm"]) == 0.0
        assert largest(left_out[f"{head}_head"]) > 0.0
        trained = grads(["decoder", head], head)
        assert largest(trained["encoder"]) > 0.0 and largest(trained["rssm"]) > 0.0


def test_observed_prior_is_the_imagination_step_from_the_previous_posterior():
    # observe computes the priors after its scan; each must be the prior img_step predicts
    # from the previous posterior and the step's action (the initial state after is_first).
    config, model, params, data, embed = _observe_inputs()
    first = np.asarray(data["is_first"]).copy()
    first[:, 4] = True  # a reset inside the chunk
    posterior, prior_logits = observe(
        model, params, embed, data["action"], first, jax.random.key(1)
    )
    initial = initial_state(config.dataset.batch, *rssm_sizes(config))
    for t in range(config.dataset.length):
        prev = RSSMState(*(x[:, t - 1] for x in posterior)) if t else initial
        keep = ~first[:, t].reshape(-1, 1, 1)
        prev = prev._replace(deter=prev.deter * keep[..., 0], stoch=prev.stoch * keep)
        action = data["action"][:, t] * keep[..., 0]
        prior = model.apply(params, prev, action, jax.random.key(2), method=WorldModel.img_step)
        np.testing.assert_allclose(prior.logits, prior_logits[:, t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(prior.deter, posterior.deter[:, t], rtol=1e-5, atol=1e-6)


def test_prior_at_t_depends_on_action_t_and_no_later_action():
    # Row t's action led to observation t, so the prior of step t is predicted from it.
    _, model, params, data, embed = _observe_inputs()

    def prior_logits(action):  # [B, T, S, K]
        return observe(model, params, embed, action, data["is_first"], jax.random.key(1))[1]

    jacobian = jax.jacrev(prior_logits)(jnp.asarray(data["action"]))  # [B, T, S, K, B, T, A]
    influence = np.abs(np.asarray(jacobian)).sum((0, 2, 3, 4, 6))  # [t of prior, s of action]
    assert np.all(np.diag(influence) > 0)
    np.testing.assert_array_equal(np.triu(influence, 1), 0.0)


def _posterior_losses(model, data, embed):
    """A scalar of every posterior output, by `posterior_scan` and by autodiff of a plain
    `lax.scan` over `obs_step`, as functions of `(params, embed, action, initial)`
    (time-major `[T, B, ...]`; a reset at step 4)."""
    first = np.asarray(data["is_first"]).copy()
    first[:, 4] = True
    first = jnp.swapaxes(first, 0, 1)
    keys = jax.random.split(jax.random.key(3), first.shape[0])

    def scalar(posterior):
        weights = jnp.arange(posterior.stoch.shape[-1])
        return (
            (posterior.deter**2).mean()
            + (posterior.stoch * weights).mean()
            + jax.nn.logsumexp(posterior.logits, -1).mean()
        )

    def hoisted(params, embed, action, initial):
        return scalar(posterior_scan(model, params, initial, action, embed, first, keys))

    def plain(params, embed, action, initial):
        def step(prev, inputs):
            post = model.apply(params, prev, *inputs, method=WorldModel.obs_step)
            return post, post

        return scalar(jax.lax.scan(step, initial, (action, embed, first, keys))[1])

    return hoisted, plain


@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_posterior_scan_matches_autodiff_of_the_plain_scan(precision):
    # posterior_scan computes the step's kernel gradients after the loop: values and every
    # gradient (parameters, embedding, actions, initial state) must be those of autodiff.
    # Under bf16 (GPU runs) its kernel gradients are summed in fp32 over all steps, autodiff's
    # per step in bf16: equal to about 1e-3 of each gradient's largest entry.
    config, model, params, data, embed = _observe_inputs(tiny_config(precision=precision))
    initial = jax.tree.map(
        lambda x: jax.random.normal(jax.random.key(4), x.shape) * 0.1,
        initial_state(config.dataset.batch, *rssm_sizes(config)),
    )
    args = (params, *(jnp.swapaxes(x, 0, 1) for x in (embed, data["action"])), initial)
    hoisted, plain = _posterior_losses(model, data, embed)
    value, grads = jax.value_and_grad(hoisted, argnums=(0, 1, 2, 3))(*args)
    expected_value, expected = jax.value_and_grad(plain, argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    kernels = 0
    for (path, leaf), want in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True
    ):
        if precision == "32":
            np.testing.assert_allclose(leaf, want, rtol=1e-4, atol=1e-7, err_msg=str(path))
        else:
            largest = float(np.abs(want).max())
            np.testing.assert_allclose(leaf, want, rtol=0, atol=1e-2 * largest, err_msg=str(path))
        kernels += "rssm" in str(path) and "kernel" in str(path) and bool(np.any(want != 0))
    assert kernels == 4  # img_in, the GRU's Dense, obs_out, obs_logits: all trained


def test_posterior_scan_backward_carries_no_kernel_gradient():
    # The point of posterior_scan: no loop of the gradient carries a kernel-sized sum, which
    # autodiff of the plain scan does (one read and write of every kernel per step).
    config, model, params, data, embed = _observe_inputs()
    initial = initial_state(config.dataset.batch, *rssm_sizes(config))
    args = (params, *(jnp.swapaxes(x, 0, 1) for x in (embed, data["action"])), initial)
    rssm = params["params"]["rssm"]
    kernel_shapes = {rssm[name]["kernel"].shape for name in ("img_in", "obs_out", "obs_logits")} | {
        rssm["cell"]["Dense_0"]["kernel"].shape
    }

    def carried_shapes(fn):  # the carry of every loop in fn's gradient
        scans = [e for e in traced_eqns(jax.grad(fn), *args) if e.primitive.name == "scan"]
        return {
            v.aval.shape
            for e in scans
            for v in e.invars[e.params["num_consts"] :][: e.params["num_carry"]]
        }

    hoisted, plain = _posterior_losses(model, data, embed)
    assert kernel_shapes <= carried_shapes(plain)  # the check sees the accumulation
    assert not kernel_shapes & carried_shapes(hoisted)


def test_posterior_scan_forward_loop_stores_only_matmul_results_for_the_backward():
    # The backward loop recomputes the step's elementwise work (LayerNorm, gates, sampling)
    # from the stored matmul outputs: per step the forward loop stores the posterior (3),
    # each Dense's input (4) and output (4) and one more array, where autodiff of the plain
    # scan stores every intermediate (34 here), most of them a GPU kernel each per step.
    config, model, params, data, embed = _observe_inputs()
    initial = initial_state(config.dataset.batch, *rssm_sizes(config))
    args = (params, *(jnp.swapaxes(x, 0, 1) for x in (embed, data["action"])), initial)

    def stored(fn):  # arrays stacked per step by the forward loops of fn's gradient
        scans = [e for e in traced_eqns(jax.grad(fn), *args) if e.primitive.name == "scan"]
        return sum(len(e.outvars) - e.params["num_carry"] for e in scans if not e.params["reverse"])

    hoisted, plain = _posterior_losses(model, data, embed)
    assert stored(plain) >= 30  # the check sees autodiff's residuals
    assert stored(hoisted) <= 12


def test_open_loop_prediction_sees_only_the_context_then_follows_the_actions():
    """The report's prediction: observations after the `context` steps never reach it (the
    prior imagines them), the recorded actions do, and the first steps are the posterior's."""
    config, model, params, data, _ = _observe_inputs()
    data = jax.tree.map(jnp.asarray, data)
    context, key = 3, jax.random.key(4)
    truth, prediction = open_loop_prediction(model, params, data, key, context)
    chex.assert_shape(prediction, data["vector"].shape)
    np.testing.assert_array_equal(truth, data["vector"])
    later_obs = {**data, "vector": data["vector"].at[:, context:].add(5.0)}
    np.testing.assert_array_equal(
        open_loop_prediction(model, params, later_obs, key, context)[1], prediction
    )
    later_action = {
        **data,
        "action": data["action"]
        .at[:, context + 1]
        .set(jnp.roll(data["action"][:, context + 1], 1, -1)),
    }
    moved = open_loop_prediction(model, params, later_action, key, context)[1]
    np.testing.assert_array_equal(moved[:, : context + 1], prediction[:, : context + 1])
    # action[t] led to step t: the step it leads to is the first that changes.
    assert not np.allclose(moved[:, context + 1], prediction[:, context + 1])
    observe_key = jax.random.split(key)[0]
    embed = model.apply(params, data["vector"][:, :context], method=WorldModel.encode)
    posterior, _ = observe(
        model,
        params,
        embed,
        data["action"][:, :context],
        data["is_first"][:, :context],
        observe_key,
    )
    decoded = model.apply(params, get_feat(posterior), method=WorldModel.decode)
    np.testing.assert_allclose(prediction[:, :context], decoded, rtol=1e-5, atol=1e-6)
