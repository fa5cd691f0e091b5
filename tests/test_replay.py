"""Tests for the episodic replay: reassembly, chunk sampling, eviction, disk, threading."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest

from dreamer_jax.envs import VectorEnv
from dreamer_jax.replay import Replay, ReplayDirectoryError, set_aside_after

FLAGS = {key: ((), np.dtype(bool)) for key in ("is_first", "is_last", "is_terminal")}


def step_spec(image_shape=(8, 8, 1), num_actions=4) -> dict:
    """The spec of `make_episode`'s steps."""
    return {
        "image": (image_shape, np.dtype(np.uint8)),
        "action": ((num_actions,), np.dtype(np.uint8)),
        "reward": ((), np.dtype(np.float32)),
        **FLAGS,
    }


def make_episode(length: int, offset: int = 0, image_shape=(8, 8, 1)) -> dict[str, np.ndarray]:
    """A fake finished episode [length, ...]; `reward` holds `offset + t`, so every step of
    every episode made with distinct offsets is identifiable."""
    steps = np.arange(length)
    action = np.zeros((length, 4), np.uint8)
    action[steps, steps % 4] = 1
    return {
        "image": ((offset + steps) % 256).astype(np.uint8)[:, None, None, None]
        * np.ones(image_shape, np.uint8),
        "action": action,
        "reward": (offset + steps).astype(np.float32),
        "is_first": steps == 0,
        "is_last": steps == length - 1,
        "is_terminal": steps == length - 1,
    }


def make_replay(directory=None, spec=None, **kwargs) -> Replay:
    args = dict(capacity=10_000, minlen=5, length=5, batch=4, prioritize_ends=False, seed=0)
    return Replay(directory, spec or step_spec(), **{**args, **kwargs})


def take(replay: Replay, count: int) -> list[np.ndarray]:
    """The rewards [B, T] of the next `count` batches of a fresh `dataset()`, then close()."""
    batches = replay.dataset()
    rewards = [next(batches)["reward"] for _ in range(count)]
    replay.close()
    return rewards


def assert_episodes_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_add_reassembles_interleaved_envs():
    replay = make_replay(minlen=2, length=2)
    lengths = [[5, 3], [7, 2], [4, 6]]  # per env, its episodes in order
    steps = 10
    expected, streams = [], []
    for i, lens in enumerate(lengths):
        episodes = [make_episode(n, offset=1000 * i + 100 * j) for j, n in enumerate(lens)]
        unfinished = make_episode(steps + 1, offset=1000 * i + 500)  # is_last only past the end
        expected += [(sum(lens[: j + 1]) - 1, i, ep) for j, ep in enumerate(episodes)]
        streams.append({key: np.concatenate([ep[key] for ep in [*episodes, unfinished]])
                        for key in unfinished})  # fmt: skip
    buffers = {key: np.stack([s[key][0] for s in streams]) for key in streams[0]}
    for t in range(steps):
        for key, buffer in buffers.items():  # the collector reuses its step buffers
            buffer[...] = np.stack([s[key][t] for s in streams])
        finished = replay.add(buffers)
        want = [ep for end, _, ep in sorted(expected, key=lambda e: e[1]) if end == t]
        assert len(finished) == len(want), t
        for got, ref in zip(finished, want, strict=True):
            assert_episodes_equal(got, ref)
    assert replay.stats["num_episodes"] == 6
    assert replay.stats["num_steps"] == sum(map(sum, lengths))


def test_add_ends_a_truncated_episode_at_is_last():
    """An episode ends at `is_last`, not `is_terminal`: a time-limit truncation (is_last
    without is_terminal) is one finished episode, not the start of one that runs on into
    the env's next episode."""
    replay = make_replay(minlen=2, length=2)
    truncated, following = make_episode(6), make_episode(4, offset=100)
    truncated["is_terminal"][:] = False
    finished = [replay.add({k: v[t : t + 1] for k, v in truncated.items()}) for t in range(6)]
    assert [len(f) for f in finished] == [0] * 5 + [1]
    assert_episodes_equal(finished[-1][0], truncated)
    for t in range(4):
        replay.add({k: v[t : t + 1] for k, v in following.items()})
    assert replay.stats["num_episodes"] == 2 and replay.stats["num_steps"] == 10
    assert_episodes_equal(replay.episodes[1], following)


def test_add_rejects_changing_env_count():
    replay = make_replay()
    step = {key: value[:1] for key, value in make_episode(3).items()}
    replay.add({key: np.repeat(value, 2, 0) for key, value in step.items()})
    with pytest.raises(ValueError, match="envs"):
        replay.add(step)


def test_spec_needs_required_keys():
    spec = step_spec()
    del spec["is_terminal"]
    with pytest.raises(ValueError, match=r"spec lacks keys \['is_terminal'\]"):
        make_replay(spec=spec)


def test_sample_chunks_are_contiguous_slices():
    replay = make_replay(batch=16, length=6, minlen=6, prioritize_ends=True)
    lengths = [6, 9, 20, 33]
    for j, n in enumerate(lengths):
        replay.add_episode(make_episode(n, offset=1000 * j))
    stored = [{key: value.copy() for key, value in ep.items()} for ep in replay.episodes]
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = replay.sample(rng)
        assert batch["image"].shape == (16, 6, 8, 8, 1)
        assert batch["image"].dtype == np.uint8
        assert batch["action"].shape == (16, 6, 4) and batch["action"].dtype == np.uint8
        assert batch["reward"].shape == (16, 6) and batch["reward"].dtype == np.float32
        assert batch["is_first"].dtype == bool and batch["is_first"][:, 0].all()
        for b in range(16):
            j, start = divmod(int(batch["reward"][b, 0]), 1000)
            assert start + 6 <= lengths[j]
            for key, value in stored[j].items():
                chunk = value[start : start + 6].copy()
                if key == "is_first":
                    chunk[0] = True
                np.testing.assert_array_equal(batch[key][b], chunk, err_msg=key)
    for ep, ref in zip(replay.episodes, stored, strict=True):
        assert_episodes_equal(ep, ref)  # sampling did not touch storage
    assert not replay.episodes[0]["image"].flags.writeable


def test_sample_without_data_raises():
    replay = make_replay(minlen=10, length=5)
    replay.add_episode(make_episode(9))  # shorter than minlen: not sampleable
    with pytest.raises(RuntimeError, match="no episode"):
        replay.sample(np.random.default_rng(0))


def test_an_episode_shorter_than_a_chunk_is_not_stored_even_above_minlen():
    """Storing needs `max(minlen, length)` steps, not only `minlen`: an episode of 7 steps
    with minlen 5 but chunks of 10 cannot hold one chunk, so storing it would make the
    replay claim to be ready and then fail to draw (or draw past the episode's end)."""
    replay = make_replay(capacity=100, minlen=5, length=10)
    episode = make_episode(7)
    finished = [replay.add({k: v[t : t + 1] for k, v in episode.items()}) for t in range(7)]
    assert [len(f) for f in finished] == [0] * 6 + [1]  # still returned (and saved)
    assert replay.stats["num_episodes"] == 0 and replay.stats["num_steps"] == 0
    assert not replay.ready
    with pytest.raises(RuntimeError, match="no episode of length >= 10"):
        replay.sample(np.random.default_rng(0))


def start_probabilities(total: int, length: int, minlen: int, prioritize_ends: bool) -> np.ndarray:
    """P(start = s) by enumerating the draws: uniform u over `upper` values, start = min(u, .)."""
    upper = total - length + 1 + (minlen if prioritize_ends else 0)
    probs = np.zeros(total - length + 1)
    for u in range(upper):
        probs[min(u, total - length)] += 1 / upper
    return probs


@pytest.mark.parametrize("prioritize_ends", [True, False])
def test_start_distribution(prioritize_ends):
    replay = make_replay(batch=1000, length=10, minlen=10, prioritize_ends=prioritize_ends)
    replay.add_episode(make_episode(100))
    rng = np.random.default_rng(0)
    starts = np.concatenate([replay.sample(rng)["reward"][:, 0] for _ in range(100)]).astype(int)
    freq = np.bincount(starts, minlength=91) / len(starts)
    probs = start_probabilities(100, 10, 10, prioritize_ends)
    if prioritize_ends:
        np.testing.assert_allclose(probs[90], 11 / 101)
        np.testing.assert_allclose(probs[:90], 1 / 101)
    else:
        np.testing.assert_allclose(probs, 1 / 91)
    assert len(freq) == 91
    sigma = np.sqrt(probs * (1 - probs) / len(starts))
    assert np.all(np.abs(freq - probs) < 5 * sigma), np.max(np.abs(freq - probs) / sigma)


def test_capacity_drops_oldest_first():
    replay = make_replay(capacity=50)
    lengths = [10, 20, 15, 12, 8, 30]
    kept_after = [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    for j, (n, want) in enumerate(zip(lengths, kept_after, strict=True)):
        replay.add_episode(make_episode(n, offset=1000 * j))
        assert [int(ep["reward"][0]) // 1000 for ep in replay.episodes] == want
        assert replay.stats["num_steps"] == sum(lengths[k] for k in want) <= 50
    # An episode longer than the capacity stays, alone (the official replay keeps one too):
    # dropping it would leave nothing to sample.
    replay.add_episode(make_episode(60, offset=6000))
    assert [int(ep["reward"][0]) // 1000 for ep in replay.episodes] == [6]
    assert replay.ready and replay.stats["num_steps"] == 60
    replay.add_episode(make_episode(10, offset=7000))
    assert [int(ep["reward"][0]) // 1000 for ep in replay.episodes] == [7]


def test_atari_step_bytes():
    replay = make_replay(minlen=50, length=50, spec=step_spec((64, 64, 1), 18))
    episode = make_episode(200, image_shape=(64, 64, 1))
    episode["action"] = np.eye(18, dtype=np.uint8)[np.arange(200) % 18]
    replay.add_episode(episode)
    stored = replay.episodes[0]
    assert stored["image"].dtype == np.uint8 and stored["action"].dtype == np.uint8
    assert stored["image"] is episode["image"]  # stored as given, not copied
    stats = replay.stats
    assert stats["bytes"] / stats["num_steps"] <= 4.5 * 1024
    assert stats["bytes"] / stats["num_steps"] == 4096 + 18 + 4 + 3


def test_save_load_round_trip(tmp_path):
    replay = make_replay(tmp_path, minlen=4, length=4)
    for j, n in enumerate([6, 3, 8]):  # the 3-step episode is saved but not stored
        replay.add_episode(make_episode(n, offset=1000 * j))
    replay.flush()  # the files are written by a worker thread
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00000000-6.npz", "00000001-3.npz", "00000002-8.npz"]
    originals = {name: (tmp_path / name).read_bytes() for name in names}

    reloaded = make_replay(tmp_path, minlen=4, length=4)
    assert reloaded.stats == {**replay.stats, "loaded": 2}
    for got, ref in zip(reloaded.episodes, replay.episodes, strict=True):
        assert_episodes_equal(got, ref)
    reloaded.add_episode(make_episode(5, offset=5000))
    reloaded.flush()
    assert (tmp_path / "00000003-5.npz").exists()
    assert {name: (tmp_path / name).read_bytes() for name in names} == originals
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left


def test_episode_files_are_written_by_a_worker_in_order_and_flush_waits(tmp_path, monkeypatch):
    """add_episode returns before its file is written (the acting loop does not wait for the
    compression and fsync); files land in index order, and flush() waits for all of them."""
    savez, release, writers = np.savez_compressed, threading.Event(), []

    def slow_savez(file, **arrays):
        writers.append(threading.current_thread().name)
        assert release.wait(10)
        return savez(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", slow_savez)
    replay = make_replay(tmp_path)
    start = time.perf_counter()
    replay.add_episode(make_episode(6))
    replay.add_episode(make_episode(7, offset=1000))
    assert time.perf_counter() - start < 5  # not blocked on the writes
    assert replay.next_index == 2 and replay.stats["num_episodes"] == 2  # stored at once
    assert not any(p.name.endswith(".npz") for p in tmp_path.iterdir())
    release.set()
    replay.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000000-6.npz", "00000001-7.npz"]
    assert writers and all(name.startswith("replay-save") for name in writers)
    release.clear()  # close() waits for a write still in progress, too
    replay.add_episode(make_episode(8, offset=2000))
    threading.Timer(0.3, release.set).start()
    replay.close()
    assert (tmp_path / "00000002-8.npz").exists()


def test_a_failed_episode_write_is_raised_at_the_next_step_and_every_flush(tmp_path, monkeypatch):
    """A write that fails (a full disk) stops the caller at its next add, and every flush
    after it raises it: a checkpoint taken then would count an episode that is not on disk.
    close() still returns. The half-written temp file is removed, the episodes queued behind
    it are not written (the folder keeps an unbroken run of indices), and none is queued."""
    savez, release, calls = np.savez_compressed, threading.Event(), []

    def full_disk_once(file, **arrays):
        calls.append(file.name)
        if len(calls) > 1:  # the disk has room again: only skipping keeps this file away
            return savez(file, **arrays)
        assert release.wait(10)  # until the second episode is queued behind this one
        file.write(b"part of an episode")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk_once)
    replay = make_replay(tmp_path)
    replay.add_episode(make_episode(6))
    replay.add_episode(make_episode(7))
    release.set()
    with pytest.raises(OSError, match="No space left"):
        replay.flush()
    step = {key: value[:1] for key, value in make_episode(3).items()}  # not its last step
    with pytest.raises(OSError, match="No space left"):
        replay.add(step)
    with pytest.raises(OSError, match="No space left"):
        replay.add_episode(make_episode(6))
    assert replay.next_index == 2
    with pytest.raises(OSError, match="No space left"):
        replay.flush()
    replay.close()
    assert list(tmp_path.iterdir()) == []


def test_load_keeps_newest_within_capacity(tmp_path):
    replay = make_replay(tmp_path)
    for j, n in enumerate([10, 10, 10, 10]):
        replay.add_episode(make_episode(n, offset=1000 * j))
    replay.flush()
    reloaded = make_replay(tmp_path, capacity=25)
    assert [int(ep["reward"][0]) // 1000 for ep in reloaded.episodes] == [2, 3]
    assert reloaded.stats["loaded"] == 2 and len(list(tmp_path.iterdir())) == 4
    alone = make_replay(tmp_path, capacity=8)  # the newest, though longer than the capacity
    assert [int(ep["reward"][0]) // 1000 for ep in alone.episodes] == [3]


def test_load_budget_takes_an_older_episode_that_fits_exactly(tmp_path):
    """On reload, an older episode is loaded while it fits into what capacity leaves after
    the newer ones (`length > budget` stops the load), including an exact fit; one more step
    and it is not read at all, not read and then evicted."""
    replay = make_replay(tmp_path)
    replay.add_episode(make_episode(10))  # older
    replay.add_episode(make_episode(11, offset=1000))  # newer
    replay.flush()
    exact = make_replay(tmp_path, capacity=21)  # 11 + 10 == 21
    assert exact.stats["loaded"] == 2 and exact.stats["num_steps"] == 21
    short = make_replay(tmp_path, capacity=20)  # 10 > 20 - 11: stop after the newest
    assert short.stats["loaded"] == 1 and short.stats["num_steps"] == 11
    assert [int(ep["reward"][0]) for ep in short.episodes] == [1000]


def test_unreadable_files_are_skipped_and_untouched(tmp_path):
    replay = make_replay(tmp_path)
    replay.add_episode(make_episode(10))
    replay.flush()
    valid = (tmp_path / "00000000-10.npz").read_bytes()
    bad = {
        "00000005-10.npz": valid[: len(valid) // 2],
        "00000006-7.npz": b"not an npz file at all",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "00000007-10.npz", image=np.zeros((10, 8, 8, 1), np.uint8))  # no keys

    with pytest.warns(UserWarning) as record:
        reloaded = make_replay(tmp_path)
    messages = [str(w.message) for w in record]
    for name in [*bad, "00000007-10.npz"]:
        assert sum(name in m for m in messages) == 1, (name, messages)
    # Not numpy's "contains pickled (object) data ... load it unsafely" for random bytes.
    assert any(m.endswith("00000006-7.npz: not an .npz (zip) archive") for m in messages)
    assert all("\n" not in m for m in messages)
    assert reloaded.stats["skipped_files"] == 3 and reloaded.stats["loaded"] == 1
    for name, data in bad.items():
        assert (tmp_path / name).read_bytes() == data
    reloaded.add_episode(make_episode(10))
    reloaded.flush()
    assert (tmp_path / "00000008-10.npz").exists()  # the index skips past unreadable files


def test_running_out_of_memory_while_loading_is_not_taken_for_a_bad_file(tmp_path, monkeypatch):
    """A MemoryError is the machine's, not the file's: it stops the load (train names it)
    instead of skipping every file as unreadable and training on a smaller replay."""
    replay = make_replay(tmp_path)
    replay.add_episode(make_episode(10))
    replay.flush()

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.00 GiB")

    monkeypatch.setattr(np, "load", no_memory)
    with pytest.raises(MemoryError, match="Unable to allocate"):
        make_replay(tmp_path)


def record_cartpole(directory, steps: int = 120) -> tuple[Replay, dict]:
    """A replay of `directory` holding real cartpole episodes, and the env's step spec."""
    env = VectorEnv("classic_cartpole", num_envs=2, seed=0)
    replay = make_replay(directory, spec=env.step_spec)
    rng, step = np.random.default_rng(0), env.reset()
    action = np.zeros((2, 2), np.uint8)
    for _ in range(steps):
        replay.add({**step, "action": action})
        action = env.random_actions(rng).astype(np.uint8)  # the action leading to the next step
        step = env.step(action)
    env.close()
    replay.flush()
    return replay, env.step_spec


def atari_episode(episode):
    return make_episode(len(episode["reward"]), image_shape=(64, 64, 1))


def float64_vectors(episode):
    return {**episode, "vector": episode["vector"].astype(np.float64)}


def three_cartpole_actions(episode):
    return {**episode, "action": np.zeros((len(episode["action"]), 3), np.uint8)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (atari_episode, r"episode keys \[.*'image'.*\] != spec keys \[.*'vector'\]"),
        (float64_vectors, r"vector float64\[4\] instead of float32\[4\]"),
        (three_cartpole_actions, r"action uint8\[3\] instead of uint8\[2\]"),
    ],
)
def test_load_skips_only_files_off_spec(tmp_path, change, message):
    """A foreign episode file, newest in the directory, is skipped; every real one loads.
    add_episode refuses the same episode."""
    replay, spec = record_cartpole(tmp_path)
    assert replay.stats["num_episodes"] >= 3
    foreign = change({key: np.array(value) for key, value in replay.episodes[-1].items()})
    path = tmp_path / f"{len(list(tmp_path.iterdir())):08d}-{len(foreign['reward'])}.npz"
    np.savez_compressed(path, **foreign)
    assert max(tmp_path.iterdir()) == path
    data = path.read_bytes()

    with pytest.warns(UserWarning) as record:
        reloaded = make_replay(tmp_path, spec=spec)
    messages = [str(w.message) for w in record if "replay:" in str(w.message)]
    assert len(messages) == 1 and str(path) in messages[0], messages
    assert re.search(message, messages[0]) and "\n" not in messages[0]
    assert reloaded.stats == {**replay.stats, "loaded": replay.stats["num_episodes"],
                              "skipped_files": 1}  # fmt: skip
    for got, want in zip(reloaded.episodes, replay.episodes, strict=True):
        assert_episodes_equal(got, want)
    assert path.read_bytes() == data  # skipped, never deleted or changed
    files, stats = sorted(tmp_path.iterdir()), reloaded.stats
    with pytest.raises(ValueError, match=message) as error:
        reloaded.add_episode(foreign)
    assert "\n" not in str(error.value)
    reloaded.flush()
    assert sorted(tmp_path.iterdir()) == files and reloaded.stats == stats  # refused whole


def test_same_seed_same_batches():
    def replay(seed):
        replay = make_replay(seed=seed, prioritize_ends=True)
        for j, n in enumerate([7, 12, 30]):
            replay.add_episode(make_episode(n, offset=1000 * j))
        return replay

    np.testing.assert_array_equal(take(replay(3), 5), take(replay(3), 5))
    assert not np.array_equal(take(replay(3), 5), take(replay(4), 5))
    # sample() draws exactly like dataset(), from the Generator it is given.
    other, rng = replay(9), np.random.default_rng(3)
    np.testing.assert_array_equal([other.sample(rng)["reward"] for _ in range(5)],
                                  take(replay(3), 5))  # fmt: skip


def test_rng_state_round_trip():
    replay = make_replay()
    replay.add_episode(make_episode(40))
    state = json.loads(json.dumps(replay.get_rng_state()))
    first = take(replay, 1)
    replay.set_rng_state(state)
    np.testing.assert_array_equal(take(replay, 1), first)


def test_dataset_prefetches_and_closes():
    replay = make_replay(prefetch=2)
    replay.add_episode(make_episode(20))
    batches = replay.dataset()
    for _ in range(5):
        assert next(batches)["image"].shape == (4, 5, 8, 8, 1)
    assert any(t.name.startswith("replay-prefetch") for t in threading.enumerate())
    replay.close()
    assert not any(t.name.startswith("replay-prefetch") for t in threading.enumerate())
    assert list(batches) == []  # the iterator ends after close()


def test_dataset_without_data_raises():
    replay = make_replay()
    with pytest.raises(RuntimeError, match="no episode"):
        next(replay.dataset())
    replay.close()


def test_dataset_is_deterministic_whatever_the_thread_timing():
    """Draws happen at next() in the caller's thread: interleaved adds give the same batches
    however slow or fast the worker is."""

    def run(pause):
        replay = make_replay(prefetch=2, seed=3)
        replay.add_episode(make_episode(20))
        batches, out = replay.dataset(), []
        for j in range(6):
            time.sleep(pause)
            out.append(next(batches)["reward"])
            replay.add_episode(make_episode(10 + j, offset=1000 * (j + 1)))
        replay.close()
        return out

    for a, b in zip(run(0.0), run(0.02), strict=True):
        np.testing.assert_array_equal(a, b)
    # And later batches do see the episodes added meanwhile.
    assert any((batch >= 1000).any() for batch in run(0.0))


def three_episode_replay(prefetch: int):
    """A seeded replay of three episodes (9, 14, 25 steps) whose rewards tell them apart."""
    replay = make_replay(prefetch=prefetch, seed=7)
    for j, n in enumerate([9, 14, 25]):
        replay.add_episode(make_episode(n, offset=1000 * j))
    return replay


def test_upcoming_is_the_next_batch_and_leaves_it_unreturned():
    """`upcoming()` is the very batch the iterator returns next; it does not count as
    returned, so a checkpoint's state and close() still redraw it."""
    replay = three_episode_replay(prefetch=2)
    batches = replay.dataset()
    with pytest.raises(RuntimeError, match="before the dataset"):
        replay.upcoming()
    next(batches)
    state = replay.get_rng_state()
    upcoming = replay.upcoming()
    assert replay.get_rng_state() == state
    assert next(batches) is upcoming
    upcoming = replay.upcoming()
    replay.close()  # rewinds to before `upcoming`'s draw
    np.testing.assert_array_equal(take(replay, 1)[0], upcoming["reward"])


def test_dataset_resume_redraws_unconsumed_batches():
    fresh = lambda: three_episode_replay(prefetch=3)
    expected = take(fresh(), 4)
    replay = fresh()
    batches = replay.dataset()
    for want in expected[:2]:
        np.testing.assert_array_equal(next(batches)["reward"], want)
    state = json.loads(json.dumps(replay.get_rng_state()))
    replay.close()
    resumed = fresh()
    resumed.set_rng_state(state)
    np.testing.assert_array_equal(take(resumed, 1)[0], expected[2])
    np.testing.assert_array_equal(take(replay, 1)[0], expected[2])  # close() rewound


def test_report_samples_leave_the_dataset_stream_alone():
    """A report's sample() mid-training changes neither the training batches nor the saved
    state: the run that sampled, its resume and a run that never sampled agree."""

    fresh = lambda: three_episode_replay(prefetch=2)
    expected = take(fresh(), 7)
    replay = fresh()
    batches = replay.dataset()
    for want in expected[:3]:
        np.testing.assert_array_equal(next(batches)["reward"], want)
    report = replay.sample(np.random.default_rng(1))["reward"]
    state = json.loads(json.dumps(replay.get_rng_state()))
    continued = [next(batches)["reward"] for _ in range(4)]
    replay.close()
    resumed = fresh()
    resumed.set_rng_state(state)
    # prefetch=2: batches 4 and 5 were drawn before the report, 6 and 7 after it.
    for want, got, again in zip(expected[3:], continued, take(resumed, 4), strict=True):
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(again, want)
    np.testing.assert_array_equal(report, fresh().sample(np.random.default_rng(1))["reward"])


def test_unwritable_directory_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ReplayDirectoryError, match="replay directory .*file/replay"):
        make_replay(blocker / "replay")
    assert issubclass(ReplayDirectoryError, OSError)


# ----------------------------------------------------------- sampling ongoing episodes


def feed(replay: Replay, episodes: list[dict[str, np.ndarray]], start: int, stop: int) -> None:
    """Adds steps `start … stop − 1` of one episode per env (env i plays `episodes[i]`)."""
    for t in range(start, stop):
        replay.add({key: np.stack([ep[key][t] for ep in episodes]) for key in episodes[0]})


def test_ongoing_episodes_are_sampled_only_when_asked_and_long_enough():
    for ongoing in (False, True):
        replay = make_replay(minlen=8, length=5, batch=64, ongoing=ongoing)
        in_progress = make_episode(100, offset=1000)
        feed(replay, [in_progress], 0, 7)
        assert not replay.ready  # 7 steps < max(minlen, length)
        feed(replay, [in_progress], 7, 8)
        assert replay.ready == ongoing
        replay.add_episode(make_episode(30))
        rewards = replay.sample(np.random.default_rng(0))["reward"]
        from_ongoing = rewards[:, 0] >= 1000
        assert from_ongoing.any() == ongoing
        # An ongoing chunk holds only steps already added: starts 0 … 8 − 5.
        assert np.all(rewards[from_ongoing, 0] <= 1000 + 3)
        np.testing.assert_array_equal(rewards, rewards[:, :1] + np.arange(5))


@pytest.mark.parametrize("steps, weight", [(50, 0.25), (100, 0.5), (400, 1.0)])
def test_ongoing_episode_weight_is_its_share_of_the_mean_stored_length(steps, weight):
    replay = make_replay(minlen=10, length=10, batch=1000, ongoing=True, prioritize_ends=True)
    replay.add_episode(make_episode(100))
    replay.add_episode(make_episode(300, offset=10_000))  # mean stored length 200
    feed(replay, [make_episode(500, offset=100_000), make_episode(500, offset=200_000)], 0, steps)
    rng = np.random.default_rng(0)
    first = np.concatenate([replay.sample(rng)["reward"][:, 0] for _ in range(20)])
    share = np.mean(first >= 100_000)
    want = 2 * weight / (2 + 2 * weight)  # two ongoing of weight w, two stored of weight 1
    assert abs(share - want) < 5 * np.sqrt(want * (1 - want) / len(first)), share
    # Starts are uniform over the steps so far, with no end bonus: the last start is as
    # likely as any other (prioritize_ends makes a finished episode's last one 11× as likely).
    starts = (first[first >= 200_000] - 200_000).astype(int)
    freq = np.bincount(starts) / len(starts)
    assert len(freq) == steps - 9
    assert freq[-1] < 3 / (steps - 9)


def test_a_drawn_ongoing_chunk_survives_its_episode_ending():
    """The prefetch thread copies a chunk after the draw: the env may finish that episode and
    start the next one in between."""
    replay = make_replay(minlen=5, length=5, batch=8, ongoing=True, prefetch=3)
    first, second = make_episode(12, offset=1000), make_episode(40, offset=2000)
    second["is_first"][0] = True
    feed(replay, [first], 0, 6)
    batches = replay.dataset()
    drawn = next(batches)  # draws 4 batches, all from the 6 steps of the ongoing episode
    feed(replay, [first], 6, 12)
    feed(replay, [second], 0, 40)
    for batch in [drawn, *(next(batches) for _ in range(3))]:
        rewards = batch["reward"]
        assert np.all((rewards[:, 0] >= 1000) & (rewards[:, 0] <= 1001)), rewards[:, 0]
        np.testing.assert_array_equal(rewards, rewards[:, :1] + np.arange(5))
    replay.close()


def test_set_aside_moves_the_files_from_an_index_on_and_never_overwrites(tmp_path):
    directory, aside = tmp_path / "replay", tmp_path / "after" / "400"
    directory.mkdir()
    names = [f"{i:08d}-{10 + i}.npz" for i in range(5)] + [".00000005-9.npz.tmp", "notes.txt"]
    for name in names:
        (directory / name).write_bytes(name.encode())
    # The unfinished save of index 5 goes too: kept, it would move the next index on to 6.
    assert set_aside_after(directory, 3, aside) == (3, aside)
    assert sorted(p.name for p in aside.iterdir()) == sorted(names[3:6])
    assert (aside / names[4]).read_bytes() == names[4].encode()
    assert sorted(p.name for p in directory.iterdir()) == sorted([*names[:3], "notes.txt"])
    (directory / names[3]).write_bytes(b"collected again")  # the same index, a second kill
    assert set_aside_after(directory, 3, aside) == (1, aside.with_name("400.1"))
    assert (aside.with_name("400.1") / names[3]).read_bytes() == b"collected again"
    assert (aside / names[3]).read_bytes() == names[3].encode()
    assert set_aside_after(directory, 3, aside) == (0, None)  # nothing left: no folder
    assert set_aside_after(tmp_path / "none", 0, aside) == (0, None)
    assert sorted(p.name for p in aside.parent.iterdir()) == ["400", "400.1"]
