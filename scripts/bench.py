"""Benchmark the learner: compile time, updates/s, host CPU time, peak memory, XLA FLOPs.

    python scripts/bench.py --configs atari [--precision bf16] [--updates 20] [--no-record]
    python scripts/bench.py --configs atari --num_seeds 8 --json out.json  # 8 seeds at once
    python scripts/bench.py --configs atari --num_seeds 8 --profile /tmp/prof  # + a trace
    python scripts/bench.py --collector --configs atari --num_seeds 8  # envs + replays
    python scripts/bench.py --replay --configs atari               # replay memory and waits
    python scripts/bench.py --determinism --configs atari --num_seeds 2  # bit-identical?
    python scripts/bench.py --data_age --configs atari --envs 16 [--replay.ongoing true]
    python scripts/bench.py --observe --configs atari --num_seeds 4  # the observe scan alone
    python scripts/bench.py --policy --configs atari --num_seeds 8 --updates 200  # acting
    python scripts/bench.py --flops --configs atari   # matmul GFLOP per update by module

Any config preset/override is accepted as for training. Prints one result block and appends
it, with the exact command, machine and date, to docs/benchmarks.md (unless --no-record);
`--json PATH` also writes the block's figures as JSON; `--profile DIR` traces three more
learner updates after the timed ones with `jax.profiler` (TensorBoard's profile plugin and a
Perfetto `perfetto_trace.json.gz` under `DIR/plugins/profile/<date>/`, and the update's
optimized HLO text as `DIR/train_step.hlo.txt.gz`, which scripts/trace_summary.py summarizes
together, naming each op's shape, jax scope and source line). Uses a synthetic batch with the
shapes of the configured task (Atari: 64×64×1 uint8, 18 actions), so it needs no environment.

The learner runs `num_seeds` seeds as the training loop does: one jitted update over a
leading seed axis (`updates_per_sec` counts those calls; `seed_updates_per_sec` is N times
that). `--determinism` checks that two runs of the same updates are bit-identical, and how far
each seed of the N-seed program is from the one-seed program of that seed.

`--data_age` measures how old the data the learner samples is, in policy steps (summed over
envs, the run's step counter), with the configured replay and `envs`: synthetic episodes of
`--episode_length` steps (Boxing's are about 1,800) through the real `Replay`, one batch
drawn every 100 steps until `--data_steps` (default 400k) steps.

A bad option, an unknown task or a `--json`/`--profile` path that cannot be written is one
`error:` line and exit 2, before anything runs or is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import json
import os
import pathlib
import platform
import re
import resource
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from trace_summary import HLO_FILE

from dreamer_jax.agent import Agent
from dreamer_jax.config import ConfigError, OneLineParser, load_config
from dreamer_jax.paths import DirectoryError, ensure_writable, write_atomic
from dreamer_jax.seeds import init_keys, run_seeds, seed_sharding, select, stack
from dreamer_jax.startup import prepare, quiet_on_broken_pipe
from dreamer_jax.train import RunError, check_state_fits, memory_bytes

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODES = ("collector", "replay", "determinism", "data_age", "observe", "policy", "flops")
# Far past any benchmark's updates or steps, and small enough for int64 step arithmetic.
MAX_COUNT = 10**9


class BenchError(Exception):
    """A bad argument, or a benchmark that measured nothing. The message is one line."""


def synthetic_batch(config, obs_key, obs_shape, num_actions, seed=0):
    rng = np.random.default_rng(seed)
    b, t = config.dataset.batch, config.dataset.length
    if obs_key == "image":
        obs = rng.integers(0, 256, (b, t, *obs_shape), dtype=np.uint8)
    else:
        obs = rng.normal(size=(b, t, *obs_shape)).astype(np.float32)
    return {
        obs_key: obs,
        "action": np.eye(num_actions, dtype=np.float32)[rng.integers(0, num_actions, (b, t))],
        "reward": rng.normal(size=(b, t)).astype(np.float32),
        "is_first": np.zeros((b, t), bool),
        "is_last": np.zeros((b, t), bool),
        "is_terminal": np.zeros((b, t), bool),
    }


def synthetic_agent(config) -> tuple[Agent, dict[str, np.ndarray]]:
    """The agent and a synthetic batch for the configured task's shapes (Atari: 64×64×1
    images, 18 actions; otherwise cartpole's 4-vector, 2 actions)."""
    image = config.task.startswith("atari")
    obs_space = {"image": ((64, 64, 1), np.uint8)} if image else {"vector": ((4,), np.float32)}
    num_actions = 18 if image else 2
    agent = Agent(config, obs_space, num_actions, discrete=True)
    return agent, synthetic_batch(config, agent.obs_key, agent.obs_shape, num_actions)


def machine() -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores {cpu}"


def peak_memory_bytes() -> tuple[str, int]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device peak", int(stats["peak_bytes_in_use"])
    return "host max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench_collector(config, seconds: float = 10.0) -> tuple[list[tuple[str, str]], dict]:
    """The acting loop's host side, as in a run's prefill: `train.Acting` steps one pool of
    N seeds × `envs` envs with random actions and adds each seed's steps to its own replay,
    which saves finished episodes to a temporary folder as a run does. Env steps/s summed
    over all envs, and per loop step the time in the envs and in the replays."""
    import tempfile

    from dreamer_jax import train
    from dreamer_jax.api import make_agent

    seeds, envs = run_seeds(config), config.envs
    env = train.make_env(config, envs, seeds)
    stopwatch = train.Stopwatch()
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as opened:
        opened.callback(env.close)
        replays = []
        for seed in seeds:  # each closed (its writes waited for) before the folder goes
            folder_of_seed = pathlib.Path(folder, str(seed))
            replays.append(train._open_replay(config, folder_of_seed, env.step_spec, seed, None, 0))
            opened.callback(replays[-1].close)
        seed_states = train._fresh_loop(config)["seeds"]
        acting = train.Acting(
            make_agent(config), config, env, replays, seed_states, seed_sharding(len(seeds)),
            stopwatch,
        )  # fmt: skip
        for _ in range(20):  # warm-up: envpool's first steps are slower
            acting.step(None, prefill=True)
        stopwatch.reset()
        loop_steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            acting.step(None, prefill=True)
            loop_steps += 1
        elapsed = time.perf_counter() - start
        for replay in replays:
            replay.flush()  # a failed episode write fails the benchmark
        episodes = sum(replay.next_index for replay in replays)
    rate = loop_steps * env.num_envs / elapsed
    ms = {part: 1000 * stopwatch.seconds[part] / loop_steps for part in ("env", "replay")}
    figures = {
        "seeds": len(seeds), "envs": envs, "env_steps_per_sec": rate,
        "frames_per_sec": rate * config.action_repeat, "loop_step_ms": 1000 * elapsed / loop_steps,
        "env_ms": ms["env"], "replay_ms": ms["replay"], "episodes_saved": episodes,
    }  # fmt: skip
    return [
        ("envs", f"{len(seeds)} seed(s) × {envs} env(s) in one pool, random actions"),
        ("collector", f"{rate:.0f} env steps/s ({rate * config.action_repeat:.0f} frames/s)"),
        (
            "per loop step",
            f"{figures['loop_step_ms']:.3f} ms: envs {ms['env']:.3f} ms, replays "
            f"{ms['replay']:.3f} ms ({episodes} episodes saved)",
        ),
    ], figures


def seed_batches(config, agent, batch):
    """The initial states `[N]` of the run's seeds and the batch repeated for each."""
    return agent.init_seeds(init_keys(config)), stack([batch] * config.num_seeds)


def bench_learner(
    config, updates: int, profile_dir: str | None = None
) -> tuple[list[tuple[str, str]], dict]:
    """Compile time, updates/s, host CPU time, peak memory and XLA FLOPs of the N-seed update;
    with `profile_dir`, a `jax.profiler` trace of three more updates (not timed)."""
    agent, batch = synthetic_agent(config)
    states, batches = seed_batches(config, agent, batch)
    sharding = seed_sharding(config.num_seeds)
    states, batches = jax.device_put((states, batches), sharding)

    start = time.perf_counter()
    compiled = agent.train_seeds.lower(states, batches).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None  # backends without it

    states, metrics = agent.train_seeds(states, batches)  # warm-up (first execution)
    jax.block_until_ready(metrics)
    usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(updates):
        states, metrics = agent.train_seeds(states, batches)
    jax.block_until_ready((states, metrics))
    elapsed = time.perf_counter() - start
    # The process's CPU time (all threads): on CPU, user time says how many cores the update
    # keeps busy and system time what the kernel spends on it (mostly page faults).
    after = resource.getrusage(resource.RUSAGE_SELF)
    user_ms = 1000 * (after.ru_utime - usage.ru_utime) / updates
    system_ms = 1000 * (after.ru_stime - usage.ru_stime) / updates
    memory_kind, memory = peak_memory_bytes()
    if profile_dir is not None:
        # The optimized program beside the trace: trace_summary.py names its ops from it.
        hlo_path = pathlib.Path(profile_dir) / HLO_FILE
        hlo_path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(hlo_path, "wt") as file:
            file.write(compiled.as_text())
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                states, metrics = agent.train_seeds(states, batches)
            jax.block_until_ready((states, metrics))
    b, t, n = config.dataset.batch, config.dataset.length, config.num_seeds
    figures = {
        "num_seeds": n,
        "devices": sharding.mesh.size,
        "precision": config.precision,
        "batch": [b, t],
        "compile_s": compile_s,
        "updates_per_sec": updates / elapsed,
        "seed_updates_per_sec": n * updates / elapsed,
        "host_user_ms_per_update": user_ms,
        "host_system_ms_per_update": system_ms,
        "memory_kind": memory_kind,
        "memory_gib": memory / 2**30,
        "xla_gflop_per_update": None if flops is None else flops / 1e9,
    }
    rows = [
        ("precision", config.precision),
        ("batch", f"{b}×{t}"),
        ("seeds", f"{n} on {sharding.mesh.size} device(s)"),
        ("compile time", f"{compile_s:.1f} s"),
        ("train_step", f"{updates / elapsed:.2f} updates/s ({1000 * elapsed / updates:.0f} ms)"),
        ("seed-updates/s", f"{n * updates / elapsed:.2f}"),
        ("host CPU/update", f"user {user_ms:.0f} ms, system {system_ms:.0f} ms"),
        (memory_kind, f"{memory / 2**30:.2f} GiB"),
        ("XLA FLOPs/update", "n/a" if flops is None else f"{flops / 1e9:.4g} GFLOP"),
    ]
    return rows, figures


def bench_observe(config, updates: int) -> tuple[list[tuple[str, str]], dict]:
    """The world model's observe scan alone, N seeds: forward and backward of the posterior
    of the synthetic batch's embedding (gradients for the world model's parameters and the
    embedding), the loop `world_model.posterior_scan` runs."""
    from dreamer_jax.agent import over_seeds
    from dreamer_jax.world_model import WorldModel, observe, preprocess

    agent, batch = synthetic_agent(config)
    model, states, batches = agent.world_model, *seed_batches(config, agent, batch)
    data = preprocess(batches, config)
    embed = jax.jit(over_seeds(lambda p, o: model.apply(p, o, method=WorldModel.encode)))(
        states.wm_params, data[agent.obs_key]
    )
    keys = jax.random.split(jax.random.key(config.seed), config.num_seeds)

    def grads(params, embed, action, is_first, key):
        def loss(params, embed):
            posterior, prior_logits = observe(model, params, embed, action, is_first, key)
            return sum(jnp.mean(x.astype(jnp.float32) ** 2) for x in (*posterior, prior_logits))

        return jax.grad(loss, argnums=(0, 1))(params, embed)

    step = jax.jit(over_seeds(grads))
    args = (states.wm_params, embed, data["action"], data["is_first"], keys)
    args = jax.device_put(args, seed_sharding(config.num_seeds))  # as the learner's
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(updates):  # one at a time: the best call, as this VM's speed wanders
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    per_call = min(times)
    b, t, n = config.dataset.batch, config.dataset.length, config.num_seeds
    figures = {"num_seeds": n, "precision": config.precision, "batch": [b, t],
               "compile_s": compile_s, "ms_per_call": 1000 * per_call,
               "median_ms_per_call": 1000 * float(np.median(times))}  # fmt: skip
    return [
        ("precision", config.precision),
        ("batch", f"{b}×{t}"),
        ("seeds", str(n)),
        ("compile and first call", f"{compile_s:.1f} s"),
        ("observe forward + backward", f"{1000 * per_call:.1f} ms, best of {updates} calls"),
    ], figures


# `vmap(transpose(jvp(WorldModel.decode)))` -> `WorldModel.decode`
_TRANSFORMED = re.compile(r"^(?:(?:vmap|jvp|transpose|remat|checkpoint)\()+(.*?)\)*$")


def jaxpr_equations(fn, *args) -> list[tuple]:
    """Every equation of `fn(*args)`'s jaxpr, nested jaxprs included (closed ones of jit and
    scan, open ones of `jax.checkpoint`, tuples of `cond` branches), as `(eqn, trips,
    scopes)`: the times it runs per call (scan lengths multiplied) and its whole name scope
    (a nested jaxpr's name stacks are relative to the equation that holds it)."""

    def walk(jaxpr, trips: int, outer: list[str]):
        for eqn in jaxpr.eqns:
            scopes = [*outer, *str(eqn.source_info.name_stack).split("/")]
            yield eqn, trips, scopes
            inner = trips * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else [param]:
                    while not hasattr(sub, "eqns") and hasattr(sub, "jaxpr"):  # closed jaxprs
                        sub = sub.jaxpr
                    if hasattr(sub, "eqns"):
                        yield from walk(sub, inner, scopes)

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr, 1, []))


def matmul_gflop(fn, *args) -> dict[str, float]:
    """GFLOP of every matmul (`dot_general`) of `fn(*args)`'s jaxpr, by the name scope (flax
    module path) that ran it, prefixed `forward: ` or `backward: ` (inside autodiff's
    transpose). A loop body counts once per iteration (scan lengths multiplied), unlike XLA's
    cost analysis, which counts it once."""
    totals: dict[str, float] = {}
    for eqn, trips, scopes in jaxpr_equations(fn, *args):
        if eqn.primitive.name != "dot_general":
            continue
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        (contracting, _), _ = eqn.params["dimension_numbers"]
        size = np.prod(out.shape) * np.prod([lhs.shape[d] for d in contracting])
        backward = any("transpose(" in scope for scope in scopes)
        names = [_TRANSFORMED.sub(r"\1", scope) for scope in scopes]
        skip = ("jit(", "pjit(", "while", "rematted")  # functions and loops, not modules
        path = "/".join(n for n in names if n and not n.startswith(skip)) or "(top level)"
        key = f"{'backward' if backward else 'forward'}: {path}"
        totals[key] = totals.get(key, 0.0) + 2e-9 * float(size) * trips
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def bench_flops(config, top: int = 25) -> tuple[list[tuple[str, str]], dict]:
    """Where the N-seed update's matmul work goes: `matmul_gflop` of `train_seeds` (traced,
    not run), the `top` largest rows."""
    agent, batch = synthetic_agent(config)
    by_scope = matmul_gflop(agent.train_seeds, *seed_batches(config, agent, batch))
    total = sum(by_scope.values())
    b, t = config.dataset.batch, config.dataset.length
    rows = [(f"`{scope}`", f"{gflop:.4g} GFLOP ({100 * gflop / total:.1f} %)")
            for scope, gflop in list(by_scope.items())[:top]]  # fmt: skip
    figures = {"num_seeds": config.num_seeds, "precision": config.precision, "batch": [b, t],
               "total_gflop": total, "gflop_by_scope": by_scope}  # fmt: skip
    return [
        ("batch", f"{b}×{t}"),
        ("seeds", str(config.num_seeds)),
        ("matmul GFLOP per update", f"{total:.4g} (loop bodies × their lengths)"),
        *rows,
    ], figures


def bench_policy(config, updates: int) -> tuple[list[tuple[str, str]], dict]:
    """The jitted policy step of N seeds (`agent.act_seeds`, one env each, train mode) as the
    acting loop calls it: the host time of the call (dispatch) and of the call with its
    action back in numpy, medians over `updates` calls."""
    from dreamer_jax.seeds import policy_inputs

    agent, batch = synthetic_agent(config)
    n = config.num_seeds
    states = jax.device_put(agent.init_seeds(init_keys(config)), seed_sharding(n))
    carry = jax.device_put(agent.initial_carry(1, n), seed_sharding(n))
    keys = jax.device_put(jax.random.split(jax.random.key(config.seed), n), seed_sharding(n))
    first = batch[agent.obs_key][0, 0]  # one observation
    obs = {agent.obs_key: np.stack([first] * n), "is_first": np.zeros(n, bool)}
    inputs = policy_inputs(obs, agent.obs_key, n)
    start = time.perf_counter()
    np.asarray(agent.act_seeds(states, inputs, carry, keys, mode="train")[0])
    compile_s = time.perf_counter() - start
    dispatch, total = [], []
    for _ in range(updates):
        start = time.perf_counter()
        action, carry, keys = agent.act_seeds(states, inputs, carry, keys, mode="train")
        dispatch.append(time.perf_counter() - start)
        np.asarray(action)
        total.append(time.perf_counter() - start)
    figures = {"num_seeds": n, "precision": config.precision, "compile_s": compile_s,
               "dispatch_ms": 1000 * float(np.median(dispatch)),
               "call_ms": 1000 * float(np.median(total))}  # fmt: skip
    return [
        ("precision", config.precision),
        ("seeds", f"{n}, one env each"),
        ("compile and first call", f"{compile_s:.1f} s"),
        ("policy step", f"{figures['call_ms']:.2f} ms to the action in numpy, of which "
         f"{figures['dispatch_ms']:.2f} ms dispatch (medians of {updates} calls)"),
    ], figures  # fmt: skip


def leaf_differences(run_a: list[np.ndarray], run_b: list[np.ndarray]) -> list[float]:
    """Max |a − b| of every pair of leaves that is not bit-identical (so −0.0 vs 0.0 counts,
    with difference 0)."""
    return [
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        for a, b in zip(run_a, run_b, strict=True)
        if a.shape != b.shape or a.tobytes() != b.tobytes()
    ]


def _train_leaves(agent, states, batches, updates: int) -> list[list[np.ndarray]]:
    """Every leaf of each seed's state and metrics after `updates` updates."""
    for _ in range(updates):
        states, metrics = agent.train_seeds(states, batches)
    states = states.replace(key=jax.random.key_data(states.key))
    n = jax.tree.leaves(states)[0].shape[0]
    return [
        [np.asarray(x) for x in jax.tree.leaves(select((states, metrics), i))] for i in range(n)
    ]


def bench_determinism(config, updates: int) -> tuple[list[tuple[str, str]], dict]:
    """Whether `updates` updates from the same states and batch, run twice, give bit-identical
    params, optimizer states, counters, keys and metrics on this backend (GPU reductions may
    not be; see docs/reproducibility.md); and the largest difference between each seed of the
    N-seed program and that seed run alone (one-seed program, as `--num_seeds 1 --seed s`)."""
    agent, batch = synthetic_agent(config)
    runs = [_train_leaves(agent, *seed_batches(config, agent, batch), updates) for _ in range(2)]
    differing = leaf_differences(sum(runs[0], []), sum(runs[1], []))
    alone = []
    for seed in run_seeds(config):
        single = config.update({"seed": seed, "num_seeds": 1})
        alone += sum(_train_leaves(agent, *seed_batches(single, agent, batch), updates), [])
    to_single = leaf_differences(sum(runs[0], []), alone)
    figures = {
        "updates": updates,
        "bit_identical": not differing,
        "leaves": len(sum(runs[0], [])),
        "leaves_differing": len(differing),
        "max_abs_difference": max(differing, default=0.0),
        "leaves_differing_from_single_seed": len(to_single),
        "max_abs_difference_to_single_seed": max(to_single, default=0.0),
    }
    rows = [
        ("updates per run", str(updates)),
        (
            "bit-identical",
            "yes"
            if not differing
            else f"no: {len(differing)} of {figures['leaves']} leaves differ",
        ),
        ("max abs difference", f"{figures['max_abs_difference']:.3g}"),
    ]
    if config.num_seeds > 1:
        rows.append(
            (
                f"each of {config.num_seeds} seeds vs that seed alone",
                f"{len(to_single)} leaves differ, max abs difference "
                f"{figures['max_abs_difference_to_single_seed']:.3g}",
            )
        )
    return rows, figures


def bench_replay(config, episodes: int = 50, episode_length: int = 1000) -> tuple[list, dict]:
    """Bytes per stored Atari step, sample() time, and how long the learner waits in
    next(dataset) when each update takes 20 ms (what the prefetch thread hides). The
    episodes are synthetic and Atari-shaped whatever the task; the config gives the replay
    and dataset settings."""
    from dreamer_jax.replay import Replay

    rng = np.random.default_rng(0)
    flag = ((), np.dtype(bool))
    spec = {
        "image": ((64, 64, 1), np.dtype(np.uint8)), "action": ((18,), np.dtype(np.uint8)),
        "reward": ((), np.dtype(np.float32)), "is_first": flag, "is_last": flag,
        "is_terminal": flag,
    }  # fmt: skip
    replay = Replay(
        None, spec, config.replay.capacity, config.replay.minlen, config.dataset.length,
        config.dataset.batch, config.replay.prioritize_ends, config.seed, config.replay.prefetch,
    )  # fmt: skip
    steps = np.arange(episode_length)
    for _ in range(episodes):
        replay.add_episode(
            {
                "image": rng.integers(0, 256, (episode_length, 64, 64, 1), dtype=np.uint8),
                "action": np.eye(18, dtype=np.uint8)[rng.integers(0, 18, episode_length)],
                "reward": rng.normal(size=episode_length).astype(np.float32),
                "is_first": steps == 0,
                "is_last": steps == episode_length - 1,
                "is_terminal": steps == episode_length - 1,
            }
        )
    stats = replay.stats
    start = time.perf_counter()
    for _ in range(50):
        replay.sample(rng)
    sample_ms = 1000 * (time.perf_counter() - start) / 50
    dataset, waits = replay.dataset(), []
    for _ in range(50):
        start = time.perf_counter()
        next(dataset)
        waits.append(time.perf_counter() - start)
        time.sleep(0.02)  # stands in for the update
    replay.close()
    b, t = config.dataset.batch, config.dataset.length
    figures = {
        "num_steps": stats["num_steps"], "num_episodes": stats["num_episodes"],
        "bytes_per_step": stats["bytes"] / stats["num_steps"], "sample_ms": sample_ms,
        "batch": [b, t], "median_wait_ms": 1000 * float(np.median(waits[1:])),
    }  # fmt: skip
    return [
        ("episodes", "synthetic, Atari-shaped (64×64×1 uint8 images, 18 actions)"),
        ("stored", f"{stats['num_steps']} steps in {stats['num_episodes']} episodes"),
        ("bytes per step", f"{figures['bytes_per_step']:.0f} B"),
        ("sample()", f"{sample_ms:.2f} ms per {b}×{t} batch"),
        ("learner wait in next(dataset)", f"{figures['median_wait_ms']:.3f} ms median"),
    ], figures


def bench_data_age(config, episode_length: int, total_steps: int) -> tuple[list, dict]:
    """Age (policy steps since it was added) of the newest row of every sampled chunk, for
    `config.envs` envs whose episodes last `episode_length` steps (env i's first one ends
    early, (i + 1) / envs of the way, so the envs' episodes end at different times)."""
    from dreamer_jax.replay import Replay

    flag = ((), np.dtype(bool))
    spec = {"vector": ((1,), np.dtype(np.float32)), "action": ((1,), np.dtype(np.uint8)),
            "reward": ((), np.dtype(np.float32)), "is_first": flag, "is_last": flag,
            "is_terminal": flag}  # fmt: skip
    replay = Replay(
        None, spec, config.replay.capacity, config.replay.minlen, config.dataset.length,
        config.dataset.batch, config.replay.prioritize_ends, config.seed, config.replay.prefetch,
        ongoing=config.replay.ongoing,
    )  # fmt: skip
    envs = config.envs
    left = np.array([episode_length * (i + 1) // envs for i in range(envs)])
    first, rng, ages, step = np.ones(envs, bool), np.random.default_rng(0), [], 0
    while step < total_steps:
        last = left == 1
        replay.add({
            "vector": np.zeros((envs, 1), np.float32), "action": np.zeros((envs, 1), np.uint8),
            "reward": np.full(envs, step, np.float32),  # when the row was added
            "is_first": first.copy(), "is_last": last, "is_terminal": np.zeros(envs, bool),
        })  # fmt: skip
        first, left = last, np.where(last, episode_length, left - 1)
        step += envs
        if step % 100 < envs and step >= config.prefill and replay.ready:
            ages.append(step - replay.sample(rng)["reward"][:, -1])
    if not ages:
        raise BenchError(
            f"no batch was sampled in {total_steps} policy steps: raise --data_steps past the "
            f"prefill ({config.prefill} steps) and the first finished episodes"
        )
    ages = np.concatenate(ages)
    figures = {
        "envs": envs, "ongoing": config.replay.ongoing, "episode_length": episode_length,
        "steps": total_steps, "median_age": float(np.median(ages)),
        "p1_age": float(np.percentile(ages, 1)), "p10_age": float(np.percentile(ages, 10)),
    }  # fmt: skip
    return [
        ("envs, replay.ongoing", f"{envs}, {str(config.replay.ongoing).lower()}"),
        ("episodes", f"{episode_length} steps; {total_steps} policy steps in all"),
        ("sampled chunks", f"{len(ages)}, from step {config.prefill}, one batch per 100 steps"),
        ("age of a chunk's newest row", f"median {figures['median_age']:.0f}, 10th percentile "
         f"{figures['p10_age']:.0f}, 1st percentile {figures['p1_age']:.0f} policy steps"),
    ], figures  # fmt: skip


def _count(text: str) -> int:
    """An argparse type: a whole number from 1 to MAX_COUNT, also written as a float (4e5)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (1 <= value <= MAX_COUNT and value.is_integer()):
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_COUNT}, got {text!r}"
        )
    return int(value)


def _parser() -> argparse.ArgumentParser:
    """The bench's own options; every other word is a config preset or override. No
    abbreviations: `--update 5` is the config's unknown key, not `--updates` taken silently."""
    parser = OneLineParser(
        prog="scripts/bench.py", add_help=False, allow_abbrev=False, error=BenchError
    )
    modes = parser.add_mutually_exclusive_group()
    for mode in MODES:
        modes.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
    parser.set_defaults(mode="learner")
    parser.add_argument("--no-record", dest="record", action="store_false")
    parser.add_argument("--updates", type=_count, default=20)
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--profile")
    parser.add_argument("--episode_length", type=_count, default=1800)
    parser.add_argument("--data_steps", type=_count, default=400_000)
    return parser


def check_task(config) -> None:
    """BenchError (one line) unless the task exists: one env of it made and closed, the check
    training makes (the synthetic benchmarks would never make one, and record any name)."""
    from dreamer_jax.envs import UnknownTaskError, VectorEnv

    try:
        VectorEnv(config.task, 1, config.seed, config.time_limit, config.action_repeat).close()
    except UnknownTaskError as error:
        raise BenchError(str(error)) from None


# The modes each option changes: given to another mode it would be ignored, silently.
OPTION_MODES = {
    "--updates": ("learner", "determinism", "observe", "policy"),
    "--profile": ("learner",),
    "--episode_length": ("data_age",),
    "--data_steps": ("data_age",),
}


def check_mode_options(argv: list[str], mode: str) -> None:
    """BenchError (one line) for an option of `argv` that the benchmark `mode` ignores."""
    for option, modes in OPTION_MODES.items():
        given = any(arg == option or arg.startswith(f"{option}=") for arg in argv)
        if given and mode not in modes:
            runs = " or ".join(map(_mode_name, modes))
            raise BenchError(f"{option} does nothing with {_mode_name(mode)}: it applies to {runs}")


def _mode_name(mode: str) -> str:
    """A benchmark mode as the command line selects it."""
    return "the learner (default)" if mode == "learner" else f"--{mode}"


def check_outputs(json_path: pathlib.Path | None, profile_dir: str | None) -> None:
    """BenchError or DirectoryError (one line) unless `--json`'s folder exists and is writable
    and `--profile`'s can be made: known before the benchmark runs, not after."""
    if json_path is not None and profile_dir is not None:
        profile = pathlib.Path(profile_dir).resolve()
        if json_path.resolve() in (profile, *profile.parents):  # --profile would make it a folder
            raise BenchError(f"--json {json_path} is the --profile directory or a folder above it")
    if json_path is not None:
        if json_path.is_dir():
            raise BenchError(f"--json {json_path} is a directory")
        if not json_path.parent.is_dir():
            raise BenchError(f"--json {json_path}: no folder {json_path.parent}")
        ensure_writable(json_path.parent, "--json folder")
    if profile_dir is not None:
        ensure_writable(pathlib.Path(profile_dir), "--profile directory")


@quiet_on_broken_pipe
def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return 0
    try:
        options, config_args = _parser().parse_known_args(argv)
        config = load_config(config_args)
        check_mode_options(argv, options.mode)
        check_task(config)
        # As training refuses it: a state that cannot fit would fail in its allocation.
        check_state_fits(synthetic_agent(config)[0], config, memory_bytes())
        check_outputs(options.json, options.profile)  # last: it makes --profile's folder
        run(config, options)
    except (BenchError, ConfigError, DirectoryError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(config, options: argparse.Namespace) -> None:
    """Runs the benchmark of `options.mode`, prints its block, writes `--json` and appends
    the block to docs/benchmarks.md (unless --no-record)."""
    mode, updates = options.mode, options.updates
    if mode == "collector":
        results, figures = bench_collector(config)
    elif mode == "replay":
        results, figures = bench_replay(config)
    elif mode == "data_age":
        results, figures = bench_data_age(config, options.episode_length, options.data_steps)
    elif mode == "determinism":
        results, figures = bench_determinism(config, updates)
    elif mode == "observe":
        results, figures = bench_observe(config, updates)
    elif mode == "policy":
        results, figures = bench_policy(config, updates)
    elif mode == "flops":
        results, figures = bench_flops(config)
    else:
        results, figures = bench_learner(config, updates, options.profile)
    command = "python scripts/bench.py " + shlex.join(sys.argv[1:])
    rows = [
        ("date", datetime.date.today().isoformat()),
        ("command", f"`{command}`"),
        ("machine", machine()),
        ("jax", jax.__version__),
        *([("XLA_FLAGS", f"`{os.environ['XLA_FLAGS']}`")] if os.environ.get("XLA_FLAGS") else []),
        *results,
    ]
    text = "\n".join(f"| {k} | {v} |" for k, v in rows)
    what = {
        "learner": f"learner, precision {config.precision}",
        "replay": "replay of synthetic Atari-shaped episodes",
    }.get(mode, mode)
    title = f"### {config.task}, {what} ({rows[0][1]})"
    block = f"\n{title}\n\n| what | value |\n|---|---|\n{text}\n"
    print(block)
    if options.json is not None:
        record_figures = {"command": command, "machine": machine(), "jax": jax.__version__,
                          "xla_flags": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
        data = json.dumps({**record_figures, "mode": mode, **figures}, indent=1).encode()
        write_atomic(options.json, data)  # never a partial file
        print(f"figures in {options.json}")
    if options.record:
        path = ROOT / "docs" / "benchmarks.md"
        with path.open("a") as file:
            file.write(block)
        print(f"appended to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    prepare()  # as dreamer-train does: measure what training gets
    sys.exit(main(sys.argv[1:]))
