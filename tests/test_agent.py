import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    NUM_ACTIONS,
    VECTOR_SIZE,
    looped_eqns,
    structured_batch,
    tiny_config,
    traced_eqns,
    vector_agent,
)

from dreamer_jax.actor_critic import (
    actor_loss,
    critic_loss,
    critic_value,
    imagination_start,
    imagination_targets,
    imagine,
)
from dreamer_jax.agent import Agent, make_optimizer
from dreamer_jax.config import make_config
from dreamer_jax.networks import get_feat, straight_through_onehot
from dreamer_jax.seeds import select, stack
from dreamer_jax.world_model import WorldModel, preprocess, world_model_loss


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x), tree)


def _is_key(x):
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def test_two_hundred_updates_reduce_model_loss_without_retracing():
    agent = vector_agent()
    config = agent.config
    state = agent.init(jax.random.key(0))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    losses = []
    for _ in range(200):
        state, metrics = agent.train_step(state, batch)
        losses.append(float(metrics["model_loss"]))
    assert agent.train_step._cache_size() == 1  # compiled once, never retraced
    for name, value in metrics.items():
        assert np.isfinite(value), name
    # Gaussian NLLs carry a constant 0.5·log(2π) per dimension (4 observation + 1 reward)
    # that no model can remove; compare what is left above it.
    floor = 5 * 0.5 * np.log(2 * np.pi)
    first, last = np.mean(losses[:5]) - floor, np.mean(losses[-5:]) - floor
    assert last < 0.5 * first, (first, last)
    assert int(state.updates) == 200 and int(state.nonfinite_total) == 0
    for key in ("vector_loss", "reward_loss", "discount_loss", "kl", "actor_loss",
                "critic_loss", "actor_entropy", "model_grad_norm"):  # fmt: skip
        assert key in metrics, key


@pytest.mark.slow
def test_jit_and_disable_jit_agree():
    # Small sizes: without jit every op runs eagerly.
    agent = vector_agent(
        tiny_config(**{"dataset.batch": 2, "dataset.length": 3, "imag_horizon": 2})
    )
    batch = structured_batch(2, 3)
    # The same initial state for both (init is not under test; eager init is slow).
    initial = _host(agent.init(jax.random.key(1)))
    fresh = lambda: initial.replace(key=jax.random.wrap_key_data(initial.key))
    jitted_state, jitted = agent.train_step(jax.tree.map(jax.numpy.asarray, fresh()), batch)
    with jax.disable_jit():
        eager_state, eager = agent._train_step(fresh(), batch)
    for name in jitted:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=2e-4, atol=2e-5, err_msg=name)
    chex.assert_trees_all_close(
        _host(jitted_state.wm_params), _host(eager_state.wm_params), rtol=1e-4, atol=1e-6
    )


def test_nonfinite_update_is_skipped_and_counted():
    agent = vector_agent()
    config = agent.config
    state = agent.init(jax.random.key(2))
    good = structured_batch(config.dataset.batch, config.dataset.length)
    state, _ = agent.train_step(state, good)
    before = _host(state)
    bad = dict(good, reward=np.full_like(good["reward"], np.nan))
    state, metrics = agent.train_step(state, bad)
    assert metrics["nonfinite"] == 1.0 and int(state.nonfinite_streak) == 1
    after = _host(state)
    for name in ("wm_params", "actor_params", "critic_params", "wm_opt_state", "updates"):
        chex.assert_trees_all_equal(getattr(before, name), getattr(after, name))
    assert not np.array_equal(before.key, after.key)  # the key still moves on
    state, metrics = agent.train_step(state, good)
    assert int(state.nonfinite_streak) == 0 and int(state.nonfinite_total) == 1
    assert int(state.updates) == 2


def test_train_step_wires_keys_targets_and_terminals_as_the_parts_say():
    """The update recomputed from its parts with the choices written out: the model's key
    is `split(state.key, 4)[1]` and imagination's `[2]`, imagination starts from the updated
    model with the batch's `is_terminal`, and the λ-returns bootstrap from the slow critic
    (here unlike the critic). Both in one jitted program, so that the draws agree."""
    agent = vector_agent()
    config = agent.config
    state = agent.init(jax.random.key(3))
    state = state.replace(
        slow_critic_params=jax.tree.map(lambda x: 1.5 * x + 0.1, state.critic_params)
    )
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    batch["is_terminal"][:, -1] = True  # every chunk's last state starts a terminal rollout

    def by_hand(state, batch):
        _, wm_key, imag_key, ent_key = jax.random.split(state.key, 4)
        data = preprocess(batch, config)
        (_, (posterior, _)), grads = jax.value_and_grad(world_model_loss, has_aux=True)(
            state.wm_params, agent.world_model, data, wm_key, config
        )
        updates, _ = agent.wm_opt.update(grads, state.wm_opt_state, state.wm_params)
        wm_params = optax.apply_updates(state.wm_params, updates)
        start, start_is_terminal = imagination_start(posterior, batch["is_terminal"])
        seq = imagine(
            agent.world_model, wm_params, agent.actor, state.actor_params, start,
            start_is_terminal, config.imag_horizon, imag_key, config,
        )  # fmt: skip
        slow_values = critic_value(agent.critic, state.slow_critic_params, seq.feats)
        returns = imagination_targets(seq, slow_values, config.discount_lambda)
        actor, _ = actor_loss(
            agent.actor, state.actor_params, seq, returns, slow_values, ent_key,
            agent.actor_grad, config,
        )  # fmt: skip
        critic, _ = critic_loss(agent.critic, state.critic_params, seq, returns)
        return {
            "lambda_return_mean": returns.mean(),
            "imag_reward_mean": seq.rewards.mean(),
            "actor_loss": actor,
            "critic_loss": critic,
            "start_is_terminal": start_is_terminal,
        }

    both = jax.jit(lambda state, batch: (agent._train_step(state, batch)[1], by_hand(state, batch)))
    metrics, expected = both(state, batch)
    np.testing.assert_array_equal(
        expected.pop("start_is_terminal"), batch["is_terminal"].reshape(-1)
    )
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)


def test_slow_critic_copied_every_hundred_updates():
    # As the official update_slow_target: after the critic's step of updates 0, 3, 6, ...
    # (every `slow_target_update`), so updates 1-3 read the critic of after update 0.
    agent = vector_agent(tiny_config(slow_target_update=3))
    config = agent.config
    state = agent.init(jax.random.key(3))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    critic_after = {}
    for step in range(7):
        state, _ = agent.train_step(state, batch)
        critic_after[step] = _host(state.critic_params)
        chex.assert_trees_all_equal(_host(state.slow_critic_params), critic_after[step // 3 * 3])


def test_slow_critic_starts_as_the_critic_then_moves_a_fraction_towards_it():
    # The official update_slow_target copies the critic after update 0 and mixes in
    # `slow_target_fraction` afterwards; update 0 reads `init`'s copy.
    agent = vector_agent(tiny_config(slow_target_update=1, slow_target_fraction=0.25))
    config = agent.config
    state = agent.init(jax.random.key(3))
    chex.assert_trees_all_equal(_host(state.slow_critic_params), _host(state.critic_params))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    state, _ = agent.train_step(state, batch)
    chex.assert_trees_all_equal(_host(state.slow_critic_params), _host(state.critic_params))
    slow = _host(state.slow_critic_params)
    state, _ = agent.train_step(state, batch)
    expected = jax.tree.map(lambda c, s: 0.25 * c + 0.75 * s, _host(state.critic_params), slow)
    chex.assert_trees_all_close(_host(state.slow_critic_params), expected, rtol=1e-6, atol=1e-7)


def test_optimizer_clips_then_adam_then_decays_weights_apart_from_the_learning_rate():
    # The official optimizer: global-norm clip, Adam with Keras' epsilon (added to √v before
    # the bias correction), then w <- w - lr*adam - wd*w.
    opt = tiny_config(
        **{"model_opt.lr": 0.1, "model_opt.wd": 0.01, "model_opt.clip": 1.0, "model_opt.eps": 1e-5}
    ).model_opt
    optimizer = make_optimizer(opt)
    w = np.array([1.0, -2.0, 0.5, 0.25])
    params = jnp.asarray(w, jnp.float32)
    opt_state = optimizer.init(params)
    m, v = np.zeros(4), np.zeros(4)
    # The first gradient's norm (5) is clipped to 1, the second's is not. The last entry is
    # small enough for where epsilon goes to matter (optax's placement: 27x the first step).
    grads = [np.array([3.0, -4.0, 0.0, 1e-5]), np.array([0.1, 0.2, -0.3, 2e-6])]
    for t, g in enumerate(grads, 1):
        updates, opt_state = optimizer.update(jnp.asarray(g, jnp.float32), opt_state, params)
        params = optax.apply_updates(params, updates)
        g = g * min(1.0, opt.clip / np.linalg.norm(g))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        adam = np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + opt.eps)
        w = w - opt.lr * adam - opt.wd * w
        np.testing.assert_allclose(params, w, rtol=1e-5)


def test_policy_step_modes_and_reset():
    agent = vector_agent()
    state = agent.init(jax.random.key(4))
    carry = agent.initial_carry(5)
    obs = {"vector": np.ones((5, 4), np.float32), "is_first": np.ones(5, bool)}
    action, carry = agent.policy_step(state, obs, carry, jax.random.key(5), mode="train")
    chex.assert_shape(action, (5, NUM_ACTIONS))
    np.testing.assert_allclose(action.sum(-1), 1.0, atol=1e-6)
    # Eval takes the actor's mode; the latent is still sampled (as the official code), so the
    # same key gives the same action and the action is the argmax of the policy.
    eval_a, _ = agent.policy_step(state, obs, carry, jax.random.key(6), mode="eval")
    eval_b, _ = agent.policy_step(state, obs, carry, jax.random.key(6), mode="eval")
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(eval_a.sum(-1), 1.0)
    with pytest.raises(ValueError, match="mode"):
        agent.policy_step(state, obs, carry, jax.random.key(8), mode="explore")


def test_bf16_computes_in_bf16_with_fp32_params():
    agent = vector_agent(tiny_config(precision="bf16"))
    state = agent.init(jax.random.key(5))
    config = agent.config
    state, metrics = agent.train_step(
        state, structured_batch(config.dataset.batch, config.dataset.length)
    )
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.wm_params))
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["model_loss"].dtype == jnp.float32


def test_bf16_loops_get_the_rssm_kernels_already_cast():
    # Each Dense casts its fp32 kernel to bf16; inside the imagination loop and the observe
    # scan's backward loop (which recomputes the step) XLA did not hoist those casts, so every
    # step cast every kernel again. The loops now get the RSSM's kernels cast once before them,
    # and the imagination loop the actor's under REINFORCE.
    agent = vector_agent(tiny_config(precision="bf16"))
    state = agent.init(jax.random.key(5))
    batch = structured_batch(agent.config.dataset.batch, agent.config.dataset.length)
    rssm = state.wm_params["params"]["rssm"]
    kernels = {layer["kernel"].shape for layer in [*rssm.values(), rssm["cell"]["Dense_0"]]
               if "kernel" in layer}  # fmt: skip
    assert len(kernels) >= 4  # img_in, the GRU's Dense, obs_out, logits, ...
    # Under REINFORCE (discrete actions) the actor's are cast before the imagination loop too
    # (those of its bf16 layers: all but the fp32 output layer).
    assert agent.actor_grad == "reinforce"
    kernels |= {layer["kernel"].shape for layer in state.actor_params["params"]["MLP_0"].values()}

    def casts(eqns):
        return {
            eqn.invars[0].aval.shape
            for eqn in eqns
            if eqn.primitive.name == "convert_element_type"
            and eqn.params["new_dtype"] == jnp.bfloat16
        }

    assert kernels <= casts(traced_eqns(agent._train_step, state, batch))  # the check sees them
    assert not kernels & casts(looped_eqns(agent._train_step, state, batch))


def test_the_carry_holds_the_action_sent_to_the_env_noise_included():
    """The next step's filter reads the action the env got: after `expl_noise`, not the
    actor's own sample (with noise 1 discrete actions are uniform, unlike the policy's)."""
    agent = vector_agent(tiny_config(expl_noise=1.0))
    state, n = agent.init(jax.random.key(4)), 300
    obs = _vector_obs(np.random.default_rng(0), n, np.ones(n, bool))
    action, (_, carried) = agent.policy_step(state, obs, agent.initial_carry(n), jax.random.key(5))
    np.testing.assert_array_equal(carried, action)
    noiseless = vector_agent().policy_step(state, obs, agent.initial_carry(n), jax.random.key(5))
    assert not np.array_equal(noiseless[0], action)  # the noise changed some actions


def test_continuous_actions_use_dynamics_backprop():
    # No entropy bonus: the actor's gradient must come through the imagined dynamics.
    config = tiny_config(actor_ent=0.0)
    agent = Agent(config, {"vector": ((4,), np.float32)}, 2, discrete=False)
    assert agent.actor_grad == "dynamics"
    state = agent.init(jax.random.key(6))
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    batch["action"] = np.tanh(np.random.default_rng(0).normal(size=(*batch["reward"].shape, 2)))
    state, metrics = agent.train_step(state, batch)
    assert np.isfinite(metrics["actor_loss"]) and metrics["actor_grad_norm"] > 0
    action, _ = agent.policy_step(
        state, {"vector": np.zeros((3, 4), np.float32), "is_first": np.ones(3, bool)},
        agent.initial_carry(3), jax.random.key(7),
    )  # fmt: skip
    assert action.shape == (3, 2) and np.all(np.abs(action) <= 1)


def _vector_obs(rng, n, is_first):
    return {
        "vector": rng.normal(size=(n, VECTOR_SIZE)).astype(np.float32),
        "is_first": np.asarray(is_first, bool),
    }


def test_policy_step_names_inputs_that_do_not_fit_the_agent():
    """Named in one line where flax would name a kernel shape or XLA a concatenation."""
    agent = vector_agent()  # cartpole: vector (4,)
    state = agent.init(jax.random.key(0))
    good = {"vector": np.zeros((2, 4), np.float32), "is_first": np.ones(2, bool)}
    takes = r"takes a dict of obs\['vector'\] \[N, 4\] and obs\['is_first'\] \[N\]; got "
    cases = [
        ({**good, "vector": np.zeros((2, 5), np.float32)}, 2, takes + r"\(2, 5\) and \(2,\)"),
        ({"vector": np.zeros(4, np.float32), "is_first": np.ones((), bool)}, 1, takes + r"\(4,\)"),
        ({"vector": good["vector"]}, 2, takes + r"keys \['vector'\]"),
        (good["vector"], 2, takes + "no dict"),
        (good, 1, r"not one for 2 envs: start from agent.initial_carry\(2\)"),
        (good, None, r"not one for 2 envs"),
    ]
    for obs, envs, message in cases:
        carry = None if envs is None else agent.initial_carry(envs)
        with pytest.raises(ValueError, match=message):
            agent.policy_step(state, obs, carry, jax.random.key(1), mode="eval")
    action, _ = agent.policy_step(state, good, agent.initial_carry(2), jax.random.key(1))
    chex.assert_shape(action, (2, agent.num_actions))


@pytest.mark.parametrize("keys", [(), ("image", "vector")])
def test_an_observation_space_without_exactly_one_of_image_and_vector_is_named(keys):
    space = {key: ((4,), np.float32) for key in (*keys, "reward")}
    with pytest.raises(ValueError, match=r"exactly one of 'image' and 'vector', got keys \["):
        Agent(tiny_config(), space, NUM_ACTIONS, discrete=True)


def test_policy_actions_are_exact_onehot_and_the_same_draws_as_before():
    # The straight-through form `sample + p − sg(p)` gives 0.99999994 at the chosen index in
    # about one row in five; replay's uint8 cast turned such a row into no action at all.
    agent = vector_agent()
    state = agent.init(jax.random.key(4))
    rng, n = np.random.default_rng(0), 512
    for mode in ("train", "eval"):
        carry = agent.initial_carry(n)
        for step in range(4):
            key = jax.random.key(10 + step)
            obs = _vector_obs(rng, n, np.full(n, step == 0))
            action, carry = agent.policy_step(state, obs, carry, key, mode=mode)
            a = np.asarray(action)
            assert np.all((a == 0) | (a == 1)) and np.all(a.sum(-1) == 1), mode
            if mode == "train":  # the same key still draws the action the sample used to
                logits = agent.actor.apply(state.actor_params, get_feat(carry[0])).logits
                old = straight_through_onehot(logits, jax.random.split(key)[1])
                np.testing.assert_array_equal(a.argmax(-1), np.argmax(old, -1))


def test_action_noise_modes_read_their_own_config_key():
    base = vector_agent()
    state = base.init(jax.random.key(4))
    n = 3000
    obs = _vector_obs(np.random.default_rng(1), n, np.ones(n, bool))
    act = lambda agent, mode: np.asarray(
        agent.policy_step(state, obs, agent.initial_carry(n), jax.random.key(5), mode=mode)[0]
    )
    clean = {mode: act(base, mode) for mode in ("train", "eval")}
    for noisy_mode, overrides in (("train", {"expl_noise": 1.0}), ("eval", {"eval_noise": 1.0})):
        agent = vector_agent(tiny_config(**overrides))
        for mode in ("train", "eval"):
            action = act(agent, mode)
            same = (action == clean[mode]).all(-1).mean()
            if mode == noisy_mode:  # amount 1: uniform, independent of the policy's action
                np.testing.assert_allclose(action.mean(0), [1 / NUM_ACTIONS] * 3, atol=0.03)
                np.testing.assert_allclose(same, 1 / NUM_ACTIONS, atol=0.03)
            else:
                assert same == 1.0, (noisy_mode, mode)


def test_eval_action_is_argmax_of_actor_on_filtered_latent():
    agent = vector_agent()
    state = agent.init(jax.random.key(7))
    rng, n = np.random.default_rng(2), 5
    carry = agent.initial_carry(n)
    for step in range(3):  # a carry with a non-zero latent and previous action
        obs = _vector_obs(rng, n, np.full(n, step == 0))
        _, carry = agent.policy_step(state, obs, carry, jax.random.key(20 + step), mode="train")
    assert np.abs(carry[0].deter).min() > 0 and np.all(carry[1].sum(-1) == 1)
    obs = _vector_obs(rng, n, [True, False, True, False, False])
    key = jax.random.key(30)
    action, (latent, prev_action) = agent.policy_step(state, obs, carry, key, mode="eval")

    # Reference: reset the is_first rows by hand, then one posterior step with the same key.
    keep = ~obs["is_first"]
    zeroed = jax.tree.map(lambda x: x * keep.reshape(-1, *[1] * (x.ndim - 1)), carry)
    model, params = agent.world_model, state.wm_params
    embed = model.apply(params, jnp.asarray(obs["vector"]), method=WorldModel.encode)
    posterior = model.apply(
        params, *zeroed, embed, np.zeros(n, bool), jax.random.split(key, 3)[0],
        method=WorldModel.obs_step,
    )  # fmt: skip
    logits = agent.actor.apply(state.actor_params, get_feat(posterior)).logits
    np.testing.assert_array_equal(action, jax.nn.one_hot(jnp.argmax(logits, -1), NUM_ACTIONS))
    chex.assert_trees_all_close(latent, posterior, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(prev_action, action)


def _atari_batch(batch, length, num_actions, seed=0):
    """Smooth uint8 frames `[B, T, 64, 64, 1]` whose phase moves with the step."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 6, (batch, 1)) + 0.3 * np.arange(length)
    grid = 0.2 * np.arange(64)[:, None] + 0.3 * np.arange(64)[None]
    image = 128 + 100 * np.sin(grid + phase[..., None, None])
    actions = rng.integers(0, num_actions, (batch, length))
    return {
        "image": image[..., None].astype(np.uint8),
        "action": np.eye(num_actions, dtype=np.float32)[actions],
        "reward": rng.normal(size=(batch, length)).astype(np.float32),
        "is_first": np.arange(length)[None].repeat(batch, 0) == 0,
        "is_last": np.zeros((batch, length), bool),
        "is_terminal": np.zeros((batch, length), bool),
    }


@pytest.mark.slow
def test_bf16_conv_path_matches_fp32():
    obs_space, num_actions = {"image": ((64, 64, 1), np.uint8)}, 4
    agents = {
        precision: Agent(make_config(["atari", "debug"], {"precision": precision}), obs_space,
                         num_actions, True)
        for precision in ("32", "bf16")
    }  # fmt: skip
    config = agents["32"].config
    state = agents["32"].init(jax.random.key(8))  # the same fp32 params for both
    data = preprocess(
        _atari_batch(config.dataset.batch, config.dataset.length, num_actions), config
    )
    loss = jax.jit(world_model_loss, static_argnums=(1, 4))
    metrics = {
        p: loss(state.wm_params, agent.world_model, data, jax.random.key(9), config)[1][1]
        for p, agent in agents.items()
    }
    # Without the image term's constant 0.5·log(2π) per pixel, which would hide any error. The
    # terms agree to ~1e-4; a log-likelihood summed over the pixels in bf16 is ~1% off.
    constant = 0.5 * np.log(2 * np.pi) * 64 * 64
    for name in ("model_loss", "image_loss", "kl", "reward_loss", "discount_loss"):
        offset = constant if name in ("model_loss", "image_loss") else 0.0
        full, half = (float(metrics[p][name]) - offset for p in ("32", "bf16"))
        np.testing.assert_allclose(half, full, rtol=5e-3, err_msg=name)
    # Every matmul (the convolutions are matmuls too) runs in bf16 but the scalar heads'
    # output layers (reward, discount: one output column each), which run in fp32.
    wm = agents["bf16"].world_model
    wm_loss = lambda params: world_model_loss(params, wm, data, jax.random.key(9), config)
    products = [
        (eqn.invars[0].aval.dtype, eqn.outvars[0].aval.shape[-1])
        for eqn in traced_eqns(wm_loss, state.wm_params)
        if eqn.primitive.name == "dot_general"
    ]
    assert sorted(width for dtype, width in products if dtype == jnp.float32) == [1, 1]
    assert {dtype for dtype, width in products if width != 1} == {jnp.dtype(jnp.bfloat16)}
    obs = {"image": _atari_batch(8, 1, num_actions)["image"][:, 0], "is_first": np.ones(8, bool)}
    for mode in ("train", "eval"):
        action, _ = agents["bf16"].policy_step(
            state, obs, agents["bf16"].initial_carry(8), jax.random.key(10), mode=mode
        )
        assert action.dtype == jnp.float32
        assert np.all((action == 0) | (action == 1)) and np.all(action.sum(-1) == 1)


def test_act_seeds_is_policy_step_per_seed_with_the_loop_key_split():
    """Each seed acts with its own state, observation and carry, on the second half of its
    key's split, and gets the first half back: a single run's `act_key` stream."""
    agent = vector_agent()
    states = stack([agent.init(jax.random.key(k)) for k in (1, 2)])
    rng = np.random.default_rng(0)
    obs = {"vector": rng.normal(size=(2, 3, VECTOR_SIZE)).astype(np.float32),
           "is_first": np.array([[True, False, True], [False, True, True]])}  # fmt: skip
    carry = agent.initial_carry(3, 2)
    chex.assert_shape(carry[1], (2, 3, NUM_ACTIONS))
    keys = jax.random.split(jax.random.key(7), 2)
    action, new_carry, new_keys = agent.act_seeds(states, obs, carry, keys, mode="train")
    for i in range(2):
        next_key, step_key = jax.random.split(keys[i])
        want, want_carry = agent.policy_step(
            select(states, i), select(obs, i), select(carry, i), step_key, mode="train"
        )
        np.testing.assert_array_equal(action[i], want)
        chex.assert_trees_all_close(select(new_carry, i), want_carry, atol=1e-6)
        np.testing.assert_array_equal(
            jax.random.key_data(new_keys[i]), jax.random.key_data(next_key)
        )


@pytest.mark.slow
def test_seed_axis_update_matches_each_seed_alone_within_float_rounding():
    """Seed i of the N-seed update is seed i's one-seed update (the program a single run
    uses). XLA:CPU picks other kernels for a batched matmul, so the two differ in the last
    bits only: `scripts/bench.py --determinism --num_seeds 2` measured this bound (see
    docs/reproducibility.md); 100 updates on the structured batch stay within it."""
    agent = vector_agent()
    config = agent.config
    batch = structured_batch(config.dataset.batch, config.dataset.length)
    keys = jax.random.split(jax.random.key(3), 3)

    def train(keys, updates=100):
        states = agent.init_seeds(keys)
        batches = stack([batch] * len(keys))
        for _ in range(updates):
            states, _ = agent.train_seeds(states, batches)
        return states

    together = train(keys)
    for i in range(3):
        alone = select(train(keys[i : i + 1]), 0)
        np.testing.assert_array_equal(
            jax.random.key_data(select(together, i).key), jax.random.key_data(alone.key)
        )
        chex.assert_trees_all_equal(select(together, i).updates, alone.updates)
        chex.assert_trees_all_close(
            select(together, i).replace(key=None), alone.replace(key=None), atol=1e-5, rtol=1e-5
        )
    # Different seeds really are different runs.
    assert not np.allclose(
        jax.tree.leaves(select(together, 0).wm_params)[0],
        jax.tree.leaves(select(together, 1).wm_params)[0],
    )
