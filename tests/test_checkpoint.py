"""Checkpoint round trip, corrupt-checkpoint fallback and exact learner resume."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
from helpers import structured_batch, tiny_config, vector_agent

from dreamer_jax.checkpoint import Checkpointer, CheckpointError, saved_loop_state

TESTS = pathlib.Path(__file__).resolve().parent


def _host(state):
    return jax.device_get(state.replace(key=jax.random.key_data(state.key)))


def _batch(agent, index):
    return structured_batch(agent.config.dataset.batch, agent.config.dataset.length, seed=index)


def test_full_state_round_trip(tmp_path):
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    state, _ = agent.train_step(state, _batch(agent, 0))
    loop = {"step": 10, "replay_rng": {"state": {"state": 2**100, "inc": 3}}, "keys": [1, 2]}
    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
    checkpointer.save(10, state, loop)
    step, restored, restored_loop = checkpointer.restore_latest(agent.init(jax.random.key(9)))
    assert step == 10 and restored_loop == loop
    chex.assert_trees_all_equal(_host(restored), _host(state))
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)


def _save_steps(directory, agent, steps, keep=3):
    """Checkpoints of `agent.init(key 0)` whose `updates` counter equals the step."""
    state = agent.init(jax.random.key(0))
    checkpointer = Checkpointer(directory, keep=keep)
    for step in steps:
        checkpointer.save(step, state.replace(updates=state.updates + step), {"step": step})
    return state, checkpointer


def _damage_data(checkpoint):
    """Truncates every array data file of a checkpoint (its metadata stays readable)."""
    damaged = [p for p in (checkpoint / "state").rglob("d/*") if p.is_file()]
    for path in damaged:
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert damaged


def _damage_metadata(checkpoint):
    (checkpoint / "state" / "_METADATA").unlink()


def _flip_a_bit(checkpoint):
    """One flipped bit in the largest array data file: it still decodes, to other numbers."""
    data = max((p for p in (checkpoint / "state").rglob("d/*") if p.is_file()), key=os.path.getsize)
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0x40
    data.write_bytes(bytes(content))


def _edit_the_loop_state(checkpoint):
    """Valid JSON that is not what was saved: another run's counters."""
    (checkpoint / "loop" / "metadata").write_text('{"step": 7}')


def _edit_a_loop_value(checkpoint):
    """The loop state as saved but for one counter: the same keys, another value."""
    path = checkpoint / "loop" / "metadata"
    loop = json.loads(path.read_text())
    path.write_text(json.dumps({**loop, "updates": loop["updates"] + 1}))


def _edit_the_checksums(checkpoint):
    """Valid JSON, but not checksums: the check must not fail with a Python error."""
    (checkpoint / "checksums" / "metadata").write_text("[]")


def _delete_the_checksums(checkpoint):
    """Taken for a checkpoint from before checksums, it would restore unchecked."""
    shutil.rmtree(checkpoint / "checksums")


def test_keeps_last_k(tmp_path):
    _, checkpointer = _save_steps(tmp_path / "ckpt", vector_agent(), (1, 2, 3), keep=2)
    assert checkpointer.steps() == [2, 3]


@pytest.mark.parametrize(
    "damage",
    [
        _damage_data,
        _damage_metadata,
        _flip_a_bit,
        _edit_the_loop_state,
        _edit_the_checksums,
        _delete_the_checksums,
    ],
)
def test_unreadable_latest_is_moved_aside_and_its_step_can_be_saved_again(tmp_path, damage):
    agent = vector_agent()
    state, _ = _save_steps(tmp_path / "ckpt", agent, (1, 2))
    damage(tmp_path / "ckpt" / "2")
    files = sorted(
        p.relative_to(tmp_path / "ckpt" / "2") for p in (tmp_path / "ckpt" / "2").rglob("*")
    )

    checkpointer = Checkpointer(tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="unreadable") as record:
        step, restored, loop = checkpointer.restore_latest(state)
    assert step == 1 and loop == {"step": 1} and int(restored.updates) == 1
    aside = tmp_path / "ckpt_unreadable" / "2"
    message = str(record[0].message)
    assert str(tmp_path / "ckpt" / "2") in message and str(aside) in message
    assert "\n" not in message
    named = {
        _flip_a_bit: "differs from the checksum saved with it",
        _edit_the_loop_state: "the loop state differs from the checksum saved with it",
        _edit_the_checksums: "its saved checksums are damaged",
        _delete_the_checksums: "its saved checksums are missing",
    }
    assert named.get(damage, "") in message
    # Kept, whole, outside orbax's directory.
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == files
    assert checkpointer.steps() == [1]

    checkpointer.save(2, state.replace(updates=state.updates + 20), {"step": 2})
    step, restored, _ = Checkpointer(tmp_path / "ckpt").restore_latest(state)
    assert step == 2 and int(restored.updates) == 20


@pytest.mark.parametrize(
    "damage",
    [None, _edit_the_loop_state, _edit_a_loop_value, _edit_the_checksums, _delete_the_checksums],
)
def test_saved_loop_state_reads_a_saved_loop_only_as_saved(tmp_path, damage):
    """What dreamer-sweep reads of a checkpoint without orbax: the loop state as saved (an
    edited one, even in a value alone, or one whose checksums are damaged or gone, is
    None)."""
    loop = {"step": 2, "updates": 5, "seeds": [{"act_key": [1, 2], "random_rng": 2**100}]}
    state = vector_agent().init(jax.random.key(0))
    Checkpointer(tmp_path / "ckpt").save(2, state, loop)
    if damage is not None:
        damage(tmp_path / "ckpt" / "2")
    assert saved_loop_state(tmp_path / "ckpt" / "2") == (loop if damage is None else None)


def test_saving_an_existing_step_replaces_it_and_a_failed_save_puts_it_back(tmp_path, monkeypatch):
    """A resumed run saves its restored step again once the work it owed is done."""
    state, checkpointer = _save_steps(tmp_path / "ckpt", vector_agent(), (1, 2))
    checkpointer.save(2, state.replace(updates=state.updates + 20), {"step": 20})
    step, restored, loop = Checkpointer(tmp_path / "ckpt").restore_latest(state)
    assert (step, int(restored.updates), loop) == (2, 20, {"step": 20})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer._manager, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        checkpointer.save(2, state, {"step": 30})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]
    assert Checkpointer(tmp_path / "ckpt").restore_latest(state)[2] == {"step": 20}
    # A crash during the replacing save: the replaced one comes back when next read.
    os.replace(tmp_path / "ckpt" / "2", tmp_path / "ckpt" / "2.replaced")
    assert Checkpointer(tmp_path / "ckpt").restore_latest(state)[2] == {"step": 20}
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]


def test_a_loop_state_without_the_runs_keys_or_a_file_for_a_step_is_set_aside(tmp_path):
    agent = vector_agent()
    state = agent.init(jax.random.key(0))
    checkpointer = Checkpointer(tmp_path / "ckpt")
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"step": step, "updates": step})
    # A checkpoint from before checksums were saved, whose loop state lacks a key.
    (tmp_path / "ckpt" / "3" / "loop" / "metadata").write_text('{"step": 3}')
    shutil.rmtree(tmp_path / "ckpt" / "3" / "checksums")
    shutil.rmtree(tmp_path / "ckpt" / "2")
    (tmp_path / "ckpt" / "2").write_text("not a checkpoint")
    with pytest.warns(UserWarning) as record:
        restored = Checkpointer(tmp_path / "ckpt").restore_latest(state, ["step", "updates"])
    assert restored[0] == 1 and restored[2] == {"step": 1, "updates": 1}
    messages = sorted(str(w.message) for w in record)
    assert "ckpt/2 is unreadable (a file, not a directory)" in messages[0]
    assert "ckpt/3 is unreadable (its loop state lacks updates)" in messages[1]
    aside = tmp_path / "ckpt_unreadable"
    assert (aside / "2").read_text() == "not a checkpoint" and (aside / "3" / "loop").is_dir()


def test_damaged_metadata_is_named_by_its_error_or_ignored_where_harmless(tmp_path, capfd):
    state, _ = _save_steps(tmp_path / "ckpt", vector_agent(), (1, 2, 3))
    (tmp_path / "ckpt" / "3" / "loop" / "metadata").write_text("garbage{")
    # orbax's own record of a save; restores do not need it, and orbax logs its errors.
    (tmp_path / "ckpt" / "2" / "_CHECKPOINT_METADATA").write_text("garbage{")
    with pytest.warns(UserWarning) as record:
        assert Checkpointer(tmp_path / "ckpt").restore_latest(state)[0] == 2
    # The JSON error itself, not the StopIteration that json's parser hides ("from None").
    assert len(record) == 1 and "unreadable (Expecting value: line 1" in str(record[0].message)
    assert capfd.readouterr().err == ""


def test_a_second_unreadable_copy_of_a_step_gets_a_suffix(tmp_path):
    agent = vector_agent()
    state, checkpointer = _save_steps(tmp_path / "ckpt", agent, (1, 2))
    for _ in range(2):
        _damage_metadata(tmp_path / "ckpt" / "2")
        with pytest.warns(UserWarning, match="unreadable"):
            assert checkpointer.restore_latest(state)[0] == 1
        checkpointer.save(2, state, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "ckpt_unreadable").iterdir()) == ["2", "2-1"]


def test_read_only_skips_an_unreadable_checkpoint_but_moves_nothing(tmp_path):
    agent = vector_agent()
    state, _ = _save_steps(tmp_path / "ckpt", agent, (1, 2))
    _damage_data(tmp_path / "ckpt" / "2")
    with pytest.warns(UserWarning, match="unreadable"):
        step, _, _ = Checkpointer(tmp_path / "ckpt", read_only=True).restore_latest(state)
    assert step == 1
    assert (tmp_path / "ckpt" / "2" / "state" / "_METADATA").exists()
    assert not (tmp_path / "ckpt_unreadable").exists()


def test_running_out_of_memory_while_restoring_moves_nothing(tmp_path, monkeypatch):
    """A failed allocation (a resume on a smaller accelerator) is the machine's, not the
    checkpoint's: one CheckpointError, and every checkpoint stays where it is."""
    state, checkpointer = _save_steps(tmp_path / "ckpt", vector_agent(), (1, 2))

    def no_memory(*args, **kwargs):
        raise RuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3221225472 bytes."
        )

    monkeypatch.setattr(checkpointer._manager, "restore", no_memory)
    with pytest.raises(
        CheckpointError, match=r"out of memory restoring checkpoint .*2 \(an allocation of 3.00GiB"
    ):
        checkpointer.restore_latest(state)
    assert checkpointer.steps() == [1, 2] and not (tmp_path / "ckpt_unreadable").exists()


def test_other_network_sizes_are_one_line_and_move_nothing(tmp_path, capfd):
    state, _ = _save_steps(tmp_path / "ckpt", vector_agent(), (1,))
    wider = vector_agent(tiny_config(**{"rssm.deter": 64})).init(jax.random.key(0))
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path / "ckpt").restore_latest(wider)
    message = str(info.value)
    # The first decoder layer reads the features: stoch 4 x discrete 4 + deter (32, now 64).
    assert "checkpoint 1" in message and "other network sizes" in message
    assert (
        "wm_params/params/decoder/MLP_0/Dense_0/kernel: saved (48, 32) vs now (80, 32)" in message
    )
    assert "\n" not in message
    assert "Traceback" not in capfd.readouterr().err
    assert (tmp_path / "ckpt" / "1").is_dir() and not (tmp_path / "ckpt_unreadable").exists()
    step, _, _ = Checkpointer(tmp_path / "ckpt").restore_latest(state)  # still good
    assert step == 1


def test_a_missing_network_part_is_named(tmp_path):
    _save_steps(tmp_path / "ckpt", vector_agent(), (1,))
    config = tiny_config(pred_discount=False)
    with pytest.raises(
        CheckpointError, match=r"discount_head/.*: saved \(\d+, ?\d*\) vs now absent"
    ):
        Checkpointer(tmp_path / "ckpt").restore_latest(vector_agent(config).init(jax.random.key(0)))


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, jax, numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import structured_batch, tiny_config, vector_agent
    from dreamer_jax.checkpoint import Checkpointer
    agent = vector_agent()
    c = agent.config
    ckpt = Checkpointer({ckpt!r})
    state = agent.init(jax.random.key(0))
    start = 0
    if ckpt.steps():
        start, state, _ = ckpt.restore_latest(state)
    for i in range(start, start + {n}):
        state, _ = agent.train_step(
            state, structured_batch(c.dataset.batch, c.dataset.length, seed=i)
        )
    ckpt.save(start + {n}, state, {{}})
    leaves = jax.tree.leaves(jax.device_get(state.replace(key=jax.random.key_data(state.key))))
    np.savez({out!r}, *leaves)
    """
)


@pytest.mark.slow
def test_interrupted_and_resumed_learner_is_bit_identical(tmp_path):
    """N updates, checkpoint, restore in a fresh process, N more == 2N uninterrupted."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def run(ckpt, n, out):
        script = RESUME_SCRIPT.format(tests=str(TESTS), ckpt=str(ckpt), n=n, out=str(out))
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        with np.load(out) as data:
            return [data[k] for k in sorted(data.files, key=lambda k: int(k.split("_")[1]))]

    run(tmp_path / "split", 3, tmp_path / "first.npz")
    resumed = run(tmp_path / "split", 3, tmp_path / "resumed.npz")
    straight = run(tmp_path / "straight", 6, tmp_path / "straight.npz")
    assert len(resumed) == len(straight)
    for a, b in zip(resumed, straight, strict=True):
        np.testing.assert_array_equal(a, b)


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys, jax
    sys.path.insert(0, {tests!r})
    from helpers import vector_agent
    from dreamer_jax.checkpoint import Checkpointer, CheckpointError, saved_loop_state
    state = vector_agent().init(jax.random.key(0))
    checkpointer, fresh = Checkpointer({ckpt!r}), Checkpointer({ckpt!r} + "_new")
    checkpointer.save(1, state, {{"step": 1}})
    # A file-size limit fails orbax's writes as a full disk does (EFBIG instead of ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        checkpointer.save(2, state, {{"step": 2}})
    except CheckpointError as error:
        print(error)
    try:
        fresh.save(0, state, {{"step": 0}})
    except CheckpointError as error:
        print(error)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    checkpointer.save(3, state, {{"step": 3}})
    """
)


def test_a_failed_save_is_one_line_and_the_next_save_works(tmp_path):
    script = FULL_DISK_SCRIPT.format(tests=str(TESTS), ckpt=str(tmp_path / "ckpt"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [
        f"could not save checkpoint 2 in {tmp_path / 'ckpt'}: File too large "
        "(the previous checkpoints are intact)",
        f"could not save checkpoint 0 in {tmp_path / 'ckpt_new'}: File too large "
        "(there is no earlier one)",
    ]
    # Without orbax's per-thread tracebacks (absl ERROR logs, asyncio "never retrieved").
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr[:2000]
    # The partial save of step 2 is gone; 1 and 3 restore.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "3"]
    template = vector_agent().init(jax.random.key(1))
    assert Checkpointer(tmp_path / "ckpt").restore_latest(template)[0] == 3


def test_a_directory_that_refuses_writes_is_found_when_opened(tmp_path):
    """Not at the first save after a stretch of training; a reader (evaluation) never writes."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        from dreamer_jax.checkpoint import Checkpointer, CheckpointError, saved_loop_state
        Checkpointer({str(tmp_path / "ro")!r}, read_only=True)  # nothing written: no error
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))
        try:
            Checkpointer({str(tmp_path / "ckpt")!r})
        except CheckpointError as error:
            print(error)
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        result.stdout
        == f"checkpoint directory {tmp_path / 'ckpt'} is not writable: File too large\n"
    )
    assert not (tmp_path / "ro").exists() and os.listdir(tmp_path / "ckpt") == []
