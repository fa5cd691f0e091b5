"""Evaluation: `evaluate` on stub envs with known episodes, and the eval CLI end to end."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import yaml

from dreamer_jax.api import load
from dreamer_jax.eval import episode_shares, evaluate

ROOT = pathlib.Path(__file__).resolve().parent.parent


class StubEnv:
    """`VectorEnv`'s interface. Env i plays episodes of `lengths[i]` steps; every step of its
    k-th episode (from 0) gives reward k + 1, so that episode returns (k + 1) * lengths[i].
    Like envpool, an env whose episode ended resets on the next step (is_first, reward 0).
    Images hold the number of `step` calls so far; `moves` counts each env's own steps."""

    num_actions, discrete = 2, True

    def __init__(self, lengths, image=False):
        self.lengths = np.asarray(lengths)
        self.num_envs = len(lengths)
        self._key = "image" if image else "vector"
        shape = (2, 2, 1) if image else (1,)
        self.obs_space = {self._key: (shape, np.dtype(np.uint8 if image else np.float32))}

    def reset(self):
        n = self.num_envs
        self.calls = 0
        self.moves = np.zeros(n, int)
        self.t = np.zeros(n, int)
        self.episode = np.zeros(n, int)
        self.done = np.zeros(n, bool)
        return self._obs(np.zeros(n), np.ones(n, bool), np.zeros(n, bool))

    def step(self, action, active=None):
        assert action.shape == (self.num_envs, self.num_actions)
        active = np.ones(self.num_envs, bool) if active is None else active
        self.calls += 1
        self.moves += active
        is_first = self.done & active
        self.episode += is_first
        self.t = np.where(is_first, 0, self.t + active)
        reward = np.where(is_first | ~active, 0.0, self.episode + 1.0)
        is_last = active & ~is_first & (self.t == self.lengths)
        self.done = np.where(active, is_last, self.done)
        return self._obs(reward, is_first, is_last)

    def _obs(self, reward, is_first, is_last):
        shape, dtype = self.obs_space[self._key]
        obs = np.full((self.num_envs, *shape), self.calls, dtype)
        out = {"reward": reward.astype(np.float32), "is_first": is_first, "is_last": is_last}
        return {self._key: obs, **out, "is_terminal": is_last.copy()}


class StubAgent:
    """`Agent.act_seeds`' interface: always action 0; records the keys `[N]` it is given and
    hands back the first half of each key's split, as the agent does."""

    def __init__(self, obs_key):
        self.obs_key = obs_key
        self.keys = []

    def initial_carry(self, num_envs, num_seeds):
        return np.zeros((num_seeds, num_envs))

    def act_seeds(self, states, obs, carry, keys, mode="train"):
        assert mode == "eval" and obs["is_first"].shape == carry.shape
        self.keys.append(keys)
        action = np.eye(2, dtype=np.float32)[np.zeros(carry.shape, int)]
        return action, carry + 1, jax.vmap(jax.random.split)(keys)[:, 0]


def _evaluate(lengths, episodes, image=False, record_video=False, num_seeds=1):
    env = StubEnv(lengths, image)
    agent = StubAgent(env._key)
    keys = jax.random.split(jax.random.key(0), num_seeds)
    results = evaluate(agent, env, None, episodes, keys, record_video)
    return agent, (results[0] if num_seeds == 1 else results), env


@pytest.mark.parametrize(
    "episodes, envs, shares", [(5, 3, [2, 2, 1]), (1, 3, [1, 0, 0]), (4, 2, [2, 2])]
)
def test_episode_shares(episodes, envs, shares):
    assert episode_shares(episodes, envs) == shares


def test_long_episodes_count_as_much_as_short_ones():
    # Env 0 finishes two 2-step episodes before env 1's 10-step one: keeping the first two
    # to finish would give [2, 4].
    _, result, _ = _evaluate([2, 10], episodes=2)
    assert result.returns == [2.0, 10.0]
    assert result.lengths == [2, 10]


def test_fewer_episodes_than_envs_counts_env_0_only():
    _, result, _ = _evaluate([5, 2, 3], episodes=1)
    assert result.returns == [5.0] and result.lengths == [5]


def test_uneven_shares_env_major_order_and_key_stream():
    # Shares [2, 2, 1]. Env 0's episodes end at steps 3 and 7 (step 4 is its reset), env 1's
    # at 1 and 3, env 2's at 2: seven policy steps, env 1's and 2's later episodes ignored.
    agent, result, _ = _evaluate([3, 1, 2], episodes=5)
    assert result.returns == [3.0, 6.0, 1.0, 2.0, 2.0]
    assert result.lengths == [3, 3, 1, 1, 2]
    key, expected = jax.random.split(jax.random.key(0), 1)[0], []
    for _ in range(7):
        expected.append(jax.random.key_data(key))
        key, _ = jax.random.split(key)
    got = [jax.random.key_data(k[0]) for k in agent.keys]
    np.testing.assert_array_equal(np.stack(got), expected)


def test_a_stop_request_cuts_the_evaluation_short_between_policy_steps():
    """`stop()` is asked before each policy step; once true, evaluate returns None at once."""
    env = StubEnv([3, 1])
    agent = StubAgent(env._key)
    asked = []
    stop = lambda: asked.append(1) or len(asked) > 2
    keys = jax.random.split(jax.random.key(0), 1)
    assert evaluate(agent, env, None, 4, keys, stop=stop) is None
    assert len(agent.keys) == 2 and env.calls == 2  # two policy steps, then the stop
    assert evaluate(agent, env, None, 4, keys, stop=lambda: False)[0].returns  # finishes


def test_video_is_env_0_first_episode():
    _, result, _ = _evaluate([3, 1], episodes=4, image=True, record_video=True)
    frames = np.stack(result.frames)
    chex.assert_shape(frames, (3, 2, 2, 1))
    np.testing.assert_array_equal(frames[:, 0, 0, 0], [0, 1, 2])  # reset obs, steps 1 and 2
    assert _evaluate([3, 1], episodes=4, image=True)[1].frames == []
    assert _evaluate([3, 1], episodes=4, record_video=True)[1].frames == []


def test_each_seed_plays_as_if_alone_and_then_stops():
    """Two seeds of two envs in one pool: each seed's result, frames and env steps are those
    of its envs evaluated alone; a seed's envs stop once its episodes are done."""
    _, results, env = _evaluate(
        [3, 1, 2, 6], episodes=3, image=True, record_video=True, num_seeds=2
    )
    for i, lengths in enumerate(([3, 1], [2, 6])):
        _, alone, alone_env = _evaluate(lengths, episodes=3, image=True, record_video=True)
        assert results[i].returns == alone.returns and results[i].lengths == alone.lengths
        np.testing.assert_array_equal(env.moves[2 * i : 2 * i + 2], alone_env.moves)
        assert len(results[i].frames) == len(alone.frames) == lengths[0]
    # Seed 1's last episode ended at step 6; the pool went on to step 7 for seed 0 alone.
    assert env.calls == 7 and list(env.moves) == [7, 7, 6, 6]


def test_no_episodes_is_an_error():
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        _evaluate([3], episodes=0)


# ------------------------------------------------------------------ CLI


def run_eval(*args):
    return subprocess.run(
        [sys.executable, "-m", "dreamer_jax.eval", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [([], "name the run once"), (["a", "--logdir", "b"], "name the run once"),
     (["--logdir"], "expected one argument"), (["--logdir", ""], "config.yaml not found"),
     (["--logdir", "x", "--episodes", "two"], "invalid int value: 'two'")],
)  # fmt: skip
def test_cli_bad_arguments_are_one_line(args, fragment):
    assert_one_line_error(run_eval(*args), fragment)


@pytest.mark.parametrize("flag", ["--episodes", "--envs"])
def test_cli_needs_at_least_one_episode_and_env(tmp_path, flag):
    assert_one_line_error(run_eval("--logdir", str(tmp_path), flag, "0"), flag, ">= 1")


@pytest.mark.parametrize("seed", ["-1", "2147483648", "99999999999999999999999"])
def test_cli_seed_is_one_the_run_could_have(tmp_path, seed):
    assert_one_line_error(run_eval("--logdir", str(tmp_path), "--seed", seed), "--seed", seed)


@pytest.mark.parametrize("text", ["task: [classic_cartpole\n", "just a string\n"])
def test_cli_bad_config_file(tmp_path, text):
    (tmp_path / "config.yaml").write_text(text)
    assert_one_line_error(run_eval("--logdir", str(tmp_path)), "config.yaml")


@pytest.mark.parametrize("named", [["--logdir"], []])  # --logdir DIR, or DIR alone
def test_cli_missing_logdir(tmp_path, named):
    assert_one_line_error(run_eval(*named, str(tmp_path / "none")), "none does not exist")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The only training run of this module: a tiny cartpole run checkpointed at step 400."""
    logdir = tmp_path_factory.mktemp("eval") / "run"
    args = ["--configs", "classic", "debug", "--task", "classic_cartpole", "--logdir", str(logdir)]
    args += ["--steps", "400", "--prefill", "300", "--eval_every", "100000"]
    result = subprocess.run(
        [sys.executable, "-m", "dreamer_jax.train", *args, "--wandb.mode", "disabled"],
        cwd=ROOT, env=dict(os.environ, WANDB_SILENT="true"), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir


def test_cli_evaluates_a_run_read_only(trained_run):
    snapshot = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    result = run_eval("--logdir", str(trained_run), "--envs", "2", "--episodes", "3", "--video")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "video: none, classic_cartpole has no image observations\n" in result.stdout
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["seed"] == 0 and summary["step"] == 400 and summary["episodes"] == 3
    assert summary["eval_seed"] == 2_000_000  # the run's seed + 2e6 by default
    # The Python API plays the same episodes as the program, with the same arguments.
    played = load(trained_run).evaluate(3, num_envs=2)
    assert played.returns == summary["returns"] and played.lengths == summary["lengths"]
    assert "classic_cartpole seed 0 step 400: return " in result.stdout
    assert "over 3 episodes (eval seed 2000000)" in result.stdout
    assert len(summary["returns"]) == 3 and len(summary["lengths"]) == 3
    assert np.isfinite(summary["mean"])
    assert np.isclose(summary["mean"], np.mean(summary["returns"]))
    # Cartpole gives reward 1 per step.
    np.testing.assert_allclose(summary["returns"], summary["lengths"])
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == snapshot


def test_cli_checkpoint_of_other_shapes(trained_run, tmp_path):
    logdir = tmp_path / "run"
    shutil.copytree(trained_run, logdir)
    config = yaml.safe_load((logdir / "config.yaml").read_text())
    config["rssm"]["deter"] += 8
    (logdir / "config.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run_eval("--logdir", str(logdir)), "checkpoint")
