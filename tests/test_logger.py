import fcntl
import logging
import math
import os
import pathlib
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import types

import numpy as np
import pytest
from helpers import wandb_history
from PIL import Image
from tensorboardX.proto import event_pb2

from dreamer_jax import logger as logger_module
from dreamer_jax.logger import LogdirError, Logger, read_metrics, seeds_line

TESTS = pathlib.Path(__file__).resolve().parent


def _logger(logdir, **kwargs):
    kwargs = {"wandb_mode": "disabled", "progress": False, **kwargs}
    return Logger(logdir, {"seed": 0}, **kwargs)


def _tb_events(logdir):
    """{tag: [(step, summary value)]} from every TFRecord event file in `logdir`.

    A record is an 8-byte length, a 4-byte length crc, the data and a 4-byte data crc."""
    found = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def _frames(t, h, w, c):
    """Frames whose consecutive values differ (Pillow merges identical neighbours)."""
    return (np.arange(t * h * w * c).reshape(t, h, w, c) * 7 % 256).astype(np.uint8)


def test_write_appends_one_line_per_call_and_clears_the_buffer(tmp_path):
    logger = _logger(tmp_path, action_repeat=4)
    logger.scalars({"model_loss": 1.5, "train_return": 2})
    first = logger.write(10)
    logger.scalar("model_loss", 0.5)
    logger.write(20)
    logger.scalars({"nan_value": math.nan, "inf_value": math.inf})
    logger.write(30)
    logger.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert "NaN" not in lines[2] and "Infinity" not in lines[2]  # strict JSON: null
    assert first == {"step": 10, "frames": 40, "model_loss": 1.5, "train_return": 2.0}
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        first,
        {"step": 20, "frames": 80, "model_loss": 0.5},
        {"step": 30, "frames": 120, "nan_value": None, "inf_value": None},
    ]


def test_step_and_frames_are_reserved_scalar_names(tmp_path):
    logger = _logger(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        logger.scalar("frames", 1.0)
    logger.close()


def test_tensorboard_event_file_holds_the_finite_scalars(tmp_path, caplog):
    logger = _logger(tmp_path)
    logger.scalars({"model_loss": 0.25, "actor_entropy": 3.0})
    logger.write(5)
    logger.scalars({"model_loss": 0.125, "actor_entropy": math.nan})
    with caplog.at_level(logging.WARNING):
        logger.write(9)  # tensorboardX would warn of each non-finite value, every row
    logger.close()

    events = _tb_events(tmp_path)
    assert [(step, v.simple_value) for step, v in events["model_loss"]] == [(5, 0.25), (9, 0.125)]
    assert [(step, v.simple_value) for step, v in events["actor_entropy"]] == [(5, 3.0)]
    assert caplog.records == []


@pytest.mark.parametrize("channels", [1, 3])
def test_video_writes_a_gif_and_a_tensorboard_entry(tmp_path, channels):
    logger = _logger(tmp_path)
    logger.write(7)
    logger.video("openl", _frames(6, 8, 10, channels))
    logger.video("eval/policy", _frames(3, 8, 10, channels), step=9)
    logger.close()

    with Image.open(tmp_path / "openl_7.gif") as gif:
        assert (gif.n_frames, gif.size) == (6, (10, 8))
    with Image.open(tmp_path / "eval_policy_9.gif") as gif:
        assert gif.n_frames == 3
    assert not list(tmp_path.glob(".*.tmp"))
    events = _tb_events(tmp_path)
    assert [step for step, _ in events["openl"]] == [7]
    assert events["openl"][0][1].image.height == 8
    assert [step for step, _ in events["eval/policy"]] == [9]


def test_video_rejects_non_uint8_frames(tmp_path):
    logger = _logger(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        logger.video("openl", np.zeros((2, 8, 8, 3), np.float32))
    logger.close()


def test_resume_step_drops_later_lines(tmp_path):
    logger = _logger(tmp_path)
    for step in range(1, 6):
        logger.scalar("loss", step)
        logger.write(step)
    logger.close()

    logged = (tmp_path / "metrics.jsonl").read_bytes()
    logger = _logger(tmp_path, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    logger.scalar("loss", 40.0)
    logger.write(4)
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert not list(tmp_path.glob(".*.tmp"))
    # What the interrupted run logged is kept aside, whole; a second rollback to the same
    # step keeps its own copy.
    aside = tmp_path / "metrics_after_checkpoint"
    assert (aside / "3.jsonl").read_bytes() == logged
    _logger(tmp_path, resume_step=3).close()
    assert sorted(p.name for p in aside.iterdir()) == ["3.1.jsonl", "3.jsonl"]
    assert [r["step"] for r in read_metrics(aside / "3.1.jsonl")] == [1, 2, 3, 4]


def test_a_resume_purges_the_tensorboard_steps_after_the_checkpoint_only(tmp_path):
    """A resume at step 3 writes TensorBoard's START event at step 4: TensorBoard then drops
    the earlier events of steps 4 and up (the interrupted run's 4 and 5) and keeps the
    checkpoint's row of step 3, which the resumed run does not write again."""
    logger = _logger(tmp_path)
    for step in range(1, 6):
        logger.scalar("loss", step)
        logger.write(step)
    logger.close()
    _logger(tmp_path, resume_step=3).close()
    starts = []
    for path in tmp_path.glob("events.out.tfevents.*"):  # read as in _tb_events
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == event.session_log.START:
                starts.append(event.step)
    assert starts == [4]  # the fresh run's file has none


def test_nonfinite_literals_read_as_none(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": NaN, "b": Infinity, "c": -Infinity, "d": 2.5, "e": null}\n')
    assert read_metrics(path) == [{"step": 1, "a": None, "b": None, "c": None, "d": 2.5, "e": None}]


def test_existing_metrics_are_appended_without_resume_step(tmp_path):
    _logger(tmp_path).write(1)
    logger = _logger(tmp_path)
    logger.write(2)
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_malformed_last_line_is_dropped_with_a_warning(tmp_path):
    logger = _logger(tmp_path)
    logger.write(1)
    logger.write(2)
    logger.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as file:
        file.write('{"step": 3, "model_lo')  # a crash mid-write

    with pytest.warns(UserWarning, match="metrics.jsonl:3: dropping malformed last line"):
        logger = _logger(tmp_path)
    logger.write(3)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_malformed_middle_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n[4]\n{"step": 5}\n')
    with pytest.warns(UserWarning) as record:
        assert read_metrics(path) == [{"step": 1}, {"step": 3}, {"step": 5}]
    messages = [str(warning.message) for warning in record]
    assert [m.split(": dropping")[0] for m in messages] == [f"{path}:2", f"{path}:4"]


def test_resume_over_a_damaged_metrics_file_drops_the_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"st\xff\x00ep": \n{"step": 2}\n{"step": 3}\n')
    damaged = path.read_bytes()
    with pytest.warns(UserWarning, match="metrics.jsonl:2: dropping malformed line"):
        logger = _logger(tmp_path, resume_step=2)
    logger.write(3)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert (tmp_path / "metrics_after_checkpoint" / "2.jsonl").read_bytes() == damaged


def test_unwritable_logdir_raises_one_line_before_writing(tmp_path):
    parent = tmp_path / "a_file"
    parent.write_text("")  # root ignores permissions, but not a file used as a directory
    with pytest.raises(LogdirError) as info:
        _logger(parent / "logs")
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "\n" not in message and str(parent / "logs") in message
    assert parent.read_text() == ""


def test_non_tty_prints_one_compact_line_per_write(tmp_path, capsys, monkeypatch):
    clock = iter([100.0, 102.0, 104.0, 200.0])  # the logger module's clock alone
    monkeypatch.setattr(logger_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    # progress=None under capsys: stderr is not a TTY, so no bar.
    logger = _logger(tmp_path, progress=None, action_repeat=4, total_steps=100)
    logger.progress(12, {"train_return": 12.0})
    logger.scalars({"model_loss": 1.234, "fps": 2.2, "train_return": 12})
    logger.write(12)  # the first row: its interval holds the compile, so no time left
    logger.write(13)  # 4 frames in 2 s since the first row: 87 x 4 frames at 2/s
    logger.write(15)  # 12 frames in 4 s: 85 x 4 frames at 3/s
    logger.message("seeds 0 1: train_return 12 3")
    logger.close()
    unknown_total = _logger(tmp_path / "b", progress=False, action_repeat=4)
    unknown_total.scalars({"fps": 2.2})
    unknown_total.write(12)
    unknown_total.close()

    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "[step 12/100 (12%) | frames 48] train_return 12 fps 2.2 model_loss 1.234",
        "[step 13/100 (13%) | frames 52 | 0:02:54 left]",
        "[step 15/100 (15%) | frames 60 | 0:01:53 left]",
        "seeds 0 1: train_return 12 3",
        "[step 12 | frames 48] fps 2.2",
    ]
    assert captured.err == ""


def test_time_left_of_a_huge_run_is_in_days():
    # 1e15 steps x 4 frames at 2000 frames/s: 2e12 s, past timedelta's 1e9 days.
    assert logger_module._header(0, 10**15, 4, 2000.0) == (
        "[step 0/1000000000000000 (0%) | frames 0 | 23,148,148 days left]"
    )
    assert logger_module._header(0, 2000 * 86400 * 99, 1, 2000.0).endswith("99 days, 0:00:00 left]")
    assert logger_module._header(0, 2000 * 86400 * 100, 1, 2000.0).endswith("| 100 days left]")


def test_seeds_line_lists_each_seeds_returns_in_order():
    records = [
        {"step": 5, "train_return": 12.5, "eval_return": 10.0, "fps": 3.0},
        {"step": 5, "train_return": None},
        {"step": 5, "train_return": 30.0, "eval_return": 8.25},
    ]
    line = seeds_line([4, 5, 6], records)
    assert line == "seeds 4 5 6: train_return 12.5 - 30 | eval_return 10 - 8.25"
    assert seeds_line([4, 5], [{"step": 5, "train_return": 1.0}, {"step": 5}]) == (
        "seeds 4 5: train_return 1 -"
    )
    assert seeds_line([4, 5], [{"step": 5, "fps": 1.0}, {"step": 5}]) is None


def test_messages_go_above_the_bar_and_nowhere_when_quiet(tmp_path, capsys):
    quiet = _logger(tmp_path / "quiet", quiet=True)
    quiet.message("hidden")
    quiet.close()
    assert capsys.readouterr().out == ""
    with_bar = _logger(tmp_path / "bar", progress=True, total_steps=10)
    with_bar.progress(2, {})
    with_bar.message("shown")
    with_bar.close()
    assert "shown" in capsys.readouterr().out  # tqdm.write prints to stdout


def test_progress_bar_counts_frames_and_shows_info(tmp_path, capsys):
    logger = _logger(tmp_path, progress=True, action_repeat=4, total_steps=100)
    logger.progress(10, {"train_return": 3.0})
    logger.progress(20, {"updates_per_s": 5.0})
    logger.write(20)
    logger.close()

    captured = capsys.readouterr()
    assert captured.out == ""
    assert "80.0/400" in captured.err
    assert "train_return=3" in captured.err and "updates_per_s=5" in captured.err


def test_a_warning_gets_a_line_of_its_own_above_the_bar(tmp_path, capsys):
    logger = _logger(tmp_path, progress=True, total_steps=10)
    logger.progress(2, {})
    logger.warning("warning: seed 1 diverged")
    logger.close()
    without = _logger(tmp_path / "plain", progress=False)
    without.warning("warning: seed 2 diverged")
    without.close()
    captured = capsys.readouterr()
    segments = re.split(r"[\r\n]", captured.err)
    assert "warning: seed 1 diverged" in segments  # not glued to the bar's text
    assert captured.err.endswith("warning: seed 2 diverged\n") and captured.out == ""


def test_the_bar_needs_a_terminal_with_columns(tmp_path):
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w") as terminal:
            sizes = [(24, 0, False), (24, 39, False), (24, 40, True), (24, 120, True),
                     (0, 120, False)]  # fmt: skip
            for rows, columns, wide in sizes:
                size = struct.pack("HHHH", rows, columns, 0, 0)
                fcntl.ioctl(follower, termios.TIOCSWINSZ, size)
                assert logger_module._wide_terminal(terminal) is wide
    finally:
        os.close(leader)
    with open(tmp_path / "log", "w") as file:  # e.g. stderr redirected under nohup
        assert logger_module._wide_terminal(file) is False


def test_wandb_offline_run_lives_in_the_logdir_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for step in (1, 2):
        logger = _logger(tmp_path, wandb_mode="offline", run_name="test")
        logger.scalar("model_loss", 1.0)
        logger.write(step)
        logger.video("openl", _frames(2, 4, 4, 3))
        logger.close()

    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # wandb adds "-1" to a folder name taken by an earlier start in the same second.
    assert runs and all(re.search(rf"-{run_id}(-\d+)?$", run.name) for run in runs)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_wandb_run_is_named_grouped_and_tagged(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = _logger(
        tmp_path, wandb_mode="offline", run_name="atari_pong-3", wandb_group="atari55",
        wandb_tags=["paper", "bf16"], wandb_notes="a note",
    )  # fmt: skip
    try:
        run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
        run = logger._wandb
        assert run.name == f"atari_pong-3-{run_id}"
        assert run.group == "atari55" and set(run.tags) == {"paper", "bf16"}
        assert run.notes == "a note"
    finally:
        logger.close()


def test_each_logger_of_one_process_has_its_own_wandb_run(tmp_path, monkeypatch):
    # A many-seed run: one Logger per seed folder, all open at once in one process.
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = [
        _logger(tmp_path / f"seed_{seed}", wandb_mode="offline", run_name=f"t-{seed}")
        for seed in range(2)
    ]
    try:
        for seed, logger in enumerate(loggers):
            logger.scalar("model_loss", float(seed))
            logger.write(1)
        for seed, logger in enumerate(loggers):
            run_id = (tmp_path / f"seed_{seed}" / "wandb_run_id.txt").read_text().strip()
            assert logger._wandb.id == run_id and logger._wandb.name == f"t-{seed}-{run_id}"
    finally:
        for logger in loggers:
            logger.close()
    for seed in range(2):  # each seed's folder holds its own run and rows
        (run_file,) = (tmp_path / f"seed_{seed}" / "wandb").glob("offline-run-*/run-*.wandb")
        assert [(row["_step"], row["model_loss"]) for row in wandb_history(run_file)] == [(1, seed)]


@pytest.mark.parametrize("failing_call", ["commit", "write", "video"])
def test_a_wandb_that_fails_warns_and_logging_goes_on(tmp_path, failing_call):
    """Its service gone, at any call: the row still reaches metrics.jsonl and TensorBoard,
    and the checkpoint a commit comes before is still saved (review: a failure in `write`
    or `video` ended the run)."""
    logger = _logger(tmp_path)
    failing = types.SimpleNamespace(log=lambda *a, **k: (_ for _ in ()).throw(OSError(32, "gone")))
    logger._wandb, logger._wandb_row_open = failing, True
    with pytest.warns(UserWarning, match="wandb failed, continuing without it: .*gone"):
        if failing_call == "commit":
            logger.commit()
        elif failing_call == "write":
            logger.scalar("model_loss", 1.0)
            logger.write(1)
        else:
            logger.video("openl", np.zeros((2, 4, 4, 1), np.uint8), step=1)
    assert logger._wandb is None
    logger.scalar("model_loss", 2.0)
    logger.write(2)
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == ([1, 2] if failing_call == "write" else [2])


def test_commit_closes_an_open_wandb_row_once_and_nothing_else(tmp_path):
    """Every checkpoint commits, and two may come with no row between them (a periodic save,
    then the save at the end): only a row left open is committed; a commit with none open
    would add an empty row to wandb's history and move its step past the run's."""
    logger = _logger(tmp_path)
    calls = []
    logger._wandb = types.SimpleNamespace(log=lambda data, **kwargs: calls.append((data, kwargs)))
    logger.commit()  # nothing logged yet
    logger.scalar("model_loss", 1.0)
    logger.write(1)
    logger.commit()
    logger.commit()
    logger._wandb = None
    logger.close()
    assert calls == [({"model_loss": 1.0}, {"step": 1}), ({}, {"commit": True})]


KILLED_AFTER_COMMIT_SCRIPT = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    sys.path.insert(0, {tests!r})
    from helpers import wandb_history
    from dreamer_jax.logger import Logger
    logger = Logger({logdir!r}, {{}}, wandb_mode="offline", progress=False)
    for step, name in [(1, "model_loss"), (2, "model_loss"), (2, "eval_return")]:
        logger.scalar(name, float(step))
        logger.write(step)  # step 2: a log row, then an evaluation's row of its own
    logger.commit()  # as train does before a checkpoint: else step 2 stays open, and lost
    # Up to 10 s for wandb to write it: its default would take 15 s (WANDB_FLUSH_S: 1 s).
    run_file = next(pathlib.Path({logdir!r}).glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 10
    while len(wandb_history(run_file, finished=False)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_rows_committed_before_a_kill_are_in_the_wandb_file(tmp_path):
    script = KILLED_AFTER_COMMIT_SCRIPT.format(logdir=str(tmp_path), tests=str(TESTS))
    env = dict(os.environ, WANDB_SILENT="true")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [
        {k: v for k, v in row.items() if not k.startswith("_")}
        for row in wandb_history(run_file, finished=False)
    ]
    assert rows == [{"model_loss": 1.0}, {"model_loss": 2.0, "eval_return": 2.0}]


def test_long_video_makes_a_bounded_tensorboard_strip(tmp_path, monkeypatch):
    import dreamer_jax.logger as logger_module

    monkeypatch.setattr(logger_module.importlib.util, "find_spec", lambda name: None)
    logger = _logger(tmp_path)
    logger.video("eval_policy", _frames(500, 4, 6, 1), step=1)
    logger.close()
    ((_, value),) = _tb_events(tmp_path)["eval_policy"]
    assert value.image.width == logger_module.STRIP_FRAMES * 6 and value.image.height == 4


def test_failed_wandb_offline_init_warns_and_logging_continues(tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no wandb here\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="continuing without wandb") as record:
        logger = _logger(tmp_path, wandb_mode="offline")
    assert "\n" not in str(record[0].message)
    logger.scalar("model_loss", 1.0)
    logger.write(1)
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "frames": 1, "model_loss": 1.0}]


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from dreamer_jax.logger import Logger, LogdirError
    # A file-size limit fails writes as a full disk does (EFBIG instead of ENOSPC), while
    # an empty file can still be created.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        Logger({logdir!r}, {{}}, wandb_mode="disabled", progress=False)
    except LogdirError as error:
        print(error)
    """
)


def test_full_disk_is_one_line_before_anything_is_written(tmp_path):
    script = FULL_DISK_SCRIPT.format(logdir=str(tmp_path / "logs"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout == f"log directory {tmp_path / 'logs'} is not writable: File too large\n"
    assert os.listdir(tmp_path / "logs") == []  # not even the probe is left


WANDB_ONLINE_SCRIPT = textwrap.dedent(
    """
    import dreamer_jax.logger as logger
    logger.WANDB_INIT_TIMEOUT_S = 3.0
    try:
        logger.Logger({logdir!r}, {{}}, wandb_mode="online", progress=False)
    except logger.WandbError as error:
        print(error)
    """
)


def _wandb_online(tmp_path, **env):
    """Stdout and stderr of a Logger started in wandb online mode with only `env` as wandb
    credentials and server: HOME is `tmp_path`, so no netrc or wandb settings are found."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    clean.update(HOME=str(tmp_path), **env)
    script = WANDB_ONLINE_SCRIPT.format(logdir=str(tmp_path / "logs"))
    result = subprocess.run(
        [sys.executable, "-c", script], env=clean, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, result.stderr


def test_wandb_online_without_an_api_key_is_one_line(tmp_path):
    out, err = _wandb_online(tmp_path)
    assert out.count("\n") == 1 and "needs an API key" in out, (out, err)
    assert f"--wandb.mode offline, then `wandb sync {tmp_path / 'logs'}/wandb/offline-run-*`" in out
    assert "Traceback" not in err


def test_wandb_online_with_a_malformed_api_key_is_one_line(tmp_path):
    """wandb's own error for a key it refuses to read (train checks the key before writing
    anything, outside the logger's init): one line, not its traceback."""
    out, err = _wandb_online(tmp_path, WANDB_API_KEY="abc")
    assert out.count("\n") == 1 and "cannot check the API key (" in out, (out, err)
    assert "--wandb.mode offline" in out and "Traceback" not in err


def test_wandb_online_without_a_server_is_one_line(tmp_path):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    out, err = _wandb_online(
        tmp_path, WANDB_API_KEY="0123456789abcdef" * 3, WANDB_BASE_URL="http://127.0.0.1:9"
    )
    assert out.count("\n") == 1 and "wandb online init failed" in out, (out, err)
    assert "--wandb.mode offline" in out
    assert "Traceback" not in err


def test_a_metrics_file_that_refuses_appends_is_one_line_at_start(tmp_path, monkeypatch):
    """An immutable or read-only metrics.jsonl in a writable folder (the folder's probe passes):
    found when the logger opens, not at its first row after a stretch of training."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "frames": 1}\n')
    real_open = pathlib.Path.open

    def refusing(path, mode="r", *args, **kwargs):
        if path.name == "metrics.jsonl" and "a" in mode:
            raise PermissionError(1, "Operation not permitted")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refusing)
    with pytest.raises(LogdirError) as error:
        _logger(tmp_path, wandb_mode="disabled", progress=False)
    path = tmp_path / "metrics.jsonl"
    assert str(error.value) == f"metrics file {path} is not writable: Operation not permitted"
    assert path.read_text() == '{"step": 1, "frames": 1}\n'
