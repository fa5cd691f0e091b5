"""End to end through the real CLI (`python -m dreamer_jax.train`) on tiny configs."""

import json
import logging
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import yaml
from helpers import wandb_history
from PIL import Image

from dreamer_jax import analyze
from dreamer_jax import eval as eval_module
from dreamer_jax import train as train_module
from dreamer_jax.api import make_agent
from dreamer_jax.config import make_config
from dreamer_jax.envs import VectorEnv
from dreamer_jax.logger import read_metrics, seeds_line
from dreamer_jax.replay import Replay
from dreamer_jax.seeds import init_keys

ROOT = pathlib.Path(__file__).resolve().parent.parent
METRICS = "metrics.jsonl"


def run_cli(*args, timeout=900):
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "dreamer_jax.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def cartpole_config(logdir, **overrides):
    """The in-process tests' run: `classic debug` cartpole (its prefill 300 steps) in
    `logdir`, wandb off, with each test's own length and schedules as `overrides`."""
    return make_config(
        ["classic", "debug"],
        {"task": "classic_cartpole", "logdir": str(logdir), "wandb.mode": "disabled", **overrides},
    )


def test_a_seeds_host_streams_are_all_different(tmp_path):
    """The prefill's random actions, the report samples and the replay's training batches of
    one seed each draw from their own numpy stream (they once shared `default_rng(seed)`)."""
    config = make_config(["classic", "debug"], {"seed": 3, "num_seeds": 2})
    spec = VectorEnv(config.task, 1, 0).step_spec
    for index, seed_state in enumerate(train_module._fresh_loop(config)["seeds"]):
        seed = config.seed + index
        replay = train_module._open_replay(config, tmp_path / str(seed), spec, seed, None, 0)
        states = [seed_state["random_rng"], seed_state["report_rng"], replay.get_rng_state()]
        draws = {tuple(train_module._generator(s).integers(0, 2**62, 4)) for s in states}
        assert len(draws) == 3


def test_a_resumed_replay_samples_on_from_its_checkpointed_stream(tmp_path):
    """A resumed seed's replay draws its batches on from the stream its checkpoint saved,
    not again from the start of its seed's (the batches of the run's beginning again)."""
    config = make_config(["classic", "debug"], {"seed": 3})
    spec = VectorEnv(config.task, 1, 0).step_spec
    fresh = train_module._open_replay(config, tmp_path / "fresh", spec, 3, None, 0)
    saved = train_module._generator(fresh.get_rng_state())
    saved.integers(0, 2**62, 5)  # the stream moved on by the batches drawn before the stop
    seed_state = {"replay_rng": saved.bit_generator.state, "replay_next_index": 0}
    resumed = train_module._open_replay(config, tmp_path / "resumed", spec, 3, seed_state, 400)
    assert resumed.get_rng_state() == saved.bit_generator.state != fresh.get_rng_state()


def test_classic_debug_run_end_to_end(tmp_path):
    logdir = tmp_path / "run"
    result = run_cli(
        "--configs", "classic", "debug", "--task", "classic_cartpole",
        "--logdir", str(logdir), "--steps", "1450", "--envs", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    saved = yaml.safe_load((logdir / "config.yaml").read_text())
    assert saved["task"] == "classic_cartpole" and saved["envs"] == 2
    # One sign of life before the first update's compile, which is silent otherwise.
    assert len(re.findall(r"^step \d+: compiling the update", result.stdout, re.M)) == 1

    rows = read_metrics(logdir / "metrics.jsonl")
    steps = [row["step"] for row in rows]
    # Every log_every (250) steps, and the last step of a finished run.
    assert steps == sorted(set(steps)) and steps[-2:] == [1250, 1450]
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
    # Where each row's wall time went: shares of its interval, the loop's own rest included.
    for row in rows:
        shares = {k: v for k, v in row.items() if k.startswith("time_")}
        assert set(shares) == {f"time_{part}" for part in (*train_module.Stopwatch.PARTS, "other")}
        assert all(0 <= share <= 1 for share in shares.values())
        np.testing.assert_allclose(sum(shares.values()), 1.0, rtol=1e-9)
    assert all(last[f"time_{part}"] > 0 for part in ("env", "policy", "replay", "batch", "update"))
    assert any(row["time_eval"] > 0 for row in rows) and any(row["time_log"] > 0 for row in rows)

    assert list(logdir.glob("events.out.tfevents.*"))
    assert (logdir / "wandb").is_dir()  # offline wandb by default, inside the logdir
    gifs = sorted(logdir.glob("openl_*.gif"))
    assert gifs
    with Image.open(gifs[-1]) as gif:
        assert gif.n_frames > 1
    episodes = sorted((logdir / "replay").glob("*.npz"))
    assert episodes
    with np.load(episodes[0], allow_pickle=False) as episode:
        assert episode["is_first"][0] and episode["is_last"][-1]
        assert episode["action"].dtype == np.uint8 and episode["vector"].dtype == np.float32
        np.testing.assert_array_equal(episode["action"][0], 0)
        np.testing.assert_array_equal(episode["action"][1:].sum(-1), 1)


@pytest.mark.slow
def test_atari_debug_smoke(tmp_path):
    result = run_cli(
        "--configs", "atari", "debug", "--task", "atari_pong", "--logdir", str(tmp_path),
        "--steps", "400", "--prefill", "200", "--eval_every", "400", "--log_every", "200",
        "--wandb.mode", "disabled", "--time_limit", "100",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "action_repeat" not in result.stderr  # the Atari protocol: no warning
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows and np.isfinite(rows[-1]["image_loss"])
    assert list(tmp_path.glob("openl_*.gif"))
    assert list(tmp_path.glob("eval_policy_*.gif"))  # the eval episode's policy video
    # dreamer_jax.eval's video, named by its eval seed: another seed keeps this one.
    assert (
        eval_module.main(["--logdir", str(tmp_path), "--episodes", "1", "--seed", "7", "--video"])
        == 0
    )
    with Image.open(tmp_path / "eval_400_seed7.gif") as gif:
        assert gif.n_frames > 1


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
    result = run_cli("--configs", "classic", "debug", "--logdir", str(blocker), timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"error: log directory {blocker} is a file, not a directory\n"
    assert blocker.read_text() == "not a directory"


CLASSIC = ["--configs", "classic", "debug", "--task", "classic_cartpole"]
CLASSIC += ["--wandb.mode", "disabled", "--checkpoint_every", "400", "--log_every", "200"]


def _comparable(rows):
    """metrics.jsonl without the wall-clock fields."""
    clock = ("fps", "updates_per_sec")
    return [
        {k: v for k, v in row.items() if k not in clock and not k.startswith("time_")}
        for row in rows
    ]


@pytest.mark.slow
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
    # Provenance: one start per invocation, the resume's from the restored step.
    import json

    run = json.loads((logdir / "run.json").read_text())
    assert [start["step"] for start in run["starts"]] == [0, 800]
    assert run["command"][-1] == "1200" and run["versions"]["jax"]


@pytest.mark.slow
def test_config_change_on_resume_is_refused_and_nothing_is_touched(tmp_path):
    logdir = tmp_path / "run"
    assert run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "400").returncode == 0
    snapshot = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--rssm.deter", "48", timeout=300)
    assert result.returncode == 2
    assert "config differs" in result.stderr and "rssm.deter" in result.stderr
    # The likely cause, presets left out, is answered by the command the run began with.
    started = "it was last started with: " + shlex.join([sys.executable, "-m", "dreamer_jax.train"])
    assert f"{started} {shlex.join(CLASSIC)} --logdir {logdir} --steps 400 (" in result.stderr
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == snapshot
    # Run length is not part of the experiment's identity.
    longer = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "600")
    assert longer.returncode == 0, longer.stderr[-3000:]

    def files():  # but the lock, which holds the pid of its last holder
        return {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file() and p.name != ".lock"}

    finished = files()
    for steps in ("600", "500"):  # a finished run, and a shorter --steps than it ran
        again = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", steps)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"the run is at step 600 (--steps {steps}): nothing to train" in again.stdout
        assert "checkpoint saved" not in again.stdout and "seed 0: " in again.stdout
        # No new events file, run.json start, config or checkpoint: nothing is touched.
        assert files() == finished


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        logdir = tmp_path / name
        result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "800", "--seed", str(seed))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = _comparable(read_metrics(logdir / "metrics.jsonl"))
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


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


@pytest.mark.slow
def test_cartpole_learns_beyond_random(tmp_path):
    """The classic preset learns cartpole on a 2-core CPU within the CI budget: the best eval
    return (5 episodes, mode policy) is over 3× a random policy's (about 22).

    Measured with this command's seeds 0–5 as one `--num_seeds 6` run (each seed the same
    experiment as `--seed s`; 2-core CPU, 2026-11-28, Keras' Adam epsilon and the official
    slow-critic timing), eval returns at steps 2500/4000/6000/8000:
      seed 0: 9.0, 117.4, 218.8, 221.4  seed 1: 12.8, 153.4, 100.2, 480.4
      seed 2: 9.8, 59.4, 500.0, 364.6   seed 3: 9.0, 202.0, 115.0, 93.6
      seed 4: 11.6, 99.4, 234.4, 483.6  seed 5: 9.6, 115.2, 162.4, 174.0
    All six pass (the weakest best is 174.0; 166.0 before that change, 77.4 with flax's
    lecun-normal init before issue 10). This command itself (seed 0 alone, same day) gave
    9.0, 121.0, 177.8, 250.2: a seed of a many-seed run matches its single run only to float
    rounding, which grows apart over 1,200 updates. CPU XLA is deterministic, but another
    CPU model can fuse differently, so CI may see a different seed's luck, not these exact
    numbers.
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


@pytest.mark.slow
@pytest.mark.parametrize("num_seeds", ["1", "2"])
def test_nonfinite_updates_stop_the_run(tmp_path, num_seeds):
    # A huge learning rate blows the parameters up to where every forward pass overflows:
    # each update is then skipped, and once every seed is there the run stops.
    result = run_cli(
        *CLASSIC, "--logdir", str(tmp_path / "run"), "--steps", "2000", "--num_seeds", num_seeds,
        "--model_opt.lr", "1e30", "--max_nonfinite", "3", timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    seeds = "seed 0" if num_seeds == "1" else "seeds 0, 1"
    assert "3 consecutive non-finite updates at step" in result.stderr
    assert f"({seeds}); stopping with the last good checkpoint kept" in result.stderr
    # No checkpoint of the diverged states at the stop: a resume starts from before it.
    stopped_at = int(re.search(r"non-finite updates at step (\d+)", result.stderr)[1])
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) < stopped_at and "saved a checkpoint at step" not in result.stderr


class NonFiniteRewards:
    """A real `VectorEnv` whose row `row` always returns a NaN reward: every update of the
    seed that owns that env is non-finite, the other seeds' data is untouched."""

    def __init__(self, env, row):
        self.env, self.row = env, row

    def __getattr__(self, name):
        return getattr(self.env, name)

    def _poisoned(self, step):
        step["reward"][self.row] = np.nan
        return step

    def reset(self):
        return self._poisoned(self.env.reset())

    def step(self, action, active=None):
        return self._poisoned(self.env.step(action, active))


def test_running_out_of_memory_loading_a_replay_is_one_line_naming_it(tmp_path, monkeypatch):
    """A replay too large to load (a resume on a smaller machine) ends in a RunError, the
    one line train prints, not a MemoryError traceback; nothing is saved by that start."""
    config = cartpole_config(tmp_path, steps=400)

    def no_memory(*args):
        raise MemoryError("Unable to allocate 3.00 GiB for an array with shape (400000,)")

    monkeypatch.setattr(train_module, "_open_replay", no_memory)
    with pytest.raises(train_module.RunError, match=r"out of memory loading the replay of .* \("):
        train_module.train(config, types.SimpleNamespace(signum=None))
    assert not (tmp_path / "run.json").exists()


def test_a_row_averages_the_train_metrics_but_logs_running_counts_as_they_stand():
    """Per seed, the mean of each metric over the row's updates, except the counts since the
    run began (`nonfinite_total`, `nonfinite_streak`): their latest value, also after the
    pending sums went through a checkpoint. The sums stay until the row is written."""
    learning = object.__new__(train_module.Learning)
    learning.sums = [{"count": 0, "sums": {}}, {"count": 0, "sums": {}}]
    replay = types.SimpleNamespace(
        get_rng_state=lambda: {}, stats={"num_episodes": 0}, next_index=0, flush=lambda: None
    )
    learning.replays = [replay, replay]
    update = lambda loss, total: {
        "model_loss": np.array([loss, 10 * loss]),
        "nonfinite_total": np.array([total, 0.0]),
        "nonfinite_streak": np.array([total, 0.0]),
    }
    # Counts that differ between the updates: the latest one's is kept, not the first's.
    learning.metrics = [update(1.0, 2.0), update(2.0, 3.0)]
    saved = learning.seed_states()  # what a checkpoint keeps of them
    learning.metrics = [update(6.0, 4.0)]
    first, second = learning.row_metrics()
    assert first == {"model_loss": 3.0, "nonfinite_total": 4.0, "nonfinite_streak": 4.0}
    assert second == {"model_loss": 30.0, "nonfinite_total": 0.0, "nonfinite_streak": 0.0}
    assert saved[0]["pending_metrics"]["latest"] == {
        "nonfinite_streak": 3.0,
        "nonfinite_total": 3.0,
    }
    assert learning.row_metrics() == [first, second]  # not yet written
    learning.clear_metrics()
    assert learning.row_metrics() == [{}, {}]


def stop_during_updates(monkeypatch, step: int, paid: int) -> types.SimpleNamespace:
    """The stop flag for `train`, set as a signal would after `paid` of the updates `step`
    owes (`Learning.train` patched; `monkeypatch.undo()` lifts it)."""
    stop, train = types.SimpleNamespace(signum=None), train_module.Learning.train

    def stopping_at(self, at, stopping):
        if at == step and stop.signum is None:
            train(self, at, iter([False] * paid + [True]).__next__)
            stop.signum = 2
            return
        train(self, at, stopping)

    monkeypatch.setattr(train_module.Learning, "train", stopping_at)
    return stop


def test_a_stop_within_a_steps_updates_leaves_its_row_to_the_resumed_run(
    tmp_path, monkeypatch, capsys
):
    """Step 300 (the last, where the prefill ends) owes 2 updates (the pretraining one and
    its own); a stop after the first writes no row there: the resumed run pays the second
    and writes the row then, the same as an uninterrupted run's (QA: it held 1 update)."""
    whole = cartpole_config(tmp_path / "whole", steps=300, eval_every=100000)
    train_module.train(whole, types.SimpleNamespace(signum=None))
    assert "ends within the prefill" not in capsys.readouterr().err  # it trains at step 300
    config = cartpole_config(tmp_path / "stopped", steps=300, eval_every=100000)
    train_module.train(config, stop_during_updates(monkeypatch, step=300, paid=1))
    assert not (tmp_path / "stopped" / "metrics.jsonl").exists()  # no row yet
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert rows[0]["updates"] == 2
    # The evaluation's envs are reseeded on resume (docs/reproducibility.md): all else agrees.
    no_eval = lambda rows: [
        {k: v for k, v in row.items() if not k.startswith("eval_")} for row in _comparable(rows)
    ]
    assert no_eval(rows) == no_eval(read_metrics(tmp_path / "whole" / "metrics.jsonl"))


def test_a_stop_within_the_last_steps_updates_off_the_log_schedule_leaves_its_row_owed(
    tmp_path, monkeypatch
):
    """The last step, 600, is no multiple of log_every (250) and owes 2 updates; a stop after
    the first leaves its row owed, and the resumed run writes it once it pays the second,
    the same as an uninterrupted run's (review: the row was lost for good, the resumed run
    taking its restored step's row for written)."""
    # One batch drawn ahead: the resumed run redraws it from the same replay (2 ahead, it
    # would have been drawn at step 590, before episodes the resumed run's draw sees).
    settings = {"steps": 600, "log_every": 250, "eval_every": 100000, "train_steps": 2,
                "replay.prefetch": 1}  # fmt: skip
    train_module.train(
        cartpole_config(tmp_path / "whole", **settings), types.SimpleNamespace(signum=None)
    )
    config = cartpole_config(tmp_path / "stopped", **settings)
    train_module.train(config, stop_during_updates(monkeypatch, step=600, paid=1))
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    assert [row["step"] for row in read_metrics(metrics)] == [300, 500]
    monkeypatch.undo()
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(metrics)
    assert [row["step"] for row in rows] == [300, 500, 600]
    assert _comparable(rows) == _comparable(read_metrics(tmp_path / "whole" / "metrics.jsonl"))
    assert "fps" not in rows[-1]  # no step taken since the restored one (QA: fps 0.0)


def test_an_error_between_a_steps_updates_saves_the_states_of_the_updates_done(
    tmp_path, monkeypatch
):
    """Step 300, the last, owes 3 updates (the pretraining one and its 2); the sampler fails
    before the third. The error checkpoint holds the states after the second, 1 update owed
    (review: it saved nothing, the loop's states having been donated to the first update),
    and the resumed run's row equals an uninterrupted run's."""
    settings = dict(steps=300, eval_every=100000, train_steps=2)
    train_module.train(
        cartpole_config(tmp_path / "whole", **settings), types.SimpleNamespace(signum=None)
    )
    config = cartpole_config(tmp_path / "failed", **settings)

    class FailingReplay(train_module.Replay):
        def dataset(self):  # fails before it draws the third batch
            batches = super().dataset()
            yield next(batches)
            yield next(batches)
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(train_module, "Replay", FailingReplay)
    with pytest.raises(OSError, match="Input/output error"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    saved = json.loads((tmp_path / "failed/checkpoints/300/loop/metadata").read_text())
    assert (saved["updates"], saved["updates_owed"]) == (2, 1)
    monkeypatch.undo()
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "failed" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [300]
    no_eval = lambda rows: [
        {k: v for k, v in row.items() if not k.startswith("eval_")} for row in _comparable(rows)
    ]  # the evaluation's envs are reseeded on resume (docs/reproducibility.md)
    assert no_eval(rows) == no_eval(read_metrics(tmp_path / "whole" / "metrics.jsonl"))


@pytest.mark.parametrize("paid", [0, 1])
def test_owed_updates_wait_while_the_replay_they_sample_is_lost(
    tmp_path, monkeypatch, capsys, paid
):
    """Stopped after `paid` of the 2 updates of step 300 (the pretraining one and its own),
    then the replay's files lost: the resumed run says its updates wait, collects episodes
    again and pays them once it can sample (review: a traceback from the empty replay). The
    evaluation due at 300 waits for them too, and the pretraining is owed once."""
    config = cartpole_config(tmp_path, steps=400, log_every=100, eval_every=100000)
    train_module.train(config, stop_during_updates(monkeypatch, step=300, paid=paid))
    monkeypatch.undo()
    for episode in (tmp_path / "replay").glob("*.npz"):
        episode.unlink()
    capsys.readouterr()
    with pytest.warns(UserWarning, match="the replay holds 0 episodes"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    assert "step 300: seed 0 stored no episode" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "metrics.jsonl")
    ready = rows[0]["step"]  # the first step it could sample at, where it paid them
    assert ready > 300 and rows[0]["eval_return"] is not None and rows[-1]["step"] == 400
    # Each step from `ready` that crosses a multiple of train_every owes 1 update more.
    assert rows[-1]["updates"] == 2 + sum(step % 10 == 0 for step in range(ready, 401))


def test_a_changed_log_or_eval_every_on_resume_takes_effect_at_once(tmp_path):
    """As `checkpoint_every`: the next row and eval come from this start's schedule, not the
    saved run's (review: lowered from 1000 to 100, they waited for step 1000)."""
    run = lambda **kw: train_module.train(
        cartpole_config(tmp_path, checkpoint_every=1000, **kw), types.SimpleNamespace(signum=None)
    )
    run(steps=400, log_every=1000, eval_every=1000)
    run(steps=700, log_every=100, eval_every=200)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [300, 400, 500, 600, 700]
    assert [row["step"] for row in rows if "eval_return" in row] == [300, 600]


def test_a_loop_state_saved_before_last_row_wrote_its_row_unless_it_owed_updates():
    saved = {"step": 600, "updates": 9, "updates_owed": 0, "next_eval": 700, "next_log": 750}
    assert train_module.saved_last_row(saved) == 600
    assert train_module.saved_last_row({**saved, "updates_owed": 1}) is None
    assert train_module.saved_last_row({**saved, "last_row": 500}) == 500
    assert train_module.owed_work({**saved, "updates_owed": 1}, 600) == ["1 update", "the log row"]


def test_a_checkpoint_saved_before_last_row_resumes(tmp_path, capsys):
    """A run whose checkpoint a version without `last_row` saved resumes from it (its row
    taken as written, it owed no update), not refused as unreadable: an upgrade mid-run
    would otherwise leave "no checkpoint could be restored" and the run lost."""
    from dreamer_jax import checkpoint as checkpoint_module

    settings = {"log_every": 100, "eval_every": 100000}
    first = cartpole_config(tmp_path, steps=400, **settings)
    train_module.train(first, types.SimpleNamespace(signum=None))
    saved = tmp_path / "checkpoints" / "400"
    loop = json.loads((saved / "loop" / "metadata").read_text())
    del loop["last_row"]
    (saved / "loop" / "metadata").write_text(json.dumps(loop))
    checksums = json.loads((saved / "checksums" / "metadata").read_text())
    checksums["loop"] = checkpoint_module._loop_checksum(loop)
    (saved / "checksums" / "metadata").write_text(json.dumps(checksums))
    final = train_module.train(
        cartpole_config(tmp_path, steps=500, **settings), types.SimpleNamespace(signum=None)
    )
    # From it, not from step 0 with it moved aside (the same rows, every step redone).
    assert "resuming from checkpoint at step 400" in capsys.readouterr().out
    assert not (tmp_path / "checkpoints_unreadable").exists()
    assert final["step"] == 500 and final["last_row"] == 500
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [300, 400, 500]


class Killed(BaseException):
    """A kill the process gets no say in: no `except Exception` sees it, nothing is saved."""


def test_a_run_killed_in_its_prefill_resumes_from_its_step_0_checkpoint(tmp_path, monkeypatch):
    """Step 0 is saved before any data: a run killed in its prefill, its replay already
    holding episodes, resumes from it rather than being refused as a logdir with data but
    no checkpoint (the run would have to be started over in a new logdir)."""
    config = cartpole_config(tmp_path, steps=400, eval_every=100000)
    step, calls = train_module.Acting.step, []

    def killed_at_the_150th_step(self, states, prefill):
        calls.append(prefill)
        if len(calls) == 150:
            raise Killed
        return step(self, states, prefill)

    monkeypatch.setattr(train_module.Acting, "step", killed_at_the_150th_step)
    with pytest.raises(Killed):
        train_module.train(config, types.SimpleNamespace(signum=None))
    assert all(calls) and list((tmp_path / "replay").glob("*.npz"))  # data, in the prefill
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["0"]
    monkeypatch.undo()
    final = train_module.train(config, types.SimpleNamespace(signum=None))
    assert final["step"] == 400 and final["updates"] > 0


def test_the_prefill_is_exactly_prefill_random_policy_steps(tmp_path, monkeypatch):
    """Steps 0 … prefill − 1 act at random, from step `prefill` on the policy acts: the
    paper's count of random steps (one more would shift every run's data by a step)."""
    config = cartpole_config(tmp_path, steps=310, eval_every=100000)
    step, calls = train_module.Acting.step, []

    def recorded(self, states, prefill):
        calls.append(prefill)
        return step(self, states, prefill)

    monkeypatch.setattr(train_module.Acting, "step", recorded)
    train_module.train(config, types.SimpleNamespace(signum=None))
    assert calls == [True] * config.prefill + [False] * (310 - config.prefill)


def test_stopwatch_shares_each_part_of_a_rows_interval(monkeypatch):
    clock = iter([10.0, 11.5, 20.0, 20.5, 30.0, 31.0])  # perf_counter at each start and end
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    stopwatch = train_module.Stopwatch()
    for part in ("env", "update", "env"):
        with stopwatch(part):
            pass
    shares = stopwatch.fractions(8.0)  # env 1.5 + 1.0 s, update 0.5 s of 8 s
    assert shares == {
        **{f"time_{part}": 0.0 for part in train_module.Stopwatch.PARTS},
        "time_env": 2.5 / 8, "time_update": 0.5 / 8, "time_other": 5.0 / 8,
    }  # fmt: skip
    stopwatch.reset()
    assert stopwatch.fractions(1.0)["time_other"] == 1.0


def test_in_words():
    assert train_module.in_words(["a"]) == "a"
    assert train_module.in_words(["a", "b"]) == "a and b"
    assert train_module.in_words(["a", "b", "c"]) == "a, b and c"


def test_the_prefill_warning_reckons_with_the_last_step_past_steps():
    """The run ends at the first multiple of `envs` at or past `steps`: with 16 envs,
    --steps 290 ends at 304, past a prefill of 300, and trains there."""
    warn = lambda **kw: train_module.prefill_warning(make_config(["classic", "debug"], kw))
    assert warn(steps=290, envs=16, prefill=300) is None
    assert warn(steps=300, prefill=300) is None
    assert warn(steps=299, prefill=300).startswith("warning: --steps 299 ends within")


def test_a_resume_saves_its_restored_step_once_the_owed_work_is_done(tmp_path, monkeypatch):
    """Resumed owing a row (a stop within step 300's updates), the run pays and writes it,
    then is killed before the next multiple of checkpoint_every: the next resume starts from
    a checkpoint that owes nothing, and row 300 is written once (QA: twice, the kill's
    resume doing the owed work again)."""
    config = cartpole_config(tmp_path, steps=500, log_every=100, eval_every=100000)
    train_module.train(config, stop_during_updates(monkeypatch, step=300, paid=1))
    monkeypatch.undo()

    def killed(self, states, prefill):
        raise Killed

    monkeypatch.setattr(train_module.Acting, "step", killed)  # at its first policy step
    with pytest.raises(Killed):
        train_module.train(config, types.SimpleNamespace(signum=None))
    saved = json.loads((tmp_path / "checkpoints/300/loop/metadata").read_text())
    assert train_module.owed_work(saved, 500) == []
    monkeypatch.undo()
    train_module.train(config, types.SimpleNamespace(signum=None))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [300, 400, 500]


def test_a_lower_checkpoint_every_on_resume_takes_effect_at_once(tmp_path):
    """The next checkpoint comes from this start's `checkpoint_every`, not the saved run's
    schedule (QA: lowered from 1000 to 100, the next save still waited for step 1000), on
    its multiples from a restored step that is none (450: 500, not 550)."""
    run = lambda **kw: train_module.train(
        cartpole_config(tmp_path, log_every=1000, eval_every=100000, **kw),
        types.SimpleNamespace(signum=None),
    )
    run(steps=450, checkpoint_every=1000)
    run(steps=700, checkpoint_every=100, checkpoint_keep=10)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [0, 450, 500, 600, 700]


def test_a_log_row_that_fails_stays_owed_after_the_error_checkpoint(tmp_path, monkeypatch):
    """A full disk at the log of step 500: the run saves a checkpoint there and stops; the
    resumed run still owes that row and writes it at its restored step, 500, then its last."""
    config = cartpole_config(tmp_path, steps=600, log_every=250, eval_every=100000)
    write = train_module.Logging.write

    def full_disk_at_500(self, step, *args):
        if step == 500:
            raise OSError(28, "No space left on device")
        return write(self, step, *args)

    monkeypatch.setattr(train_module.Logging, "write", full_disk_at_500)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    assert (tmp_path / "checkpoints" / "500").is_dir()  # the error checkpoint
    monkeypatch.setattr(train_module.Logging, "write", write)
    train_module.train(config, types.SimpleNamespace(signum=None))
    # 300: the first step with an update (the prefill ends there).
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [300, 500, 600]


def metrics_file_full_at(monkeypatch, step: int) -> None:
    """Every seed's row of `step` fails to be written, as on a full disk (`Logger.write`
    patched; `monkeypatch.undo()` lifts it)."""
    write = train_module.Logger.write

    def full_disk(self, at):
        if at == step:
            raise OSError(28, "No space left on device")
        return write(self, at)

    monkeypatch.setattr(train_module.Logger, "write", full_disk)


def test_a_row_whose_file_write_fails_keeps_its_metrics_for_the_resumed_run(tmp_path, monkeypatch):
    """metrics.jsonl cannot be written at step 500 (a full disk): the error checkpoint still
    holds the row's train metrics and returns, and the resumed run's row 500 is the one an
    uninterrupted run writes (review: they were taken before the write, and the resumed
    row had none)."""
    settings = dict(steps=500, log_every=250, eval_every=100000)
    train_module.train(
        cartpole_config(tmp_path / "whole", **settings), types.SimpleNamespace(signum=None)
    )
    config = cartpole_config(tmp_path / "failed", **settings)
    metrics_file_full_at(monkeypatch, 500)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    monkeypatch.undo()
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "failed" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [300, 500] and "model_loss" in rows[1]
    assert _comparable(rows) == _comparable(read_metrics(tmp_path / "whole" / "metrics.jsonl"))


def test_an_eval_whose_row_cannot_be_written_is_redone_by_the_resumed_run(tmp_path, monkeypatch):
    """metrics.jsonl cannot be written at step 500, where an evaluation ran: the evaluation
    stays owed in the error checkpoint, and the resumed run's row 500 holds one (mutation
    testing: it counted as done, and its results were lost with the row)."""
    config = cartpole_config(tmp_path, steps=500, log_every=250, eval_every=250)
    metrics_file_full_at(monkeypatch, 500)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    saved = json.loads((tmp_path / "checkpoints/500/loop/metadata").read_text())
    assert train_module.owed_work(saved, 500) == ["the evaluation", "the log row"]
    monkeypatch.undo()
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["step"], "eval_return" in row, "model_loss" in row) for row in rows] == [
        (300, True, True), (500, True, True)
    ]  # fmt: skip


def test_an_eval_that_fails_is_redone_with_the_same_draws_after_the_error_checkpoint(
    tmp_path, monkeypatch
):
    """An error inside the eval of step 500 (after its episodes, in the open-loop report):
    the run saves a checkpoint there and stops; the resumed run still owes that eval and runs
    it at its restored step, 500, with the keys and replay draws the failed one had."""
    config = cartpole_config(tmp_path, steps=600, log_every=250, eval_every=250)
    evaluate, open_loop_frames = train_module.evaluate, train_module.open_loop_frames
    calls = []

    def recorded_evaluate(agent, env, states, episodes, keys, **kwargs):
        calls.append(np.asarray(jax.random.key_data(keys)))
        return evaluate(agent, env, states, episodes, keys, **kwargs)

    def failing_at_500(agent, states, batches, keys, sharding):
        calls.append(batches[0]["action"])
        if len(calls) == 4:  # the eval of step 500: the first at 300 made two calls
            raise OSError(28, "No space left on device")
        return open_loop_frames(agent, states, batches, keys, sharding)

    monkeypatch.setattr(train_module, "evaluate", recorded_evaluate)
    monkeypatch.setattr(train_module, "open_loop_frames", failing_at_500)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    assert (tmp_path / "checkpoints" / "500").is_dir()  # the error checkpoint
    train_module.train(config, types.SimpleNamespace(signum=None))
    assert len(calls) == 6
    np.testing.assert_array_equal(calls[4], calls[2])  # the same episodes' keys,
    np.testing.assert_array_equal(calls[5], calls[3])  # the same report chunks
    assert not np.array_equal(calls[2], calls[0])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows if "eval_return" in row] == [300, 500]


def test_each_checkpoint_first_closes_every_seeds_open_wandb_row(tmp_path, monkeypatch):
    # wandb holds a step's row open until a later step: a run killed after a checkpoint
    # would lose the checkpoint step's row for good (tests/test_logger.py shows the kill).
    config = cartpole_config(tmp_path, steps=600, log_every=200, checkpoint_every=200, num_seeds=2)
    events = []
    commit, save = train_module.Logger.commit, train_module.Checkpointer.save

    def recorded_commit(self):
        events.append(("commit", self.logdir.name))
        return commit(self)

    def recorded_save(self, step, *args):
        events.append(("save", step))
        return save(self, step, *args)

    monkeypatch.setattr(train_module.Logger, "commit", recorded_commit)
    monkeypatch.setattr(train_module.Checkpointer, "save", recorded_save)
    train_module.train(config, types.SimpleNamespace(signum=None))
    saves = [i for i, event in enumerate(events) if event[0] == "save"]
    assert [events[i][1] for i in saves] == [0, 200, 400, 600]
    for i in saves:
        assert events[i - 2 : i] == [("commit", "seed_0"), ("commit", "seed_1")]


def test_each_update_gets_its_batch_prepared_during_the_update_before(tmp_path, monkeypatch):
    """While the device runs an update, the next update's batch is stacked and sent ahead
    (`Replay.upcoming`): every update but the first gets it, and it is exactly the stack of
    the batches the replays' iterators return at that update."""
    config = cartpole_config(tmp_path, steps=600, num_seeds=2)
    device_batch, checked = train_module.Learning._device_batch, []

    def checked_device_batch(self, batches):
        prepared = self.prepared[1] if self.prepared is not None else None
        batch = device_batch(self, batches)
        for key in batches[0]:
            want = np.stack([b[key] for b in batches])
            np.testing.assert_array_equal(np.asarray(batch[key]), want, err_msg=key)
        checked.append(batch is prepared)  # the prepared one, not made again
        return batch

    monkeypatch.setattr(train_module.Learning, "_device_batch", checked_device_batch)
    loop = train_module.train(config, types.SimpleNamespace(signum=None))
    assert len(checked) == loop["updates"] > 10
    assert checked == [False] + [True] * (len(checked) - 1)


def test_a_batch_that_fails_to_be_prepared_fails_only_the_update_that_needs_it(
    tmp_path, monkeypatch
):
    """Preparing waits on a batch before any update needs it (review: a copy that failed
    after the run's last update failed a run that needed no more batches). Such an error is
    left to `next()`: here every preparation fails, and the run trains as before."""

    def broken(self):
        raise RuntimeError("a chunk copy failed")

    monkeypatch.setattr(train_module.Replay, "upcoming", broken)
    config = cartpole_config(tmp_path, steps=500, num_seeds=2)
    loop = train_module.train(config, types.SimpleNamespace(signum=None))
    assert loop["step"] == 500 and loop["updates"] > 10


def test_each_checkpoint_waits_for_the_episode_files_it_counts(tmp_path, monkeypatch):
    """Episode files are written by each replay's worker thread; a checkpoint counts an
    episode (`replay_next_index`) only once its file is on disk, else a kill right after the
    checkpoint would resume without it."""
    config = cartpole_config(tmp_path, steps=600, checkpoint_every=100, num_seeds=2)
    write, save, checked = train_module.Replay._write, train_module.Checkpointer.save, []

    def slow_write(self, episode, name):
        time.sleep(0.05)
        return write(self, episode, name)

    def checked_save(self, step, states, loop):
        for index, seed_state in enumerate(loop["seeds"]):
            folder = tmp_path / f"seed_{index}" / "replay"
            names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            counted = seed_state.get("replay_next_index", 0)
            assert [int(name[:8]) for name in names] == list(range(counted)), (step, names)
            checked.append(counted)
        return save(self, step, states, loop)

    monkeypatch.setattr(train_module.Replay, "_write", slow_write)
    monkeypatch.setattr(train_module.Checkpointer, "save", checked_save)
    train_module.train(config, types.SimpleNamespace(signum=None))
    assert len(checked) == 2 * 7 and checked[-1] > 10  # steps 0, 100, ..., 600 of both seeds


def test_a_full_disk_mid_run_is_one_line_naming_the_file_and_exit_2(tmp_path, monkeypatch, capsys):
    # The disk fills while the 5th episode file is written (none names its file then).
    savez, saved = np.savez_compressed, []

    def full_disk_at_the_fifth(file, **arrays):
        saved.append(file.name)
        if len(saved) == 5:
            file.write(b"part of an episode")
            raise OSError(28, "No space left on device")
        return savez(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", full_disk_at_the_fifth)
    args = [*CLASSIC, "--logdir", str(tmp_path), "--steps", "600", "--wandb.mode", "disabled"]
    assert train_module.main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: could not write {saved[4]}: No space left on device; the run stopped with its "
        "saved checkpoints intact: fix that and run the same command to resume"
    )
    assert "Traceback" not in err
    assert "could not save a checkpoint" not in err  # refused quietly: it would count the file
    replay = sorted(path.name for path in (tmp_path / "replay").iterdir())
    assert len(replay) == 4 and not any(name.endswith(".tmp") for name in replay)  # removed


def test_a_run_whose_episodes_never_reach_a_samples_length_says_so(tmp_path, capsys):
    # CartPole ends by 500 steps (time_limit 0: the suite's limit), a random policy's by far
    # sooner: no episode is ever stored, and the run trains nothing.
    config = cartpole_config(tmp_path, steps=400, time_limit=0, **{"replay.minlen": 600})
    train_module.train(config, types.SimpleNamespace(signum=None))
    out, err = capsys.readouterr()
    waiting = "seed 0 stored no episode of at least max(replay.minlen, dataset.length) = 600 steps"
    assert f"step 300: {waiting}; training waits for one\n" in out
    assert err.endswith(f"warning: the run has made no update: {waiting}\n")


def test_an_evaluation_between_log_rows_gets_a_row_of_its_own(tmp_path):
    """Evaluations every 100 steps, rows every 200: the eval of step 500 is a row of its
    own (a later value of the same name replaced it in the next row), the others share the
    log row of their step."""
    config = cartpole_config(tmp_path, steps=600, log_every=200, eval_every=100)
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [300, 400, 500, 600]
    assert all(row["eval_return"] is not None for row in rows)
    assert "model_loss" not in rows[2] and "model_loss" in rows[3]


def _stop_in_the_second_eval(monkeypatch, stop) -> list[int]:
    """Patches the run's `evaluate` to request a stop (`stop.signum` 15) as its second call
    starts; returns the updates counter each call saw, filled as the run goes."""
    evaluate, updates = train_module.evaluate, []

    def stopping_in_the_second(agent, env, states, *args, **kwargs):
        updates.append(int(states.updates[0]))
        if len(updates) == 2:
            stop.signum = 15
        return evaluate(agent, env, states, *args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", stopping_in_the_second)
    return updates


def test_an_evaluation_a_stop_request_cut_short_is_logged_at_its_step(tmp_path, monkeypatch):
    """Stopped during the eval of step 400 (after that step's log row): the resumed run runs
    it at its restored step, 400, before it acts, and logs it there in a row of its own."""
    config = cartpole_config(tmp_path, steps=600, log_every=100, eval_every=100)
    stop = types.SimpleNamespace(signum=None)
    steps = _stop_in_the_second_eval(monkeypatch, stop)
    train_module.train(config, stop)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(row["step"], row.get("eval_return") is not None) for row in rows] == [
        (300, True), (400, False)
    ]  # fmt: skip
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evals = [row["step"] for row in rows if row.get("eval_return") is not None]
    assert evals == [300, 400, 500, 600] and len(steps) == 5
    assert steps[2] == steps[1]  # the redone eval saw the parameters the cut one had


def test_a_stop_during_the_last_evaluation_leaves_it_to_the_same_command(
    tmp_path, monkeypatch, capsys
):
    """Stopped during the eval of its last step: running the same command again does that
    eval (not "nothing to train"), logs it at that step and saves the step again, now owing
    nothing; a third run has nothing to train."""
    config = cartpole_config(tmp_path, steps=400, log_every=100, eval_every=100)
    stop = types.SimpleNamespace(signum=None)
    _stop_in_the_second_eval(monkeypatch, stop)
    train_module.train(config, stop)
    assert "at step 400 (the evaluation left for the resumed run)" in capsys.readouterr().out
    monkeypatch.undo()
    loop = train_module.train(config, types.SimpleNamespace(signum=None))
    assert "nothing to train" not in capsys.readouterr().out and not train_module.owed_work(
        loop, 400
    )
    rows = read_metrics(tmp_path / METRICS)
    assert [(row["step"], row.get("eval_return") is not None) for row in rows] == [
        (300, True), (400, False), (400, True)
    ]  # fmt: skip
    assert set(rows[2]) == {"step", "frames", "eval_return", "eval_length"}  # no second log row
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "400"
    train_module.train(config, types.SimpleNamespace(signum=None))
    assert "nothing to train" in capsys.readouterr().out
    assert read_metrics(tmp_path / METRICS) == rows


def test_an_error_after_a_resumed_runs_owed_updates_keeps_them(tmp_path, monkeypatch):
    """Stopped before the updates of step 300 (all owed), resumed, and an error in that
    step's eval: the checkpoint of 300 is saved again with the updates done, so the next
    resume does not redo them."""
    config = cartpole_config(tmp_path, steps=400, pretrain=5, log_every=100, eval_every=100)
    stop = types.SimpleNamespace(signum=None)
    train = train_module.Learning.train

    def stopped_before_the_first_updates(self, step, stopping):
        stop.signum = 15 if self.owed else None
        train(self, step, stopping)

    monkeypatch.setattr(train_module.Learning, "train", stopped_before_the_first_updates)
    train_module.train(config, stop)
    loop_file = tmp_path / "checkpoints" / "300" / "loop" / "metadata"
    assert json.loads(loop_file.read_text())["updates_owed"] > 5
    monkeypatch.undo()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module, "evaluate", full_disk)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    loop = json.loads(loop_file.read_text())
    assert loop["updates_owed"] == 0 and loop["updates"] > 5 and loop["next_eval"] == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0", "300"]


def test_a_row_after_a_stop_and_resume_counts_the_updates_and_episodes_before_the_stop(
    tmp_path, monkeypatch
):
    """Stopped at step 350 between the rows of 300 and 400, resumed: the row of 400 is the
    mean of every update after the row of 300, those before the stop too (recorded one by
    one here), and counts the episodes finished on both sides of the stop (the replay's)."""
    config = cartpole_config(tmp_path, steps=400, log_every=100, eval_every=10000)
    model_losses, check_inputs = [], train_module.check_inputs

    def recording_agent(*args):
        agent = check_inputs(*args)
        train_seeds = agent.train_seeds

        def recording(states, batch):
            states, metrics = train_seeds(states, batch)
            model_losses.append(float(metrics["model_loss"][0]))
            return states, metrics

        agent.train_seeds = recording
        return agent

    monkeypatch.setattr(train_module, "check_inputs", recording_agent)
    stop, train = types.SimpleNamespace(signum=None), train_module.Learning.train

    def stopping_after_step_350(self, step, stopping):
        train(self, step, stopping)
        stop.signum = 15 if step == 350 else None

    monkeypatch.setattr(train_module.Learning, "train", stopping_after_step_350)
    train_module.train(config, stop)
    assert [row["step"] for row in read_metrics(tmp_path / METRICS)] == [300]
    train_module.train(config, types.SimpleNamespace(signum=None))
    row_300, row_400 = read_metrics(tmp_path / METRICS)
    before_stop = json.loads((tmp_path / "checkpoints/350/loop/metadata").read_text())["updates"]
    assert row_300["updates"] < before_stop < row_400["updates"] == len(model_losses)
    expected = np.mean(model_losses[int(row_300["updates"]) : int(row_400["updates"])])
    assert row_400["model_loss"] == pytest.approx(expected, rel=1e-6)
    episodes = sorted((tmp_path / "replay").glob("*.npz"))
    assert len(episodes) == row_400["replay_episodes"]
    returns = [np.load(f)["reward"].sum() for f in episodes[int(row_300["replay_episodes"]) :]]
    assert row_400["train_episodes"] == len(returns) > 1
    assert row_400["train_return"] == pytest.approx(np.mean(returns), rel=1e-6)


def test_one_diverged_seed_is_reported_and_the_others_train_on(tmp_path, monkeypatch, capsys):
    config = cartpole_config(
        tmp_path, num_seeds=2, steps=900, eval_every=450, log_every=150, max_nonfinite=3
    )
    make_env, created = train_module.make_env, []

    def poisoned_make_env(config, num_envs, seeds):
        env = make_env(config, num_envs, seeds)
        created.append(env)
        return NonFiniteRewards(env, row=1) if len(created) == 1 else env  # seed 1's train env

    monkeypatch.setattr(train_module, "make_env", poisoned_make_env)
    train_module.train(config, types.SimpleNamespace(signum=None))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "non-finite" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: seed 1: 3 consecutive")
    learning, diverged = (read_metrics(tmp_path / f"seed_{s}" / "metrics.jsonl") for s in (0, 1))
    trained = [row for row in learning if "nonfinite" in row]
    assert len(trained) >= 3 and trained[-1]["step"] == 900
    assert all(row["nonfinite"] == 0 and row["model_loss"] is not None for row in trained)
    assert [row["nonfinite"] for row in diverged if "nonfinite" in row] == [1.0] * len(trained)
    assert analyze.stopped_learning(diverged) == trained[0]["frames"] == config.prefill
    assert analyze.stopped_learning(learning) is None


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


class RecordingEnv:
    """A real `VectorEnv` that records every action it is sent and every step it returns."""

    def __init__(self, env):
        self.env = env
        self.sent: list[np.ndarray] = []
        self.returned: list[dict[str, np.ndarray]] = [self.env.reset()]

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self):
        self.returned = [{k: v.copy() for k, v in self.env.reset().items()}]
        self.sent = []
        return self.returned[-1]

    def step(self, action, active=None):
        self.sent.append(np.array(action))
        self.returned.append({k: v.copy() for k, v in self.env.step(action, active).items()})
        return self.returned[-1]


def env_rows(recorder: RecordingEnv, discrete: bool) -> list[list[dict[str, np.ndarray]]]:
    """Per env, the replay rows it produced, in order: row t of env i is the step returned at
    t, with the action sent on the step that produced it (zeros on an episode's first row)."""
    streams = []
    for i in range(recorder.num_envs):
        rows = []
        # The last returned step is never recorded: the loop stops before adding it.
        for t, step in enumerate(recorder.returned[:-1]):
            row = {k: v[i] for k, v in step.items()}
            if step["is_first"][i]:
                action = np.zeros(recorder.num_actions)
            else:
                action = recorder.sent[t - 1][i]
                if discrete:
                    action = np.eye(recorder.num_actions)[np.argmax(action)]
            row["action"] = action
            row["policy"] = t > 0 and not step["is_first"][i]
            row["time"] = t
            rows.append(row)
        streams.append(rows)
    return streams


def expected_episodes(recorder: RecordingEnv, discrete: bool) -> list[dict[str, np.ndarray]]:
    """The episodes the replay must hold (`env_rows` cut at `is_last`): only episodes that
    ended before the run stopped."""
    episodes = []
    for rows in env_rows(recorder, discrete):
        current: list[dict] = []
        for row in rows:
            current = [] if row["is_first"] else current
            current.append(row)
            if row["is_last"]:
                episodes.append({k: np.stack([r[k] for r in current]) for k in current[0]})
    return episodes


def test_replay_record_holds_the_action_that_led_to_the_observation():
    """Row t's action is the one chosen at t - 1 (zeros on an episode's first step), in the
    replay's dtype; the observation and flags pass through unchanged."""
    obs = {"vector": np.arange(6, dtype=np.float32).reshape(3, 2),
           "is_first": np.array([True, False, False])}  # fmt: skip
    prev_action = np.eye(3, dtype=np.float32)[[1, 2, 0]]
    record = train_module.replay_record(obs, prev_action, {"action": ((3,), np.dtype(np.uint8))})
    assert record["action"].dtype == np.uint8
    np.testing.assert_array_equal(record["action"], [[0, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert record["vector"] is obs["vector"] and record["is_first"] is obs["is_first"]
    continuous = np.array([[0.5, -0.25], [-1.0, 0.75], [0.1, 0.2]], np.float32)
    record = train_module.replay_record(obs, continuous, {"action": ((2,), np.dtype(np.float32))})
    np.testing.assert_array_equal(record["action"], [[0, 0], *continuous[1:]])


class CountingEnv:
    """A fake env of 4 envs whose episodes last 3 + i steps: step t of env i observes
    `vector` [t, i], so each replay row names the env step it came from."""

    num_envs, num_actions, discrete = 4, 3, True
    step_spec = {
        "vector": ((2,), np.dtype(np.float32)),
        "action": ((3,), np.dtype(np.uint8)),
        "reward": ((), np.dtype(np.float32)),
        **{k: ((), np.dtype(bool)) for k in ("is_first", "is_last", "is_terminal")},
    }

    def __init__(self):
        self.t, self.sent, self.age = 0, [], np.zeros(4, int)

    def observe(self) -> dict[str, np.ndarray]:
        is_last = self.age == 2 + np.arange(4)
        return {"vector": np.stack([np.full(4, self.t), np.arange(4)], 1).astype(np.float32),
                "reward": np.ones(4, np.float32), "is_first": self.age == 0,
                "is_last": is_last, "is_terminal": is_last}  # fmt: skip

    def reset(self):
        self.t, self.age[:] = 0, 0
        return self.observe()

    def step(self, action):
        self.sent.append(np.array(action))
        self.t += 1
        self.age = np.where(self.age == 2 + np.arange(4), 0, self.age + 1)
        return self.observe()

    def random_actions(self, rng, num=None):
        return np.eye(3, dtype=np.float32)[rng.integers(0, 3, num or self.num_envs)]


def test_acting_records_at_each_step_the_action_chosen_at_the_step_before():
    """Acting's replay rows: row t of env i holds the action sent to env i at t - 1 (zeros on
    an episode's first step), and each seed's replay gets only its own envs. A past bug
    stored the actions shifted by one step; this checks it without an env or a model."""
    env, seeds = CountingEnv(), 2
    replays = [
        Replay(None, env.step_spec, capacity=1000, minlen=1, length=1, batch=1,
               prioritize_ends=False, seed=0)
        for _ in range(seeds)
    ]  # fmt: skip
    seed_states = [
        {"act_key": train_module._key_data(jax.random.key(i)),
         "random_rng": np.random.default_rng(i).bit_generator.state}
        for i in range(seeds)
    ]  # fmt: skip
    agent = types.SimpleNamespace(initial_carry=lambda envs, num: np.zeros((num, envs)))
    config = types.SimpleNamespace(envs=env.num_envs // seeds)
    acting = train_module.Acting(
        agent, config, env, replays, seed_states, None, train_module.Stopwatch()
    )
    for _ in range(20):
        acting.step(None, prefill=True)
    rows = 0
    for seed, replay in enumerate(replays):
        for episode in replay.episodes:
            steps = zip(episode["vector"].astype(int), episode["is_first"], strict=True)
            for row, ((t, i), first) in enumerate(steps):
                assert i // config.envs == seed and first == (row == 0)
                want = np.zeros(3) if first else env.sent[t - 1][i]
                np.testing.assert_array_equal(episode["action"][row], want, err_msg=(t, i))
                rows += 1
    assert rows >= 40 and len(env.sent) == 20
    assert not np.array_equal(env.sent[0], env.sent[1])  # the shift would show


@pytest.mark.parametrize(
    "presets, task",
    [(["classic", "debug"], "classic_cartpole"), (["atari", "debug"], "atari_pong")],
)
def test_replay_holds_exactly_what_the_envs_saw(tmp_path, monkeypatch, caplog, presets, task):
    """The whole data path in process, after the prefill too: every replay row is the step
    an env returned, with the exact one-hot action that produced it."""
    config = make_config(
        presets,
        {"task": task, "logdir": str(tmp_path), "envs": 2, "steps": 640, "prefill": 200,
         "eval_every": 320, "log_every": 320, "wandb.mode": "disabled"},
    )  # fmt: skip
    created, make_env = [], train_module.make_env

    def recording_make_env(config, num_envs, seeds):
        created.append(RecordingEnv(make_env(config, num_envs, seeds)))
        return created[-1]

    monkeypatch.setattr(train_module, "make_env", recording_make_env)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        train_module.train(config, types.SimpleNamespace(signum=None))
    # The policy compiles once per mode (train, eval), the update once: every input is placed
    # as the outputs that feed it back are.
    compiled = [
        r.getMessage().split()[1] for r in caplog.records if "Compiling jit(" in r.getMessage()
    ]
    assert (compiled.count("jit(_act_seeds)"), compiled.count("jit(_train_step)")) == (2, 1)

    (env,) = [e for e in created if e.num_envs == 2]
    # Evaluation used its own envs: the training envs were stepped once per loop iteration.
    assert len(env.sent) == config.steps // 2
    assert any(len(e.sent) for e in created if e is not env)
    expected = expected_episodes(env, env.discrete)
    obs_key = next(k for k in ("image", "vector") if k in expected[0])
    unmatched = {}
    for episode in expected:
        unmatched.setdefault(episode[obs_key].tobytes(), []).append(episode)
    files = sorted((tmp_path / "replay").glob("*.npz"))
    assert len(files) == len(expected)
    policy_rows = 0
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            stored = {k: data[k] for k in data.files}
        want = unmatched[stored[obs_key].tobytes()].pop()
        for key in stored:
            np.testing.assert_array_equal(stored[key], want[key], err_msg=f"{path.name}: {key}")
        assert stored["action"].dtype == (np.uint8 if env.discrete else np.float32)
        assert (stored["action"][1:].sum(-1) == 1).all() and (stored["action"][0] == 0).all()
        policy_rows += int(want["policy"][want["time"] > config.prefill // 2].sum())
    assert policy_rows >= 100  # episodes the agent played, not only the prefill's


@pytest.mark.parametrize("ongoing", [False, True])
def test_ongoing_replay_trains_on_the_steps_of_unfinished_episodes(tmp_path, monkeypatch, ongoing):
    """Random acrobot episodes run to the 500-step limit, so none ends in this run: the paper's
    replay (finished episodes only) never trains; with `replay.ongoing` the learner trains on
    chunks that are exactly consecutive rows of an env's episode in progress."""
    config = make_config(
        ["classic", "debug"],
        {"task": "classic_acrobot", "logdir": str(tmp_path), "envs": 2, "steps": 400,
         "prefill": 100, "time_limit": 0, "eval_every": 100_000, "log_every": 200,
         "replay.ongoing": ongoing, "wandb.mode": "disabled"},
    )  # fmt: skip
    created, batches, make_env = [], [], train_module.make_env

    def recording_make_env(config, num_envs, seeds):
        created.append(RecordingEnv(make_env(config, num_envs, seeds)))
        return created[-1]

    class RecordingReplay(train_module.Replay):
        def dataset(self):
            for batch in super().dataset():
                batches.append(batch)
                yield batch

    monkeypatch.setattr(train_module, "make_env", recording_make_env)
    monkeypatch.setattr(train_module, "Replay", RecordingReplay)
    loop = train_module.train(config, types.SimpleNamespace(signum=None))
    env = created[0]
    assert not any(step["is_last"].any() for step in env.returned)  # no episode ended
    if not ongoing:
        assert loop["updates"] == 0 and not list(tmp_path.glob("replay/*.npz"))
        return
    assert loop["updates"] >= (config.steps - config.prefill) // config.train_every
    streams = [{k: np.stack([r[k] for r in rows]) for k in rows[0]} for rows in env_rows(env, True)]
    length = config.dataset.length
    chunks = [
        {k: v[b] for k, v in batch.items()}
        for batch in batches
        for b in range(len(batch["reward"]))
    ]
    ends = []
    for chunk in chunks:
        # The chunk's first observation locates it in one env's stream.
        found = [
            (i, t)
            for i, stream in enumerate(streams)
            for t in range(len(stream["vector"]) - length + 1)
            if np.array_equal(stream["vector"][t], chunk["vector"][0])
        ]
        assert len(found) == 1
        i, t = found[0]
        for key, value in chunk.items():
            want = streams[i][key][t : t + length].astype(value.dtype)
            want[0] = True if key == "is_first" else want[0]
            np.testing.assert_array_equal(value, want, err_msg=key)
        ends.append(t + length - 1)
    # Not only the prefill's rows: the learner saw steps its own policy played.
    assert max(ends) > config.prefill // config.envs


def _files(logdir):
    return {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file() and p.name != ".lock"}


def _one_error_line(result, fragment):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and fragment in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A short classic run with checkpoints at 0, 400 and 800, to copy and damage."""
    logdir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "800")
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir


def _copy_run(finished_run, tmp_path):
    import shutil

    logdir = tmp_path / "run"
    shutil.copytree(finished_run, logdir)
    return logdir


def test_logdir_with_data_but_no_checkpoint_is_refused(finished_run, tmp_path):
    import shutil

    logdir = _copy_run(finished_run, tmp_path)
    shutil.rmtree(logdir / "checkpoints")
    before = _files(logdir)
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200", timeout=300)
    _one_error_line(result, "no checkpoint; refusing to start over")
    assert _files(logdir) == before


def test_unreadable_latest_checkpoint_is_moved_aside_and_the_run_continues(finished_run, tmp_path):
    logdir = _copy_run(finished_run, tmp_path)
    state_files = [p for p in (logdir / "checkpoints" / "800" / "state").rglob("*") if p.is_file()]
    max(state_files, key=lambda p: p.stat().st_size).unlink()
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint at step 400" in result.stdout
    assert (logdir / "checkpoints" / "1200").is_dir()
    assert list((logdir / "checkpoints_unreadable").iterdir())  # kept, not deleted
    steps = [row["step"] for row in read_metrics(logdir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 1200


def test_episodes_finished_after_the_restored_checkpoint_are_set_aside(finished_run, tmp_path):
    """As after a kill: two episodes finished after the checkpoint at 800 (copies of the last
    two, with the next indices). The resumed run collects those steps again, so the replay it
    loads is the checkpoint's, and the two files are kept in replay_after_checkpoint/800."""
    logdir = _copy_run(finished_run, tmp_path)
    replay = logdir / "replay"
    files = sorted(p.name for p in replay.glob("*.npz"))
    last = int(files[-1].split("-")[0])
    late = [f"{last + 1 + i:08d}-{name.split('-')[1]}" for i, name in enumerate(files[-2:])]
    for source, name in zip(files[-2:], late, strict=True):
        (replay / name).write_bytes((replay / source).read_bytes())
    (replay / files[0]).write_bytes(b"garbage\n")  # skipped, in one warning line
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200")
    assert result.returncode == 0, result.stderr[-3000:]
    warned = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    sampleable = sum(1 for name in files[1:] if int(name.split("-")[1][:-4]) >= 10)
    assert warned == [
        f"warning: replay: skipping episode file {replay / files[0]}: not an .npz (zip) archive",
        f"warning: seed 0: the replay holds {sampleable} episodes where its checkpoint at step "
        f"800 had {sampleable + 1} (files missing or unreadable): the run goes on, but no longer "
        "as an uninterrupted one would",
    ]
    assert (
        f"replay: 2 episode file(s) of {logdir} finished after the checkpoint at step 800; set "
        f"aside in {logdir / 'replay_after_checkpoint' / '800'} (their" in result.stdout
    )
    assert sorted(p.name for p in (logdir / "replay_after_checkpoint" / "800").iterdir()) == late
    loaded = re.search(r"\(replay: (\d+) episodes", result.stdout)
    assert loaded and int(loaded.group(1)) == sampleable  # the checkpoint's replay only


def test_shape_changing_config_change_is_one_line(finished_run, tmp_path):
    logdir = _copy_run(finished_run, tmp_path)
    before = _files(logdir)
    result = run_cli(
        *CLASSIC, "--logdir", str(logdir), "--resume.allow_config_change", "true",
        "--rssm.deter", "48", timeout=300,
    )  # fmt: skip
    _one_error_line(result, "shape")
    assert _files(logdir) == before


@pytest.mark.parametrize("text", ["{unclosed: [", "just a string\n"])
def test_corrupt_config_yaml_is_one_line(finished_run, tmp_path, text):
    logdir = _copy_run(finished_run, tmp_path)
    (logdir / "config.yaml").write_text(text)
    before = _files(logdir)
    result = run_cli(*CLASSIC, "--logdir", str(logdir), timeout=300)
    _one_error_line(result, "config.yaml")
    assert _files(logdir) == before


def test_a_run_without_its_config_yaml_is_refused(finished_run, tmp_path):
    """Without the saved config neither a seed change nor a config change could be found:
    this would resume the run as seed 5 and write that into a new config.yaml."""
    logdir = _copy_run(finished_run, tmp_path)
    (logdir / "config.yaml").unlink()
    before = _files(logdir)
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--seed", "5", timeout=300)
    _one_error_line(result, "holds checkpoints but no config.yaml")
    assert _files(logdir) == before


@pytest.mark.parametrize("damage", ["replay is a file", "metrics.jsonl is a directory"])
def test_a_resume_that_cannot_write_its_files_is_refused_before_anything_moves(
    finished_run, tmp_path, damage
):
    """Found before the restore, which would otherwise set the damaged latest checkpoint
    aside (and cut metrics.jsonl back) before failing on the replay or the metrics."""
    import shutil

    logdir = _copy_run(finished_run, tmp_path)
    loop_file = logdir / "checkpoints" / "800" / "loop" / "metadata"
    loop_file.write_text(loop_file.read_text().replace('"step": 800', '"step": 801'))
    if damage == "replay is a file":
        shutil.rmtree(logdir / "replay")
        (logdir / "replay").write_text("")
        fragment = f"replay directory {logdir / 'replay'} is a file"
    else:
        (logdir / METRICS).unlink()
        (logdir / METRICS).mkdir()
        fragment = f"{logdir / METRICS} is not a file"
    before = _files(logdir)
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200", timeout=300)
    _one_error_line(result, fragment)
    assert _files(logdir) == before and not (logdir / "checkpoints_unreadable").exists()


def test_a_logdir_inside_another_run_is_refused(finished_run, tmp_path):
    logdir = _copy_run(finished_run, tmp_path)
    before = _files(logdir)
    result = run_cli(*CLASSIC, "--logdir", str(logdir / "replay" / "new"), timeout=300)
    _one_error_line(result, f"is inside the run in {logdir}: train in a folder outside it")
    assert _files(logdir) == before and not (logdir / "replay" / "new").exists()


def test_malformed_metrics_line_in_the_middle_is_skipped(finished_run, tmp_path):
    logdir = _copy_run(finished_run, tmp_path)
    path = logdir / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "1200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "metrics.jsonl:2" in result.stderr
    steps = [row["step"] for row in read_metrics(logdir / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 1200


def test_unknown_task_creates_nothing(tmp_path):
    logdir = tmp_path / "run"
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--task", "atari_pongg", timeout=120)
    _one_error_line(result, "unknown task")
    assert not logdir.exists()


def test_second_run_in_a_logdir_is_refused_naming_the_first(tmp_path):
    import signal

    logdir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "dreamer_jax.train", *CLASSIC, "--logdir", str(logdir),
         "--steps", "100000"],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert "dreamer-jax:" in first.stdout.readline()
        second = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "100000", timeout=300)
        _one_error_line(second, f"pid {first.pid}")
        assert "resuming" not in second.stdout
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        first.kill()


def test_error_inside_the_loop_saves_a_checkpoint(tmp_path, monkeypatch):
    config = cartpole_config(tmp_path, steps=2000, eval_every=500, checkpoint_every=100_000)

    def broken_report(*args):
        raise RuntimeError("report failed")

    monkeypatch.setattr(train_module, "open_loop_frames", broken_report)
    with pytest.raises(RuntimeError, match="report failed"):
        train_module.train(config, types.SimpleNamespace(signum=None))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] >= config.prefill  # the first eval comes after the prefill's updates


def test_out_of_memory_batch_is_one_line_naming_dataset_batch(tmp_path):
    result = run_cli(
        "--configs", "atari", "debug", "--task", "atari_pong", "--logdir", str(tmp_path / "run"),
        "--steps", "400", "--prefill", "200", "--time_limit", "100", "--wandb.mode", "disabled",
        "--dataset.batch", "10000000", timeout=600,
    )  # fmt: skip
    _one_error_line(result, "out of memory with dataset.batch 10000000")
    assert "GiB" in result.stderr


def test_out_of_memory_message_names_the_sizes_of_the_memory_that_ran_out():
    """XLA's allocation: the batch (and the seeds when several); the host's (numpy's
    MemoryError: a sampled batch, or the replays growing) also the replay capacity (review:
    it blamed the batch alone)."""
    single = make_config(["classic"], {"dataset.batch": 64, "replay.capacity": 1000})
    xla = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.00GiB")
    assert train_module.out_of_memory_message(single, xla, "3.00GiB") == (
        "out of memory with dataset.batch 64 (an allocation of 3.00GiB failed); "
        "use a smaller --dataset.batch"
    )
    several = single.update({"num_seeds": 8})
    assert train_module.out_of_memory_message(several, xla, "3.00GiB") == (
        "out of memory with dataset.batch 64 and num_seeds 8 (an allocation of 3.00GiB "
        "failed); use a smaller --dataset.batch or fewer --num_seeds"
    )
    host = MemoryError("Unable to allocate 3.00 GiB for an array")
    assert train_module.out_of_memory_message(several, host, "3.00GiB") == (
        "out of memory with dataset.batch 64 and replay.capacity 1000 and num_seeds 8 (an "
        "allocation of 3.00GiB failed); use a smaller --dataset.batch or --replay.capacity or "
        "fewer --num_seeds"
    )


STOP_PROGRAM = """
import hashlib
from dreamer_jax.train import StopSignal
with StopSignal() as stop:
    print("busy", flush=True)
    hashlib.pbkdf2_hmac("sha256", b"p", b"s", 400_000_000)  # a long C call, like an XLA compile
    print("done", stop.signum, flush=True)
"""


def test_first_ctrl_c_is_acknowledged_at_once_and_a_second_quits():
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-c", STOP_PROGRAM], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "busy"
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        lines = [process.stdout.readline(), process.stdout.readline()]
        acknowledged = "".join(lines)
        # Acknowledged while the C call still runs: the program has not printed "done".
        assert "stopping after this step" in acknowledged and "Ctrl-C again" in acknowledged
        assert "done" not in acknowledged and process.poll() is None
        time.sleep(
            train_module.StopSignal.REPEAT_SECONDS + 0.5
        )  # a repeat within it is the same request
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT
    assert "quitting now" in rest and "done" not in rest


def test_a_signal_sent_twice_within_a_second_is_one_stop_request():
    """`timeout` and some schedulers signal the process and its group: that is one request,
    which checkpoints, not a second signal that quits without the final checkpoint."""
    import signal
    import time

    program = (
        "import time\nfrom dreamer_jax.train import StopSignal\n"
        "with StopSignal() as stop:\n    print('busy', flush=True)\n"
        "    while stop.signum is None: time.sleep(0.01)\n"
        "    time.sleep(0.5)\n    print('stopped', stop.signum, flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "busy"
        process.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # delivered apart (pending ones would merge in the kernel), within 1 s
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "stopped 15" in output and "quitting now" not in output
    assert output.count("stopping after this step") == 1


def test_a_signal_after_the_run_has_ended_says_so():
    """Not the start-up handler's "nothing written yet": by then everything is written."""
    program = (
        "import os, signal, time\nfrom dreamer_jax.train import StopSignal\n"
        "with StopSignal():\n    pass\n"
        "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 130
    assert result.stderr.strip() == "signal 2: quitting; the run had already ended"


def test_a_stop_request_leaves_the_pretraining_and_the_evaluation_owed(tmp_path):
    """A stop request does not wait for the one-off pretraining or a long evaluation (an
    Atari evaluation takes minutes, longer than a scheduler waits after its signal): both
    stay owed in the checkpoint, for the resumed run to do first."""
    import signal
    import time

    logdir = tmp_path / "run"
    args = ["--prefill", "1", "--pretrain", "100000", "--eval_eps", "100000"]
    command = [sys.executable, "-m", "dreamer_jax.train", *CLASSIC, "--logdir", str(logdir)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        command + args + ["--steps", "100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # The first stored episode makes the replay ready: the pretraining is owed from then.
        deadline = time.time() + 600
        while not any((logdir / "replay").glob("*.npz")) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)  # into the first update's compile: milliseconds after that episode
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-2000:]
    stopped = int(output.split("stopping on signal 15 at step ")[1].split()[0])
    assert "updates, the evaluation and the log row left for the resumed run" in output
    loop = json.loads((logdir / "checkpoints" / str(stopped) / "loop" / "metadata").read_text())
    assert loop["updates"] >= 1 and loop["updates_owed"] > 90000
    assert loop["next_eval"] == 0 and "eval_return" not in output


def test_on_a_terminal_the_last_lines_come_after_the_bar_not_on_it(tmp_path):
    """With the progress bar on a terminal, the run's last lines each start a line of their
    own and the bar is not drawn again below them (it was: 'checkpoint saved' came glued to
    the bar, which reappeared under the final returns)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    command = [sys.executable, "-m", "dreamer_jax.train", *CLASSIC, "--steps", "400"]
    process = subprocess.Popen(
        command + ["--logdir", str(tmp_path / "run")], cwd=ROOT, stdout=follower,
        stderr=follower, env=dict(os.environ, WANDB_SILENT="true"),
    )  # fmt: skip
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=600) == 0
    finally:
        process.kill()
        os.close(leader)
    screen = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    assert "frame/s" in screen  # the bar was drawn
    saved = screen.index("checkpoint saved at step 400")
    assert screen[saved - 1] == "\n", screen[saved - 200 : saved + 50]
    assert "\r" not in screen[saved:], screen[saved:]


SEEDS = [*CLASSIC, "--steps", "800", "--eval_every", "400"]


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    """`--num_seeds 2 --seed 1` (wandb offline), and the single run `--seed 2` it must contain."""
    root = tmp_path_factory.mktemp("seeds")
    both = ["--num_seeds", "2", "--seed", "1", "--wandb.mode", "offline"]
    for name, extra in (("both", both), ("alone", ["--seed", "2"])):
        result = run_cli(*SEEDS, "--logdir", str(root / name), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        (root / f"{name}.out").write_text(result.stdout)
    return root


def test_each_seed_has_the_folder_of_a_single_run(two_seed_run):
    logdir = two_seed_run / "both"
    assert yaml.safe_load((logdir / "config.yaml").read_text())["num_seeds"] == 2
    assert (logdir / "checkpoints").is_dir() and not (logdir / "metrics.jsonl").exists()
    for seed in (1, 2):
        folder = logdir / f"seed_{seed}"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["seed"] == seed and saved["num_seeds"] == 1
        assert saved["logdir"] == str(folder)
        assert read_metrics(folder / "metrics.jsonl")
        assert list(folder.glob("events.out.tfevents.*")) and list(folder.glob("openl_*.gif"))
        assert list((folder / "replay").glob("*.npz"))
        # Its own wandb run, holding its own rows (not another seed's).
        (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        logged = {row["_step"]: row for row in wandb_history(run_file)}
        for row in read_metrics(folder / "metrics.jsonl"):
            scalars = {
                k: v for k, v in row.items() if k not in ("step", "frames") and v is not None
            }
            assert {k: logged[row["step"]][k] for k in scalars} == pytest.approx(scalars)


def test_each_seeds_wandb_config_is_its_config_yaml_with_its_group(tmp_path, monkeypatch):
    config = cartpole_config(tmp_path / "two", num_seeds=2, seed=3)
    opened = []
    monkeypatch.setattr(train_module, "Logger", lambda *args, **kwargs: opened.append(args))
    train_module._make_logger(config, tmp_path / "two", {}, 0, False, 1)
    (folder, logged), group = opened[0], "classic_cartpole-two"
    assert folder == tmp_path / "two" / "seed_4"
    assert logged["logdir"] == str(folder) and logged["seed"] == 4 and logged["num_seeds"] == 1
    assert logged["wandb.group"] == group


def test_the_run_ends_with_each_seeds_latest_returns(two_seed_run):
    last_lines = (two_seed_run / "both.out").read_text().splitlines()[-2:]
    for seed, line in zip((1, 2), last_lines, strict=True):
        rows = read_metrics(two_seed_run / "both" / f"seed_{seed}" / "metrics.jsonl")
        evals = [r for r in rows if r.get("eval_return") is not None]
        trains = [r for r in rows if r.get("train_return") is not None]
        assert evals and trains
        assert line == (
            f"seed {seed}: eval_return {evals[-1]['eval_return']:.4g} (step {evals[-1]['step']}), "
            f"train_return {trains[-1]['train_return']:.4g} (step {trains[-1]['step']})"
        )


def test_each_log_step_shows_every_seeds_returns(two_seed_run):
    lines = [
        line for line in (two_seed_run / "both.out").read_text().splitlines()
        if line.startswith("seeds 1 2: ")
    ]  # fmt: skip
    rows = [read_metrics(two_seed_run / "both" / f"seed_{s}" / "metrics.jsonl") for s in (1, 2)]
    assert len(lines) == len(rows[0]) == len(rows[1]) > 1
    # The format is tested by hand in test_logger; here: one line per step, from these rows.
    for line, *step_rows in zip(lines, *rows, strict=True):
        assert line == seeds_line([1, 2], step_rows)
    assert any("eval_return" in line for line in lines)


def test_latest_returns_skips_null_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 100, "train_return": 3.0, "eval_return": 12.25},
            {"step": 200, "train_return": 4.5, "eval_return": None},  # non-finite, as logged
            {"step": 300, "model_loss": 1.0}]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = "seed 7: eval_return 12.25 (step 100), train_return 4.5 (step 200)"
    assert train_module.latest_returns(7, path) == line
    path.write_text(json.dumps({"step": 5, "model_loss": 1.0}) + "\n")
    assert train_module.latest_returns(0, path) == "seed 0: no return logged yet"
    path.unlink()  # a run that never reached its first log
    assert train_module.latest_returns(0, path) == "seed 0: no return logged yet"


def _assert_same_run(together, alone):
    """The seed folder `together` saw the same envs, took the same actions and learned the
    same (up to float rounding of batched matmuls) as the single run in `alone`."""
    files = sorted(p.name for p in (together / "replay").glob("*.npz"))
    assert files == sorted(p.name for p in (alone / "replay").glob("*.npz")) and files
    for name in files:
        with np.load(together / "replay" / name) as a, np.load(alone / "replay" / name) as b:
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    rows_together = _comparable(read_metrics(together / "metrics.jsonl"))
    rows_alone = _comparable(read_metrics(alone / "metrics.jsonl"))
    assert [r.keys() for r in rows_together] == [r.keys() for r in rows_alone]
    for a, b in zip(rows_together, rows_alone, strict=True):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)
    return rows_together


def test_a_seed_of_a_many_seed_run_is_that_single_run(two_seed_run):
    rows = _assert_same_run(two_seed_run / "both" / "seed_2", two_seed_run / "alone")
    other = read_metrics(two_seed_run / "both" / "seed_1" / "metrics.jsonl")
    assert other[-1]["model_loss"] != rows[-1]["model_loss"]


def test_each_seed_evaluates_from_its_folder(two_seed_run):
    logdir = two_seed_run / "both"
    command = [sys.executable, "-m", "dreamer_jax.eval", "--episodes", "2"]
    result = subprocess.run(
        [*command, "--logdir", str(logdir / "seed_2")], cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "classic_cartpole seed 2 step 800" in result.stdout  # the seed it evaluated
    whole = subprocess.run(
        [*command, "--logdir", str(logdir)], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert whole.returncode == 2 and "holds seeds 1, 2; load one" in whole.stderr


def test_a_many_seed_run_keeps_its_seeds_and_its_seed_folders_are_not_runs(two_seed_run):
    """Training in a seed folder, or resuming with other seeds (even with config changes
    allowed: the checkpoint's seed axis holds 2), is one line and exit 2, nothing touched."""
    logdir = two_seed_run / "both"
    snapshot = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    folder = run_cli(*SEEDS, "--logdir", str(logdir / "seed_2"), "--seed", "2")
    assert folder.returncode == 2
    assert folder.stderr == (
        f"error: {logdir / 'seed_2'} is a seed folder of the 2-seed run in {logdir}: resume "
        f"that run (--logdir {logdir}), or evaluate this seed (dreamer-eval --logdir "
        f"{logdir / 'seed_2'})\n"
    )
    allow = ["--resume.allow_config_change", "true"]
    # One seed on either side too: resuming a many-seed run without --num_seeds.
    changes = (
        ["--num_seeds", "3", "--seed", "1"],
        ["--num_seeds", "2", "--seed", "0"],
        ["--seed", "1"],
    )
    for seeds in changes:
        other = run_cli(*SEEDS, "--logdir", str(logdir), *seeds, *allow)
        assert other.returncode == 2 and other.stderr.startswith(f"error: {logdir} holds seeds")
        assert "seeds 1, 2, not " in other.stderr and "a run's seeds cannot change" in other.stderr
    assert {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()} == snapshot


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["the folder", "its config.yaml"])
def test_a_many_seed_run_that_lost_a_seeds_folder_is_refused(two_seed_run, tmp_path, lost):
    """Resumed, seed 2 would go on from the checkpoint with an empty replay and a log that
    starts at the restored step, and its results would drop out of an analysis unnoticed."""
    import shutil

    logdir = tmp_path / "both"
    shutil.copytree(two_seed_run / "both", logdir)
    if lost == "the folder":
        shutil.rmtree(logdir / "seed_2")
    else:
        (logdir / "seed_2" / "config.yaml").unlink()
    before = _files(logdir)
    args = ["--num_seeds", "2", "--seed", "1", "--steps", "1200"]
    result = run_cli(*SEEDS, "--logdir", str(logdir), *args, timeout=300)
    _one_error_line(result, f"{logdir / 'seed_2'} or its config.yaml is missing")
    assert _files(logdir) == before


def test_a_resumed_many_seed_run_is_each_single_run_resumed(tmp_path):
    """Stopped at 400 and resumed to 800, seed 2 of the two-seed run is the single run of
    seed 2 stopped and resumed there: every seed's streams (acting, replay, eval, report)
    are in the one checkpoint."""
    runs = {"both": ["--num_seeds", "2", "--seed", "1"], "alone": ["--seed", "2"]}
    for name, extra in runs.items():
        for steps in ("400", "800"):
            result = run_cli(*SEEDS, "--steps", steps, "--logdir", str(tmp_path / name), *extra)
            assert result.returncode == 0, result.stderr[-3000:]
        assert "resuming from checkpoint at step 400" in result.stdout
    _assert_same_run(tmp_path / "both" / "seed_2", tmp_path / "alone")


def test_a_start_that_fails_before_training_records_no_start(tmp_path):
    # A file where a seed's folder belongs: one line before any log, event file or run.json.
    run = tmp_path / "seeds"
    run.mkdir()
    (run / "seed_1").write_text("not a folder")
    result = run_cli(*CLASSIC, "--num_seeds", "2", "--logdir", str(run), timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: log directory {run / 'seed_1'} is a file, not a directory\n"
    assert sorted(p.name for p in run.rglob("*")) == [".lock", "seed_0", "seed_1"]
    # wandb online without an API key (HOME without a netrc): checked before anything is
    # written, so not even the logdir is created.
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    result = subprocess.run(
        [sys.executable, "-m", "dreamer_jax.train", *CLASSIC, "--wandb.mode", "online",
         "--logdir", str(tmp_path / "online")],
        cwd=ROOT, env={**environ, "HOME": str(tmp_path)}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "needs an API key" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "online").exists()


def test_a_training_state_that_cannot_fit_is_one_line_before_anything_is_written(tmp_path):
    config = make_config(["classic", "debug"], {"num_seeds": 3})
    agent = make_agent(config)
    states = agent.init_seeds(init_keys(config))  # parameters, optimizer moments, slow critic
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states))
    train_module.check_state_fits(agent, config, 2 * need)
    with pytest.raises(train_module.RunError, match=r"of 3 seed\(s\) .* at least twice"):
        train_module.check_state_fits(agent, config, 2 * need - 1)
    # The CLI: a typo in a size, refused before the logdir exists.
    result = run_cli(*CLASSIC, "--rssm.deter", "200000", "--logdir", str(tmp_path / "run"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "needs 1341.9 GiB" in result.stderr and not (tmp_path / "run").exists()


def test_the_progress_bar_moves_between_rows_at_most_every_tick(monkeypatch):
    moved = []
    logger = types.SimpleNamespace(progress=lambda step, info: moved.append((step, info)))
    clock = [100.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])
    loop = {"step": 0, "updates": 0, "next_log": 0, "last_row": None}
    logging = train_module.Logging(
        make_config(["classic", "debug"]), [logger], [], loop, train_module.Stopwatch()
    )
    for step in range(1, 9):  # 0.2 s per step: one tick every 3 steps
        clock[0] += 0.2
        logging.tick(step)
    assert moved == [(3, {}), (6, {})]


def test_an_atari_task_without_the_atari_frame_skip_is_warned_of():
    warning = train_module.atari_protocol_warning(make_config([], {"task": "atari_pong"}))
    assert warning.startswith("warning: atari_pong runs with action_repeat 1, not the Atari")
    assert "--configs atari?" in warning
    assert train_module.atari_protocol_warning(make_config(["atari"], {})) is None
    assert train_module.atari_protocol_warning(make_config(["classic"], {})) is None


def test_replay_memory_warning_counts_every_seed():
    spec = {"image": ((64, 64, 1), np.uint8), "action": ((18,), np.uint8),
            "reward": ((), np.float32), "is_first": ((), bool), "is_last": ((), bool),
            "is_terminal": ((), bool)}  # fmt: skip
    config = make_config(["atari"], {"num_seeds": 8})  # 2e6 steps × 4121 B × 8 = 61.4 GiB
    warning = train_module.replay_memory_warning(config, spec, 64 * 2**30)
    assert warning and "replay of 8 seed(s) grows to 61.4 GiB" in warning
    assert "--replay.capacity" in warning
    assert train_module.replay_memory_warning(config, spec, 128 * 2**30) is None
    single = make_config(["atari"])
    assert train_module.replay_memory_warning(single, spec, 64 * 2**30) is None
    short = make_config(["atari"], {"num_seeds": 8, "steps": 100_000})  # never fills up
    assert train_module.replay_memory_warning(short, spec, 64 * 2**30) is None


def test_a_run_that_ends_within_the_prefill_says_so_and_logs_its_last_step(tmp_path):
    logdir = tmp_path / "run"
    result = run_cli(*CLASSIC, "--logdir", str(logdir), "--steps", "100", "--prefill", "300")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--steps 100 ends within the prefill (300" in result.stderr
    (row,) = read_metrics(logdir / "metrics.jsonl")
    assert row["step"] == 100 and row["updates"] == 0 and row["replay_steps"] > 0
    assert "no return logged yet" not in result.stdout


def test_learning_owes_train_steps_per_train_every_crossed_and_the_pretraining_once():
    """`Learning.owe` with 3 envs (the step moves 3 a policy step, past most multiples of
    train_every 10, not onto them): from the end of the prefill (step 300) to 600, each of
    the 31 multiples of 10 in [300, 600] owes 2 updates once, plus the pretraining (5) once:
    67."""
    config = make_config(
        ["classic", "debug"], {"envs": 3, "train_steps": 2, "pretrain": 5, "prefill": 300}
    )
    replay = types.SimpleNamespace(ready=True, dataset=lambda: iter(()))
    loop = {"updates": 0, "updates_owed": 0, "seeds": [{}]}
    logger = types.SimpleNamespace(message=lambda text: None)
    learning = train_module.Learning(
        None, config, [replay], None, loop, logger, None, train_module.Stopwatch()
    )
    owed = {}
    for step in range(3, 601, 3):  # as the loop calls it, after each policy step
        learning.owe(step)
        if learning.owed:
            owed[step] = learning.owed
        learning.updates, learning.owed = learning.updates + learning.owed, 0  # paid
    assert min(owed) == 300 and owed[300] == 5 + 2  # the pretraining, and crossing 300
    assert 303 not in owed and owed[312] == owed[330] == 2  # 312 crosses 310, 330 itself
    assert learning.updates == 5 + 2 * 31


def test_learning_owes_nothing_until_every_seeds_replay_can_be_sampled():
    """Two seeds, the second's replay not ready at the end of the prefill: no update is owed
    (one would sample its empty replay), and the wait is said once, naming that seed."""
    config = make_config(["classic", "debug"], {"num_seeds": 2, "prefill": 300})
    replays = [
        types.SimpleNamespace(ready=ready, dataset=lambda: iter(())) for ready in (True, False)
    ]
    loop = {"updates": 0, "updates_owed": 0, "seeds": [{}, {}]}
    messages = []
    logger = types.SimpleNamespace(message=messages.append)
    learning = train_module.Learning(
        None, config, replays, None, loop, logger, None, train_module.Stopwatch()
    )
    for step in (300, 310, 320):
        learning.owe(step)
    assert learning.owed == 0 and len(messages) == 1
    assert messages[0].startswith("step 300: seed 1 stored no episode")
    replays[1].ready = True
    learning.owe(330)
    assert learning.owed == config.pretrain + config.train_steps


def test_env_seed_is_the_seed_when_fresh_and_a_new_one_per_resumed_step_and_offset():
    """A fresh run's envs take its seed (+ the eval offset); a resume reseeds from (seed,
    step, offset): not the fresh run's episodes again, other episodes for another step or
    the eval envs, and the same for two resumes of one checkpoint."""
    offset = train_module.TRAIN_EVAL_SEED_OFFSET
    assert train_module.env_seed(3, 0, False) == 3
    assert train_module.env_seed(3, 800, False, offset) == 3 + offset
    resumed = {
        (seed, step, off): train_module.env_seed(seed, step, True, off)
        for seed in (3, 4) for step in (400, 800) for off in (0, offset)
    }  # fmt: skip
    assert len(set(resumed.values()) | {3, 4, 3 + offset, 4 + offset}) == 8 + 4
    assert resumed[3, 800, 0] == train_module.env_seed(3, 800, True)


def test_schedules_stay_on_their_multiples_when_the_step_moves_past_them(tmp_path, monkeypatch):
    """3 envs: the step moves 3 a policy step (0, 3, ..., 300, 303, ...), past most
    multiples. Each schedule's next step is its next multiple, not the step it fired at plus
    its interval: evals (every 200) at 300 (the first update), 402 and 600; log rows (every
    250) at 300, 501 and the last step 600, with the eval of 402 in a row of its own;
    checkpoints (every 250) at 0, 252, 501 and 600. Updates: the pretraining (1) and one per
    multiple of 10 in [300, 600] (31)."""
    config = cartpole_config(
        tmp_path, steps=600, envs=3, eval_every=200, log_every=250, checkpoint_every=250
    )
    saves, save = [], train_module.Checkpointer.save

    def recorded_save(self, step, *args):
        saves.append(step)
        return save(self, step, *args)

    monkeypatch.setattr(train_module.Checkpointer, "save", recorded_save)
    train_module.train(config, types.SimpleNamespace(signum=None))
    rows = read_metrics(tmp_path / METRICS)
    assert [row["step"] for row in rows] == [300, 402, 501, 600]
    assert [row["step"] for row in rows if row.get("eval_return") is not None] == [300, 402, 600]
    assert saves == [0, 252, 501, 600]
    assert rows[-1]["updates"] == 1 + 31


def test_owed_work_names_the_updates_and_an_evaluation_or_row_due_after_an_update():
    """What a stop leaves: the owed updates, the evaluation once its step is reached (none
    before the first update: in the prefill nothing is evaluated), the log row due there,
    and at the run's last step (400) a last row not yet written."""

    def loop(owed, updates, step, next_eval, next_log=None, last_row=None):
        return {"updates_owed": owed, "updates": updates, "step": step, "next_eval": next_eval,
                "next_log": step + 1 if next_log is None else next_log,
                "last_row": step if last_row is None else last_row}  # fmt: skip

    owed_work = lambda loop: train_module.owed_work(loop, 400)
    assert owed_work(loop(0, 0, 200, 0)) == []
    assert owed_work(loop(1, 5, 399, 400)) == ["1 update"]
    assert owed_work(loop(3, 5, 400, 400)) == ["3 updates", "the evaluation"]
    assert owed_work(loop(0, 5, 350, 400, next_log=350)) == ["the log row"]
    assert owed_work(loop(0, 0, 350, 400, next_log=350)) == []  # no row before an update
    assert owed_work(loop(0, 5, 400, 500, last_row=350)) == ["the log row"]
    assert owed_work(loop(0, 5, 399, 500, last_row=350)) == []  # not the last step
    old = {"updates_owed": 0, "updates": 5, "step": 400, "next_eval": 500}  # no row counters
    assert owed_work(old) == []


def test_the_eval_row_holds_the_mean_return_and_length_of_the_evaluated_episodes(
    tmp_path, monkeypatch
):
    """The episodes of an evaluation (returns 1, 2 and 6, lengths 10, 20 and 30 here) are
    logged as their means, 3 and 20, not as one episode's."""
    result = eval_module.Evaluation([1.0, 2.0, 6.0], [10, 20, 30], [])
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kwargs: [result])
    train_module.train(cartpole_config(tmp_path, steps=300), types.SimpleNamespace(signum=None))
    (row,) = read_metrics(tmp_path / METRICS)
    assert (row["step"], row["eval_return"], row["eval_length"]) == (300, 3.0, 20.0)


def test_time_update_holds_every_updates_device_time_not_only_the_last(monkeypatch):
    """With several updates owed in one call (pretraining, `train_steps` > 1), each one's
    device time counts as `time_update`, not only the last's (review: the earlier ones were
    waited for by the next update's finiteness check, outside every section)."""
    clock = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock[0])

    class Pending:  # a device result: reading it waits for its update (1 s), once
        def __init__(self):
            self.ready = False

        def block_until_ready(self):
            if not self.ready:
                clock[0] += 1.0
                self.ready = True
            return self

        def __array__(self, dtype=None, copy=None):
            self.block_until_ready()
            return np.zeros(1, np.int32)

    pending = lambda states, batch: (states, {"nonfinite_streak": Pending()})
    agent = types.SimpleNamespace(train_seeds=pending)
    config = make_config(["classic", "debug"], {"pretrain": 3, "max_nonfinite": 5})
    batch = {"vector": np.zeros((2, 2), np.float32)}
    replay = types.SimpleNamespace(
        ready=True, dataset=lambda: iter([batch] * 10), upcoming=lambda: batch
    )
    loop = {"updates": 0, "updates_owed": 3, "seeds": [{}]}
    logger = types.SimpleNamespace(message=lambda text: None)
    stopwatch = train_module.Stopwatch()
    learning = train_module.Learning(agent, config, [replay], None, loop, logger, {}, stopwatch)
    learning.train(300, lambda: False)
    assert learning.updates == 3
    assert stopwatch.seconds["update"] == 3.0, stopwatch.seconds["update"]
