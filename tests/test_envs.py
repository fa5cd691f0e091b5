"""VectorEnv: the Atari protocol, episode boundaries, task names, seeding."""

import envpool
import numpy as np
import pytest

from dreamer_jax.envs import (
    _ATARI_PROTOCOL,
    ATARI_GAMES,
    UnknownTaskError,
    VectorEnv,
    _env_seeds,
    _task_ids,
    available_tasks,
)

KEYS = {"reward", "is_first", "is_last", "is_terminal"}


@pytest.fixture
def make_env():
    """VectorEnv factory that closes every env it made."""
    envs = []

    def make(*args, **kwargs):
        envs.append(VectorEnv(*args, **kwargs))
        return envs[-1]

    yield make
    for env in envs:
        env.close()


def run(env, steps, seed=0):
    """Random actions for `steps` steps after a reset: dict of [steps+1, N] arrays."""
    rng = np.random.default_rng(seed)
    out = [env.reset()]
    out += [env.step(env.random_actions(rng)) for _ in range(steps)]
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


def test_atari_protocol_settings(make_env):
    env = make_env("atari_pong", num_envs=1, seed=0, action_repeat=4)
    assert env.settings == {
        "img_height": 64,
        "img_width": 64,
        "gray_scale": True,
        "stack_num": 1,
        "frame_skip": 4,
        "action_repeat": 4,
        "repeat_action_probability": 0.25,
        "noop_max": 30,
        "full_action_space": False,
        "episodic_life": False,
        "use_fire_reset": False,
        "reward_clip": False,
        "max_episode_steps": 27000,
        "time_limit": 27000,
    }
    assert env.discrete and env.num_actions == 6  # Pong's minimal action set


def test_atari_observations(make_env):
    env = make_env("atari_pong", num_envs=2, seed=0, action_repeat=4)
    assert env.obs_space == {"image": ((64, 64, 1), np.dtype(np.uint8))}
    first = env.reset()
    assert set(first) == KEYS | {"image"}
    assert first["image"].shape == (2, 64, 64, 1) and first["image"].dtype == np.uint8
    assert first["image"].std() > 0  # a real frame, not an empty buffer
    assert first["is_first"].all() and not first["is_last"].any()
    assert (first["reward"] == 0).all() and first["reward"].dtype == np.float32
    step = env.step(env.random_actions(np.random.default_rng(0)))
    assert step["image"].shape == (2, 64, 64, 1) and not step["is_first"].any()


def test_atari_time_limit_counts_policy_steps(make_env):
    env = make_env("atari_pong", num_envs=2, seed=0, time_limit=5, action_repeat=4)
    data = run(env, 7)
    assert (data["is_last"][5] & ~data["is_terminal"][5]).all()  # truncated, not terminal
    assert not data["is_last"][:5].any()
    assert data["is_first"][6].all() and (data["reward"][6] == 0).all()


def test_atari_game_over_on_time_limit_step_is_terminal(make_env):
    # envpool flags a game over that falls on the time-limit step as truncation only.
    def episode(time_limit):
        env = make_env("atari_breakout", num_envs=1, seed=0, time_limit=time_limit, action_repeat=4)
        data = run(env, 300)
        end = np.flatnonzero(data["is_last"][:, 0])[0]
        return end, data["is_terminal"][end, 0]

    length, terminal = episode(0)
    assert terminal and 0 < length < 300
    assert episode(length) == (length, True)


def test_envpool_atari_max_pools_last_two_frames():
    # One frame_skip=4 step must equal the max of frames 3 and 4 of a frame_skip=1 env.
    # Full-size frames: resizing after the max does not commute with the max.
    kwargs = dict(
        num_envs=1, seed=0, img_height=210, img_width=160, stack_num=1, noop_max=1,
        repeat_action_probability=0.0, use_fire_reset=False,
    )  # fmt: skip
    single = envpool.make("Breakout-v5", env_type="gymnasium", frame_skip=1, **kwargs)
    skip = envpool.make("Breakout-v5", env_type="gymnasium", frame_skip=4, **kwargs)
    single.reset(), skip.reset()
    differ = 0
    for action in np.random.default_rng(0).integers(0, 4, 10):
        frames = [single.step(np.array([action]))[0] for _ in range(4)]
        pooled = skip.step(np.array([action]))[0]
        np.testing.assert_array_equal(pooled, np.maximum(frames[2], frames[3]))
        differ += (frames[2] != frames[3]).any()
    assert differ  # the frames pooled were not all identical
    single.close(), skip.close()


def test_cartpole_episode_boundaries(make_env):
    limit, n = 20, 3
    env = make_env("classic_cartpole", num_envs=n, seed=0, time_limit=limit)
    assert env.obs_space == {"vector": ((4,), np.dtype(np.float32))}
    assert env.discrete and env.num_actions == 2
    data = run(env, 300)
    first, last, terminal = data["is_first"], data["is_last"], data["is_terminal"]
    assert not (first & last).any()
    assert not (terminal & ~last).any()
    assert (first[1:] == last[:-1]).all()  # the step after is_last starts the next episode
    assert (data["reward"][first] == 0).all()
    assert (data["reward"][~first] == 1).all()
    truncated, terminated = 0, 0
    for i in range(n):
        starts, ends = np.flatnonzero(first[:, i]), np.flatnonzero(last[:, i])
        for start, end in zip(starts, ends, strict=False):
            length = end - start  # policy steps from the first observation
            if terminal[end, i]:
                terminated += 1
                assert length < limit
                x, theta = data["vector"][end, i, [0, 2]]
                assert abs(x) > 2.4 or abs(theta) > 0.2095  # the pole really fell
            else:
                truncated += 1
                assert length == limit
    assert truncated >= 3 and terminated >= 3


def test_action_repeat_loop_stops_at_episode_end(make_env):
    # classic tasks repeat in Python: the time limit counts policy steps, rewards are summed.
    env = make_env("classic_cartpole", num_envs=4, seed=1, time_limit=8, action_repeat=3)
    assert env.settings["max_episode_steps"] == 24 and env.settings["time_limit"] == 8
    data = run(env, 60)
    first, last = data["is_first"], data["is_last"]
    assert (first[1:] == last[:-1]).all()
    assert (data["reward"][first] == 0).all()
    mid = ~first & ~last
    assert (data["reward"][mid] == 3).all()
    truncated = last & ~data["is_terminal"]
    assert set(np.unique(data["reward"][truncated])) == {3.0}
    steps, envs = np.nonzero(truncated)
    starts = [np.flatnonzero(first[: t + 1, i])[-1] for t, i in zip(steps, envs, strict=True)]
    assert set(steps - starts) == {8}  # every truncated episode lasted exactly 8 policy steps


def test_unknown_task_suggests_close_matches():
    with pytest.raises(UnknownTaskError, match="atari_pongg.*close matches: atari_pong") as err:
        VectorEnv("atari_pongg", num_envs=1, seed=0)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    with pytest.raises(UnknownTaskError, match="close matches: none"):
        VectorEnv("nothing_like_it", num_envs=1, seed=0)


def test_atari_games_exist_in_envpool():
    assert len(ATARI_GAMES) == len(set(ATARI_GAMES)) == 55
    assert not {"defender", "surround"} & set(ATARI_GAMES)
    ids = _task_ids()
    atari = {ids[f"atari_{game}"] for game in ATARI_GAMES}
    assert len(atari) == 55
    assert atari <= set(envpool.list_all_envs())
    tasks = available_tasks()
    assert {"classic_cartpole", "classic_acrobot", "dmc_walker_walk"} <= set(tasks)
    assert len(tasks) == len(set(tasks))


def test_same_seed_same_observations(make_env):
    a, b = (make_env("atari_pong", num_envs=2, seed=3, action_repeat=4) for _ in range(2))
    data_a, data_b = run(a, 30, seed=1), run(b, 30, seed=1)
    for key in data_a:
        np.testing.assert_array_equal(data_a[key], data_b[key])


def test_seeds_give_independent_envs(make_env):
    # envpool's default seeds env i with seed + i; pools of seeds 0 and 1 must not share envs.
    obs = [make_env("classic_cartpole", num_envs=4, seed=s).reset()["vector"] for s in (0, 1)]
    pairs = obs[0][:, None] == obs[1][None]  # [4, 4, D]
    assert not pairs.all(-1).any()


def test_dmc_continuous_actions(make_env):
    if "dmc_cartpole_balance" not in available_tasks():
        pytest.skip("envpool has no dm_control tasks")
    env = make_env("dmc_cartpole_balance", num_envs=2, seed=0, time_limit=5, action_repeat=2)
    assert env.obs_space == {"vector": ((5,), np.dtype(np.float32))}  # position 3 + velocity 2
    assert not env.discrete and env.num_actions == 1
    actions = env.random_actions(np.random.default_rng(0))
    assert actions.shape == (2, 1) and actions.dtype == np.float32
    assert (np.abs(actions) <= 1).all()
    data = run(env, 7)
    assert data["vector"].shape == (8, 2, 5) and data["vector"].dtype == np.float32
    assert (data["is_last"][5] & ~data["is_terminal"][5]).all()  # 5 policy steps = 10 env steps
    assert not data["is_last"][:5].any() and data["is_first"][6].all()
    assert (data["reward"][1:5] > 1.5).all()  # two upright control steps of reward ~1 each


def test_step_spec(make_env):
    flags = {key: ((), np.dtype(bool)) for key in ("is_first", "is_last", "is_terminal")}
    reward = {"reward": ((), np.dtype(np.float32))}
    cases = {
        ("classic_cartpole", 1): {
            "vector": ((4,), np.dtype(np.float32)),
            "action": ((2,), np.dtype(np.uint8)),  # one-hot, stored compactly
        },
        ("atari_pong", 4): {
            "image": ((64, 64, 1), np.dtype(np.uint8)),
            "action": ((6,), np.dtype(np.uint8)),
        },
    }
    for (task, repeat), want in cases.items():
        env = make_env(task, num_envs=2, seed=0, action_repeat=repeat)
        assert env.step_spec == {**want, **reward, **flags}
        for step in (env.reset(), env.step(env.random_actions(np.random.default_rng(0)))):
            assert set(step) == set(env.step_spec) - {"action"}
            for key, value in step.items():
                assert (value.shape[1:], value.dtype) == env.step_spec[key], key


def test_atari_auto_reset_matches_raw_envpool(make_env):
    """Step t of VectorEnv is call t of the same envpool config: same frames and rewards;
    is_first where envpool's elapsed_step is 0 (its auto-reset, on the call after an end);
    is_last on terminated or truncated; is_terminal on a game over only."""
    n, limit, steps, seed = 3, 180, 550, 0
    env = make_env("atari_breakout", num_envs=n, seed=seed, time_limit=limit, action_repeat=4)
    raw = envpool.make(
        "Breakout-v5", env_type="gymnasium", num_envs=n, seed=_env_seeds(seed, n),
        frame_skip=4, max_episode_steps=limit, **_ATARI_PROTOCOL,
    )  # fmt: skip
    ours, (obs, info) = env.reset(), raw.reset()
    np.testing.assert_array_equal(
        ours["image"], obs[np.argsort(info["env_id"])].transpose(0, 2, 3, 1)
    )
    assert ours["is_first"].all() and (info["elapsed_step"] == 0).all()
    rng, last = np.random.default_rng(0), np.zeros(n, bool)
    ends = {"terminated": set(), "truncated": set()}  # (step, env)
    for t in range(1, steps + 1):
        index = rng.integers(0, env.num_actions, n).astype(np.int32)
        ours = env.step(np.eye(env.num_actions, dtype=np.float32)[index])
        obs, reward, terminated, truncated, info = raw.step(index, np.arange(n, dtype=np.int32))
        order = np.argsort(info["env_id"])
        np.testing.assert_array_equal(ours["image"], obs[order].transpose(0, 2, 3, 1), str(t))
        np.testing.assert_array_equal(ours["reward"], reward[order], str(t))
        np.testing.assert_array_equal(ours["is_first"], info["elapsed_step"][order] == 0, str(t))
        np.testing.assert_array_equal(ours["is_first"], last, str(t))  # the call after an end
        last = (terminated | truncated)[order]
        np.testing.assert_array_equal(ours["is_last"], last, str(t))
        # A game over on the time-limit step counts too (envpool reports it as truncation).
        game_over = terminated | (truncated & info["terminated"].astype(bool))
        np.testing.assert_array_equal(ours["is_terminal"], game_over[order], str(t))
        for kind, flags in (("terminated", terminated), ("truncated", truncated)):
            ends[kind] |= {(t, int(i)) for i in info["env_id"][flags]}
    # Game overs at different steps in every env, and time limits that cut episodes short.
    assert {i for _, i in ends["terminated"]} == set(range(n))
    assert len({t for t, _ in ends["terminated"]}) >= 3 and len(ends["truncated"]) >= 3
    raw.close()


def test_seed_groups_are_the_envs_of_single_seed_pools(make_env):
    """One pool for N seeds: group g steps exactly as a pool of its own seeded seeds[g]
    (sticky actions and resets included)."""
    limit = dict(time_limit=12, action_repeat=4)
    pooled = make_env("atari_pong", num_envs=4, seed=[3, 8], **limit)
    alone = [make_env("atari_pong", num_envs=2, seed=s, **limit) for s in (3, 8)]
    rng = np.random.default_rng(0)
    got, want = [pooled.reset()], [[env.reset() for env in alone]]
    for _ in range(30):
        action = pooled.random_actions(rng)
        got.append(pooled.step(action))
        want.append([env.step(action[2 * g : 2 * g + 2]) for g, env in enumerate(alone)])
    assert sum(step["is_first"].sum() for step in got[1:]) >= 4  # resets happened
    for pooled_step, alone_steps in zip(got, want, strict=True):
        for key in pooled_step:
            np.testing.assert_array_equal(
                pooled_step[key], np.concatenate([s[key] for s in alone_steps]), err_msg=key
            )


def test_seed_groups_must_split_the_envs_evenly():
    with pytest.raises(ValueError, match="3 envs cannot be split into 2 seed groups"):
        VectorEnv("classic_cartpole", 3, [0, 1])


@pytest.mark.parametrize("task, repeat", [("atari_pong", 4), ("classic_cartpole", 3)])
def test_inactive_envs_do_not_move(make_env, task, repeat):
    """An env left out of a step keeps its observation and its random stream: its active
    steps are those of an env stepped only then."""
    limit = dict(time_limit=10, action_repeat=repeat)
    gappy = make_env(task, num_envs=2, seed=5, **limit)
    steady = make_env(task, num_envs=2, seed=5, **limit)
    rng = np.random.default_rng(1)
    first = gappy.reset()
    steady.reset()
    last = first
    resets = 0
    for t in range(40):
        action = gappy.random_actions(rng)
        active = np.array([True, t % 3 != 0])
        step = gappy.step(action, active)
        if not active[1]:
            key = "image" if "image" in step else "vector"
            np.testing.assert_array_equal(step[key][1], last[key][1])
            assert step["reward"][1] == 0 and not step["is_first"][1] and not step["is_last"][1]
        else:
            want = steady.step(action)
            for key in step:
                np.testing.assert_array_equal(step[key][1], want[key][1], err_msg=key)
            resets += int(want["is_first"][1])
        last = step
    assert resets >= 1


def test_an_atari_envs_own_time_limit_is_the_atari_presets():
    """`time_limit: 0` on Atari is the paper's limit: dreamer-analyze counts such a run as
    on protocol."""
    from dreamer_jax import envs
    from dreamer_jax.config import make_config

    assert envs._ATARI_TIME_LIMIT == make_config(["atari"]).time_limit == 27000
