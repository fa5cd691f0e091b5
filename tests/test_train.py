"""End to end through the real CLI (`python -m dreamer_jax.train`) on tiny configs."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dreamer_jax.logger import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args, timeout=900):
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "dreamer_jax.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_classic_debug_run_end_to_end(tmp_path):
    logdir = tmp_path / "run"
    result = run_cli(
        "--configs", "classic", "debug", "--task", "classic_cartpole",
        "--logdir", str(logdir), "--steps", "1500", "--envs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((logdir / "config.yaml").read_text())
    assert saved["task"] == "classic_cartpole" and saved["envs"] == 2

    rows = read_metrics(logdir / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] >= 1250
    assert all(row["frames"] == row["step"] * saved["action_repeat"] for row in rows)
    keys = ["model_loss", "kl", "vector_loss", "reward_loss", "discount_loss", "actor_loss"]
    keys += ["critic_loss", "actor_entropy", "fps", "updates_per_sec", "train_return"]
    for key in keys:
        assert all(np.isfinite(row[key]) for row in rows), key
    assert any("eval_return" in row for row in rows)
    # train_every 10 with 2 envs: one update per 10 policy steps after the prefill.
    last = rows[-1]
    expected_updates = saved["pretrain"] + (last["step"] - saved["prefill"]) // 10
    assert abs(last["updates"] - expected_updates) <= 1

    assert list(logdir.glob("events.out.tfevents.*"))
    assert (logdir / "wandb").is_dir()  # offline wandb by default, inside the logdir
    gifs = sorted(logdir.glob("openl_*.gif"))
    assert gifs
    from PIL import Image

    with Image.open(gifs[-1]) as gif:
        assert gif.n_frames > 1
    episodes = sorted((logdir / "replay").glob("*.npz"))
    assert episodes
    with np.load(episodes[0], allow_pickle=False) as episode:
        assert episode["is_first"][0] and episode["is_last"][-1]
        assert episode["action"].dtype == np.uint8 and episode["vector"].dtype == np.float32
        np.testing.assert_array_equal(episode["action"][0], 0)
        np.testing.assert_array_equal(episode["action"][1:].sum(-1), 1)


def test_atari_debug_smoke(tmp_path):
    result = run_cli(
        "--configs", "atari", "debug", "--task", "atari_pong", "--logdir", str(tmp_path),
        "--steps", "400", "--prefill", "200", "--eval_every", "400", "--log_every", "200",
        "--wandb.mode", "disabled", "--time_limit", "100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows and np.isfinite(rows[-1]["image_loss"])
    assert list(tmp_path.glob("openl_*.gif"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--task", "atari_pongg"], "unknown task 'atari_pongg'; close matches: atari_pong"),
        (["--rssm.detr", "3"], "unknown config key 'rssm.detr'"),
        (["--steps", "many"], "'steps' expects int"),
        (["--logdir", ""], "--logdir is required"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, fragment):
    base = ["--configs", "classic", "debug", "--logdir", str(tmp_path / "run")]
    result = run_cli(*base, *args, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-2000:]


def test_unwritable_logdir_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("--configs", "classic", "debug", "--logdir", str(blocker / "run"), timeout=120)
    assert result.returncode == 2 and "not writable" in result.stderr
    assert blocker.read_text() == "not a directory"


CLASSIC = ["--configs", "classic", "debug", "--task", "classic_cartpole"]
CLASSIC += ["--wandb.mode", "disabled", "--checkpoint_every", "400", "--log_every", "200"]


def _comparable(rows):
    """metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in row.items() if k not in ("fps", "updates_per_sec")} for row in rows]


def test_resume_continues_without_duplicates_or_prefill(tmp_path):
    logdir = tmp_path / "run"
    first = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "800")
    assert first.returncode == 0, first.stderr[-3000:]
    rows_before = read_metrics(logdir / "metrics.jsonl")
    files_before = sorted(p.name for p in (logdir / "replay").glob("*.npz"))
    second = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint at step 800" in second.stdout
    rows = read_metrics(logdir / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] >= 1000
    assert rows[: len(rows_before)] == rows_before
    # No re-prefill: updates continue from where they were (train_every 10, 1 env).
    resumed = [row for row in rows if row["step"] > 800]
    assert resumed[0]["updates"] > rows_before[-1]["updates"]
    files_after = sorted(p.name for p in (logdir / "replay").glob("*.npz"))
    assert files_after[: len(files_before)] == files_before and len(files_after) > len(files_before)
    # The replay is loaded once: as many episodes in memory as files of sampleable length.
    sampleable = sum(1 for name in files_after if int(name.split("-")[1][:-4]) >= 10)
    assert rows[-1]["replay_episodes"] <= sampleable


def test_config_change_on_resume_is_refused_and_nothing_is_touched(tmp_path):
    logdir = tmp_path / "run"
    assert run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "400").returncode == 0
    snapshot = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--rssm.deter", "48", timeout=300)
    assert result.returncode == 2
    assert "config differs" in result.stderr and "rssm.deter" in result.stderr
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == snapshot
    # Run length is not part of the experiment's identity.
    longer = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "600")
    assert longer.returncode == 0, longer.stderr[-3000:]


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        logdir = tmp_path / name
        result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "800", "--seed", str(seed))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _comparable(read_metrics(logdir / "metrics.jsonl"))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_eval_cli_is_read_only(tmp_path):
    logdir = tmp_path / "run"
    assert run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "400").returncode == 0
    snapshot = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    result = subprocess.run(
        [sys.executable, "-m", "dreamer_jax.eval", "--logdir", str(logdir), "--episodes", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and summary["step"] == 400
    assert np.isclose(summary["mean"], np.mean(summary["returns"]))
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == snapshot
    missing = subprocess.run(
        [sys.executable, "-m", "dreamer_jax.eval", "--logdir", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_sigterm_checkpoints_and_exits(tmp_path):
    import signal
    import time

    logdir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "dreamer_jax.train", *CLASSIC, "--logdir", str(logdir)]
    process = subprocess.Popen(
        command + ["--steps", "100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 600
        while not (logdir / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    stopped = int(output.split("stopping on signal")[1].split("at step")[1].split()[0])
    assert stopped in [int(p.name) for p in (logdir / "checkpoints").iterdir() if p.name.isdigit()]


def test_cartpole_learns_beyond_random(tmp_path):
    """The classic preset learns cartpole on a 2-core CPU within the CI budget: the best eval
    return (5 episodes, mode policy) is over 3× a random policy's (about 22).

    Measured with exactly this command and seeds 0–5 (2-core CPU, 2026-11-26), eval returns
    at steps 2500/4000/6000/8000:
      seed 0: 9.0, 50.8, 77.2, 299.6    seed 1: 16.4, 94.0, 67.0, 212.6
      seed 2: 11.0, 77.4, 41.0, 39.6    seed 3: 9.0, 60.2, 146.0, 63.2
      seed 4: 10.0, 113.6, 135.0, 300.8 seed 5: 23.0, 85.2, 64.8, 40.0
    All six pass (the weakest best is 77.4). CPU XLA is deterministic, but another CPU model
    can fuse differently, so CI may see a different seed's luck, not these exact numbers.
    """
    logdir = tmp_path / "run"
    result = run_cli(
        "--configs", "classic", "--task", "classic_cartpole", "--logdir", str(logdir),
        "--steps", "8000", "--eval_every", "2000", "--eval_eps", "5", "--log_every", "2000",
        "--wandb.mode", "disabled", "--seed", "0", timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [row["eval_return"] for row in read_metrics(logdir / "metrics.jsonl")
             if "eval_return" in row]  # fmt: skip
    assert len(evals) == 4 and max(evals) > 66, evals


def test_nonfinite_updates_stop_the_run(tmp_path):
    # A NaN learning rate makes every update non-finite: each is skipped, then the run stops.
    result = run_cli(
        *CLASSIC, "--logdir", str(tmp_path / "run"), "--steps", "2000",
        "--model_opt.lr", "nan", "--max_nonfinite", "3", timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "3 consecutive non-finite updates" in result.stderr


def test_atari_debug_same_seed_is_bit_identical(tmp_path):
    rows = []
    for name in ("a", "b"):
        result = run_cli(
            "--configs", "atari", "debug", "--task", "atari_pong", "--logdir", str(tmp_path / name),
            "--steps", "300", "--prefill", "200", "--log_every", "100", "--eval_every", "300",
            "--time_limit", "100", "--wandb.mode", "disabled",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        rows.append(_comparable(read_metrics(tmp_path / name / "metrics.jsonl")))
    assert rows[0] == rows[1] and len(rows[0]) >= 2
