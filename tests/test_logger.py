import math
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from dreamer_jax.logger import LogdirError, Logger, read_metrics


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


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    logger = _logger(tmp_path)
    logger.scalars({"model_loss": 0.25, "actor_entropy": 3.0})
    logger.write(5)
    logger.scalar("model_loss", 0.125)
    logger.write(9)
    logger.close()

    events = _tb_events(tmp_path)
    assert [(step, v.simple_value) for step, v in events["model_loss"]] == [(5, 0.25), (9, 0.125)]
    assert [(step, v.simple_value) for step, v in events["actor_entropy"]] == [(5, 3.0)]


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

    logger = _logger(tmp_path, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    logger.scalar("loss", 40.0)
    logger.write(4)
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert not list(tmp_path.glob(".*.tmp"))


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

    with pytest.warns(UserWarning, match="malformed last line 3"):
        logger = _logger(tmp_path)
    logger.write(3)
    logger.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_malformed_middle_line_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=":2: malformed"):
        read_metrics(path)


def test_unwritable_logdir_raises_one_line_before_writing(tmp_path):
    parent = tmp_path / "a_file"
    parent.write_text("")  # root ignores permissions, but not a file used as a directory
    with pytest.raises(LogdirError) as info:
        _logger(parent / "logs")
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "\n" not in message and str(parent / "logs") in message
    assert parent.read_text() == ""


def test_non_tty_prints_one_compact_line_per_write(tmp_path, capsys):
    # progress=None under capsys: stderr is not a TTY, so no bar.
    logger = _logger(tmp_path, progress=None, action_repeat=4, total_steps=100)
    logger.progress(12, {"train_return": 12.0})
    logger.scalars({"model_loss": 1.234, "fps": 2100, "train_return": 12})
    logger.write(12)
    logger.write(13)
    logger.close()

    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "[step 12 | frames 48] train_return 12 fps 2100 model_loss 1.234",
        "[step 13 | frames 52]",
    ]
    assert captured.err == ""


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
    assert runs and all(run.name.endswith(f"-{run_id}") for run in runs)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


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
