"""Vectorized environments over envpool: numpy in, numpy out, in the Dreamer step format.

    env = VectorEnv("atari_pong", num_envs=8, seed=0, action_repeat=4)
    step = env.reset()                  # {"image": [8,64,64,1] uint8, "reward": [8], ...}
    step = env.step(env.random_actions(rng))

Every reset/step returns `{obs_key, "reward", "is_first", "is_last", "is_terminal"}` with a
leading dim N (SPEC §1). An env whose episode ended (`is_last`) starts its next episode on the
following `step()` call: that step returns the first observation with `is_first=True` and
reward 0, and ignores the env's action (envpool resets it instead of stepping).

Tasks: `atari_<game>` (the 55 games of the paper, SPEC §5 protocol), `classic_cartpole`,
`classic_acrobot`, and `dmc_<domain>_<task>` for the dm_control tasks envpool provides.
`time_limit` always counts policy steps (after action repeat). Each env gets its own seed
derived from `seed`, so pools with different seeds share no env. With a list of seeds the
pool holds one group of envs per seed, group g the same envs as a pool seeded `seeds[g]`:
the N seeds of a run step in one pool.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Sequence

import envpool
import gymnasium
import numpy as np
from envpool.registration import registry

# gymnasium warns, on every classic-control space check, that envpool's float64 bounds
# become float32 boxes: harmless, and it would flood the logs.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")


class UnknownTaskError(ValueError):
    """A task name that `available_tasks()` does not list. The message is one line."""


ATARI_GAMES: tuple[str, ...] = (
    "alien", "amidar", "assault", "asterix", "asteroids", "atlantis", "bank_heist",
    "battle_zone", "beam_rider", "berzerk", "bowling", "boxing", "breakout", "centipede",
    "chopper_command", "crazy_climber", "demon_attack", "double_dunk", "enduro",
    "fishing_derby", "freeway", "frostbite", "gopher", "gravitar", "hero", "ice_hockey",
    "james_bond", "kangaroo", "krull", "kung_fu_master", "montezuma_revenge", "ms_pacman",
    "name_this_game", "phoenix", "pitfall", "pong", "private_eye", "qbert", "riverraid",
    "road_runner", "robotank", "seaquest", "skiing", "solaris", "space_invaders",
    "star_gunner", "tennis", "time_pilot", "tutankham", "up_n_down", "venture",
    "video_pinball", "wizard_of_wor", "yars_revenge", "zaxxon",
)  # fmt: skip

# Games whose envpool id is not the CamelCase of the name (envpool's ROM is "jamesbond").
_ATARI_IDS = {"james_bond": "Jamesbond-v5"}

_CLASSIC_IDS = {"cartpole": "CartPole-v1", "acrobot": "Acrobot-v1"}

# SPEC §5. frame_skip (= action_repeat) and max_episode_steps (= time_limit) are set per env.
# envpool max-pools the last 2 of the frame_skip frames and counts max_episode_steps in
# policy steps (27000 steps = 108000 frames); tests/test_envs.py checks both.
_ATARI_PROTOCOL = {
    "img_height": 64,
    "img_width": 64,
    "gray_scale": True,
    "stack_num": 1,
    "repeat_action_probability": 0.25,
    "noop_max": 30,
    "full_action_space": False,
    "episodic_life": False,
    "use_fire_reset": False,
    "reward_clip": False,
}
_ATARI_TIME_LIMIT = 27000


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_"))


def _snake(camel: str) -> str:
    """CamelCase to snake_case: BallInCup -> ball_in_cup, HumanoidCMU -> humanoid_cmu."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", camel).lower()


@functools.cache
def _task_ids() -> dict[str, str]:
    """Task name -> envpool id, for every task `VectorEnv` accepts."""
    ids = {f"atari_{g}": _ATARI_IDS.get(g, _camel(g) + "-v5") for g in ATARI_GAMES}
    ids.update({f"classic_{name}": env_id for name, env_id in _CLASSIC_IDS.items()})
    for env_id in envpool.list_all_envs():
        import_path, spec_cls, kwargs = registry.specs[env_id]
        if import_path == "envpool.mujoco.dmc":  # spec_cls is "Dmc<Domain>EnvSpec"
            domain = _snake(spec_cls.removeprefix("Dmc").removesuffix("EnvSpec"))
            ids[f"dmc_{domain}_{kwargs['task_name'].lower()}"] = env_id
    return ids


def available_tasks() -> list[str]:
    """All task names: atari_*, classic_*, then dmc_*."""
    return list(_task_ids())


def _env_seeds(seed: int, num_envs: int) -> list[int]:
    """Independent int32 seeds per env. envpool's own default is `seed + i`, which would make
    env i of seed s identical to env i-1 of seed s+1 (e.g. train and eval pools)."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(num_envs) >> 1]


class VectorEnv:
    """N environments of one task, stepped together.

    `seed` is an int, or a list of G seeds for G equal groups of `num_envs // G` envs (env
    `g * num_envs // G + i` is env i of a pool of `num_envs // G` envs seeded `seeds[g]`)."""

    def __init__(
        self,
        task: str,
        num_envs: int,
        seed: int | Sequence[int],
        time_limit: int = 0,
        action_repeat: int = 1,
    ):
        ids = _task_ids()
        if task not in ids:
            close = difflib.get_close_matches(task, ids, n=3, cutoff=0.6)
            raise UnknownTaskError(
                f"unknown task '{task}'; close matches: {', '.join(close) or 'none'}"
            )
        if num_envs < 1 or action_repeat < 1 or time_limit < 0:
            raise ValueError(
                f"need num_envs >= 1, action_repeat >= 1, time_limit >= 0; got "
                f"{num_envs}, {action_repeat}, {time_limit}"
            )
        seeds = [seed] if isinstance(seed, int | np.integer) else list(seed)
        if not seeds or num_envs % len(seeds):
            raise ValueError(f"{num_envs} envs cannot be split into {len(seeds)} seed groups")
        per_group = num_envs // len(seeds)
        self.num_envs = num_envs
        self._atari = task.startswith("atari_")
        if self._atari:
            # envpool repeats the action itself (frame_skip) and max-pools the last 2 frames.
            self._repeat = 1
            kwargs = dict(
                _ATARI_PROTOCOL,
                frame_skip=action_repeat,
                max_episode_steps=time_limit or _ATARI_TIME_LIMIT,
            )
        else:
            # envpool's dmc `frame_skip` is physics substeps per control step, not action
            # repeat, so repeat here; its step counter then counts env steps.
            self._repeat = action_repeat
            kwargs = {"max_episode_steps": time_limit * action_repeat} if time_limit else {}
        self._env = envpool.make(
            ids[task],
            env_type="gymnasium",
            num_envs=num_envs,
            seed=[s for group in seeds for s in _env_seeds(group, per_group)],
            **kwargs,
        )
        space = self._env.action_space
        obs_space = self._env.observation_space
        self.discrete = isinstance(space, gymnasium.spaces.Discrete)
        self.num_actions = int(space.n) if self.discrete else int(space.shape[0])
        if self._atari:
            c, h, w = obs_space.shape
            self.obs_space = {"image": ((h, w, c), np.dtype(np.uint8))}
        else:
            # dmc observations are a dict of arrays; they are concatenated flat.
            spaces = (
                obs_space.values() if isinstance(obs_space, gymnasium.spaces.Dict) else [obs_space]
            )
            size = sum(int(np.prod(s.shape)) for s in spaces)
            self.obs_space = {"vector": ((size,), np.dtype(np.float32))}
        self._key = next(iter(self.obs_space))
        self._done: np.ndarray | None = None  # [N] bool: episode ended on the last step
        self._obs: np.ndarray | None = None  # [N, ...]: the last observation of each env

    @property
    def settings(self) -> dict:
        """The protocol values in use, read back from envpool's config."""
        config = self._env.config
        keys = ["max_episode_steps"]
        if self._atari:
            keys += [*_ATARI_PROTOCOL, "frame_skip"]
        settings = {key: config[key] for key in keys}
        settings["action_repeat"] = config["frame_skip"] if self._atari else self._repeat
        settings["time_limit"] = config["max_episode_steps"] // self._repeat
        return settings

    @property
    def step_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-step shape and dtype of every key of a replay step: the observation, `action`
        ([A]: uint8 one-hot if discrete, else float32), `reward` and the three flags."""
        action_dtype = np.uint8 if self.discrete else np.float32
        return {
            **self.obs_space,
            "action": ((self.num_actions,), np.dtype(action_dtype)),
            "reward": ((), np.dtype(np.float32)),
            **{key: ((), np.dtype(bool)) for key in ("is_first", "is_last", "is_terminal")},
        }

    def reset(self) -> dict[str, np.ndarray]:
        """Start new episodes in all envs: is_first all True, reward 0."""
        obs, info = self._env.reset()
        n = self.num_envs
        out = {
            self._key: self._empty_obs(),
            "reward": np.zeros(n, np.float32),
            "is_first": np.ones(n, bool),
            "is_last": np.zeros(n, bool),
            "is_terminal": np.zeros(n, bool),
        }
        out[self._key][info["env_id"]] = self._convert(obs)
        self._done = np.zeros(n, bool)
        self._obs = out[self._key].copy()
        return out

    def step(self, action: np.ndarray, active: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """action [N, num_actions]: one-hot (discrete) or in [-1, 1] (continuous).

        `active` ([N] bool, default all) steps only those envs; the others do not move (their
        random streams neither) and return their last observation with reward 0, no flags."""
        if self._done is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action)
        if action.shape != (self.num_envs, self.num_actions):
            raise ValueError(
                f"action must have shape {(self.num_envs, self.num_actions)}, got {action.shape}"
            )
        if self.discrete:
            action = action.argmax(-1).astype(np.int32)
        else:
            action = np.clip(action, -1.0, 1.0).astype(np.float64)
        n = self.num_envs
        stepped = np.ones(n, bool) if active is None else np.asarray(active, bool)
        # envpool auto-resets an env on the call after its episode ended, ignoring the action.
        is_first = self._done & stepped
        obs = self._obs.copy()
        reward = np.zeros(n, np.float32)
        is_last = np.zeros(n, bool)
        is_terminal = np.zeros(n, bool)
        active = np.flatnonzero(stepped).astype(np.int32)
        for _ in range(self._repeat):
            if not active.size:
                break
            raw, rew, terminated, truncated, info = self._env.step(action[active], active)
            env_id = info["env_id"]
            obs[env_id] = self._convert(raw)
            reward[env_id] += rew
            if "terminated" in info:
                # Atari reports a game over on the time-limit step as truncation only.
                terminated = terminated | (truncated & info["terminated"].astype(bool))
            is_last[env_id] = terminated | truncated
            is_terminal[env_id] = terminated
            # Envs that just reset or ended stop here; the others repeat the action.
            active = env_id[~(is_first[env_id] | is_last[env_id])]
        reward[is_first] = 0.0  # SPEC §1: a first step carries no reward (envpool gives 0 too)
        self._done = np.where(stepped, is_last, self._done)
        self._obs = obs
        return {
            self._key: obs,
            "reward": reward,
            "is_first": is_first,
            "is_last": is_last,
            "is_terminal": is_terminal,
        }

    def random_actions(self, rng: np.random.Generator, num: int | None = None) -> np.ndarray:
        """[num, num_actions] float32 (num: all envs by default): uniform one-hot (discrete)
        or uniform in [-1, 1]."""
        num = self.num_envs if num is None else num
        shape = (num, self.num_actions)
        if self.discrete:
            index = rng.integers(0, self.num_actions, num)
            return np.eye(self.num_actions, dtype=np.float32)[index]
        return rng.uniform(-1.0, 1.0, shape).astype(np.float32)

    def close(self) -> None:
        self._env.close()

    def _empty_obs(self) -> np.ndarray:
        shape, dtype = self.obs_space[self._key]
        return np.empty((self.num_envs, *shape), dtype)

    def _convert(self, obs: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """envpool obs -> [n, 64, 64, 1] image or [n, D] vector (dtype cast by the caller)."""
        if self._atari:
            return obs.transpose(0, 2, 3, 1)  # [n, 1, 64, 64] -> channels last
        if isinstance(obs, dict):  # dmc: concatenate all keys in a fixed (sorted) order
            return np.concatenate([obs[k].reshape(len(obs[k]), -1) for k in sorted(obs)], -1)
        return obs.reshape(len(obs), -1)
