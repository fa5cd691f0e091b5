"""dreamer_jax.analyze on synthetic run folders, against hand-computed values."""

import gzip
import json
import pathlib
import re
import subprocess
import sys
import warnings

import chex
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from dreamer_jax import analyze
from dreamer_jax.config import make_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The official (random, human_gamer, human_record) scores, typed in from the source file.
PONG = {"random": -20.7, "human_gamer": 14.6, "human_record": 21.0}
BREAKOUT = {"random": 1.7, "human_gamer": 30.5, "human_record": 864.0}
BOXING = {"random": 0.1, "human_gamer": 12.1, "human_record": 100.0}
GAMES = {"atari_pong": PONG, "atari_breakout": BREAKOUT, "atari_boxing": BOXING}
# Final gamer-normalized score per game and seed 0..3 of the synthetic sweep: distinct values,
# skewed so that median, mean and IQM all differ, and some seeds beat the human record.
GAMER = {
    "atari_pong": [0.0, 0.5, 1.0, 1.2],
    "atari_breakout": [0.1, 2.0, 3.0, 10.0],
    "atari_boxing": [0.0, 0.5, 1.0, 9.15],
}


def write_run(root, task, seed, rows, name=None, presets=None):
    """A run folder as train.py leaves it: config.yaml (of the `atari` preset for an Atari
    task unless `presets` says otherwise) and metrics.jsonl of `rows`."""
    path = root / (name or f"{task}/seed_{seed}")
    path.mkdir(parents=True)
    if presets is None:
        presets = ["atari"] if task.startswith("atari_") else []
    make_config(presets, {"task": task, "seed": seed}).save(path / "config.yaml")
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def eval_rows(pairs, last_frames=None):
    """Rows with `eval_return` at the given (frames, value) pairs, then a train-only row at
    `last_frames` if given."""
    rows = [{"step": f // 4, "frames": f, "eval_return": v, "train_return": 0.0} for f, v in pairs]
    if last_frames is not None:
        rows.append({"step": last_frames // 4, "frames": last_frames, "model_loss": 1.0})
    return rows


def score(game, gamer):
    """The raw return that normalizes to `gamer` on `game`."""
    low, high = GAMES[game]["random"], GAMES[game]["human_gamer"]
    return low + gamer * (high - low)


@pytest.fixture
def sweep(tmp_path):
    """3 Atari games x 4 seeds and one cartpole run. Each run's early eval (frame 100) is far
    off and must not count; its final evals are at frames 960 and 1000, averaging to
    `score(game, GAMER[game][seed])`."""
    runs = tmp_path / "runs"
    for game, gamers in GAMER.items():
        for seed, gamer in enumerate(gamers):
            final = score(game, gamer)
            write_run(
                runs, game, seed, eval_rows([(100, -1e4), (960, final - 1), (1000, final + 1)])
            )
    write_run(runs, "classic_cartpole", 0, eval_rows([(100, 20.0), (200, 50.0)]))
    return runs


def test_final_return_averages_the_evals_of_the_last_tenth_of_frames(tmp_path):
    # last_frames = 1000 (a train row), so the window is frames >= 900: the evals at 900
    # and 950 count, 870 does not (it would if the window ended at the last eval, 950).
    pairs = [(0, -5.0), (850, 10.0), (870, 100.0), (900, 20.0), (950, 40.0)]
    write_run(tmp_path, "atari_pong", 0, eval_rows(pairs, last_frames=1000))
    (run,) = analyze.load_runs(tmp_path)
    assert run.last_frames == 1000
    assert analyze.final_return(run) == pytest.approx(30.0)


def test_final_return_without_late_evals_is_the_last_one(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(100, 5.0), (500, 7.0)], last_frames=1000))
    (run,) = analyze.load_runs(tmp_path)
    assert analyze.final_return(run) == 7.0


def test_task_seed_and_curve_come_from_the_run_folder(tmp_path):
    write_run(tmp_path, "atari_boxing", 7, eval_rows([(10, 1.0), (30, 2.0)]), name="any/where")
    (run,) = analyze.load_runs(tmp_path)
    assert (run.task, run.seed, run.path) == ("atari_boxing", 7, tmp_path / "any/where")
    np.testing.assert_array_equal(run.frames, [10, 30])
    np.testing.assert_array_equal(run.returns, [1.0, 2.0])


def test_baselines_are_the_official_scores_of_every_atari_game():
    from dreamer_jax.envs import ATARI_GAMES

    baselines = analyze.load_baselines()
    for game, expected in GAMES.items():
        assert baselines[game] == expected
    assert {f"atari_{game}" for game in ATARI_GAMES} <= set(baselines)
    assert "atari_pooyan" not in baselines  # no human_gamer score: cannot be normalized
    assert "danijar/dreamerv2" in json.loads(analyze.BASELINES_PATH.read_text())["_source"]


def test_reference_curves_are_the_official_dreamerv2_runs():
    curves = analyze.load_reference_curves()
    assert len(curves) == 55 and all(len(seeds) == 8 for seeds in curves.values())
    frames, returns = curves["atari_pong"][0]
    assert frames.shape == returns.shape and frames.max() <= 2e8
    with gzip.open(analyze.CURVES_PATH, "rt") as file:
        assert "danijar/dreamerv2" in json.load(file)["_source"]


def test_task_summary_by_hand(sweep):
    summary = analyze.task_summary(analyze.load_runs(sweep), analyze.load_baselines())
    assert list(summary) == ["atari_boxing", "atari_breakout", "atari_pong", "classic_cartpole"]
    for game, gamers in GAMER.items():
        entry = summary[game]
        low, gamer_high, record_high = (GAMES[game][k] for k in analyze.BASELINE_KEYS)
        returns = low + np.array(gamers) * (gamer_high - low)
        record = (returns - low) / (record_high - low)
        assert entry["seeds"] == 4 and entry["frames"] == 1000 and entry["normalized"]
        assert entry["seed_returns"] == pytest.approx({str(s): r for s, r in enumerate(returns)})
        assert entry["final_return"] == pytest.approx(returns.mean())
        assert entry["final_gamer_normalized"] == pytest.approx(np.mean(gamers))
        assert entry["final_record_normalized"] == pytest.approx(record.mean())
        assert entry["final_clipped_record_normalized"] == pytest.approx(
            np.minimum(record, 1).mean()
        )
    # Boxing's best seed (gamer 9.15 -> return 109.9) is above the record: clipped per seed.
    boxing = summary["atari_boxing"]
    assert boxing["final_clipped_record_normalized"] == pytest.approx(
        (0 + 6 / 99.9 + 12 / 99.9 + 1) / 4
    )
    assert boxing["final_clipped_record_normalized"] < min(boxing["final_record_normalized"], 1)
    cartpole = summary["classic_cartpole"]
    assert cartpole["final_return"] == 50.0 and not cartpole["normalized"]
    assert "final_gamer_normalized" not in cartpole


def test_task_frames_are_the_fewest_any_seed_reached(tmp_path):
    """A task's `frames` is how far all its seeds got (a sweep still running): seed 1's
    8,000, not seed 0's 10,000."""
    write_run(tmp_path, "atari_pong", 0, eval_rows([(1000, 1.0)], last_frames=10_000))
    write_run(tmp_path, "atari_pong", 1, eval_rows([(1000, 2.0)], last_frames=8_000))
    summary = analyze.task_summary(analyze.load_runs(tmp_path), analyze.load_baselines())
    assert summary["atari_pong"]["frames"] == 8_000


def test_aggregates_by_hand(sweep):
    baselines = analyze.load_baselines()
    summary = analyze.task_summary(analyze.load_runs(sweep), baselines)
    agg = analyze.aggregate(summary, baselines, reps=50)
    task_gamer = [np.mean(g) for g in GAMER.values()]  # 0.675, 3.775, 2.6625
    task_record = [summary[t]["final_record_normalized"] for t in GAMER]
    task_clipped = [summary[t]["final_clipped_record_normalized"] for t in GAMER]
    assert agg["tasks"] == 3  # cartpole left out
    assert agg["gamer_median"] == pytest.approx(2.6625)
    assert agg["gamer_mean"] == pytest.approx(np.mean(task_gamer))
    assert agg["record_mean"] == pytest.approx(np.mean(task_record))
    assert agg["clipped_record_mean"] == pytest.approx(np.mean(task_clipped))
    # 12 scores sorted: 0 0 .1 | .5 .5 1 1 1.2 2 | 3 9.15 10 -> the middle six.
    assert agg["iqm"] == pytest.approx((0.5 + 0.5 + 1 + 1 + 1.2 + 2) / 6)
    low, high = agg["iqm_ci"]
    assert low <= agg["iqm"] <= high and low < high
    assert (agg["iqm_seeds_per_task"], agg["bootstrap_reps"]) == (4, 50)


def test_iqm_is_the_mean_of_the_middle_half_with_a_reproducible_ci():
    scores = np.array([[0.0, 7.0], [1.0, 3.0], [2.0, 50.0], [-9.0, 4.0]])  # [seeds, tasks]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    iqm, (low, high) = analyze.iqm_with_ci(scores, reps=200, seed=5)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # caller's RNG untouched
    assert iqm == pytest.approx((1 + 2 + 3 + 4) / 4)  # 8 values: the middle 4
    assert low <= iqm <= high and low < high
    assert analyze.iqm_with_ci(scores, reps=200, seed=5) == (iqm, [low, high])
    assert analyze.iqm_with_ci(scores, reps=200, seed=6)[1] != [low, high]


def test_the_clipped_record_score_is_clipped_at_the_record_only():
    """`min(record-normalized, 1)`: a seed worse than random play keeps its negative score
    (-0.5 here), only one past the record counts as 1."""
    baseline = {"random": 0.0, "human_gamer": 10.0, "human_record": 100.0}
    means = analyze.normalized_means(np.array([-50.0, 50.0, 200.0]), baseline)
    assert means == pytest.approx(
        {
            "final_gamer_normalized": (-5 + 5 + 20) / 3,
            "final_record_normalized": (-0.5 + 0.5 + 2) / 3,
            "final_clipped_record_normalized": (-0.5 + 0.5 + 1) / 3,
        }
    )


def test_the_iqm_interval_is_rliables_95_percent_interval():
    """`iqm_ci` is the 95 % interval its docstring and the report state: rliable's for the
    same bootstrap draws (not one of another confidence level)."""
    from rliable import library, metrics

    scores = np.array([[0.0, 7.0], [1.0, 3.0], [2.0, 50.0], [-9.0, 4.0]])  # [seeds, tasks]
    np.random.seed(5)
    _, intervals = library.get_interval_estimates(
        {"iqm": scores},
        lambda x: np.array([metrics.aggregate_iqm(x)]),
        reps=200,
        confidence_interval_size=0.95,
    )
    _, ci = analyze.iqm_with_ci(scores, reps=200, seed=5)
    assert ci == pytest.approx(list(intervals["iqm"][:, 0]))


def test_iqm_with_unequal_seed_counts_uses_each_tasks_lowest_seeds(tmp_path):
    for seed, gamer in enumerate([0.0, 1.0, 2.0, 30.0]):
        write_run(tmp_path, "atari_pong", seed, eval_rows([(10, score("atari_pong", gamer))]))
    for seed, gamer in [(4, 5.0), (9, 6.0), (2, 100.0)]:
        write_run(
            tmp_path, "atari_breakout", seed, eval_rows([(10, score("atari_breakout", gamer))])
        )
    baselines = analyze.load_baselines()
    summary = analyze.task_summary(analyze.load_runs(tmp_path), baselines)
    agg = analyze.aggregate(summary, baselines, reps=20)
    # Pong seeds 0, 1, 2 (gamer 0, 1, 2) and breakout seeds 2, 4, 5 -> gamer 100, 5, 6.
    assert agg["iqm_seeds_per_task"] == 3
    assert agg["iqm"] == pytest.approx(np.mean([1.0, 2.0, 5.0, 6.0]))


def test_one_seed_per_task_gives_an_iqm_without_a_confidence_interval(tmp_path, capsys):
    """Resampling one seed within each task draws the same scores every time: a zero-width
    interval would claim a certainty that one seed cannot give."""
    write_run(tmp_path / "runs", "atari_pong", 0, eval_rows([(10, score("atari_pong", 1.0))]))
    write_run(tmp_path / "runs", "atari_boxing", 0, eval_rows([(10, score("atari_boxing", 2.0))]))
    out = tmp_path / "out"
    assert analyze.main([str(tmp_path / "runs"), "--out", str(out), "--reps", "20"]) == 0
    agg = json.loads((out / "aggregate.json").read_text())["aggregate"]
    assert agg["iqm"] == pytest.approx(1.5) and agg["iqm_ci"] is None
    assert "IQM 1.5 (one seed per task: no CI)" in capsys.readouterr().out
    assert (out / "aggregate.png").is_file()


def test_no_atari_task_means_no_aggregate(tmp_path):
    write_run(tmp_path, "classic_cartpole", 0, eval_rows([(10, 1.0)]))
    summary = analyze.task_summary(analyze.load_runs(tmp_path), analyze.load_baselines())
    assert analyze.aggregate(summary, analyze.load_baselines(), reps=10) is None


def test_broken_config_is_skipped_with_a_warning_naming_it(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.0)]))
    broken = write_run(tmp_path, "atari_pong", 1, eval_rows([(10, 2.0)]))
    (broken / "config.yaml").write_text("rssm: [unclosed\n")
    with pytest.warns(UserWarning, match=str(broken / "config.yaml")):
        runs = analyze.load_runs(tmp_path)
    assert [run.seed for run in runs] == [0]


def test_runs_without_evals_or_config_are_skipped_with_a_warning(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.0)]))
    write_run(tmp_path, "atari_pong", 1, eval_rows([], last_frames=100))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "metrics.jsonl").write_text('{"step": 1, "frames": 4}\n')
    with pytest.warns(UserWarning) as record:
        runs = analyze.load_runs(tmp_path)
    assert [run.seed for run in runs] == [0]
    assert [str(w.message) for w in record] == [
        f"skipping {tmp_path / 'atari_pong/seed_1'}: no finite eval_return logged yet",
        f"skipping {tmp_path / 'notes'}: metrics.jsonl without config.yaml",  # a lost config
    ]


def test_a_run_without_metrics_yet_is_named_but_a_many_seed_runs_own_folder_is_not(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.0)]))
    started = write_run(tmp_path, "atari_pong", 1, [])
    (started / "metrics.jsonl").unlink()  # started, killed before its first row
    seeds = tmp_path / "atari_boxing"  # a --num_seeds 2 run: its seed folders are the runs
    seeds.mkdir()
    make_config(["atari"], {"task": "atari_boxing", "num_seeds": 2}).save(seeds / "config.yaml")
    with pytest.warns(UserWarning) as record:
        runs = analyze.load_runs(tmp_path)
    assert [run.seed for run in runs] == [0]
    assert [str(w.message) for w in record] == [f"skipping {started}: no metrics.jsonl yet"]


def test_stopped_learning_is_the_start_of_the_final_all_nonfinite_rows():
    def rows(fractions):
        return [{"step": 100 * i, "frames": 400 * i, "nonfinite": f} for i, f in fractions]

    assert (
        analyze.stopped_learning(rows([(1, 0.0), (2, 1.0), (3, 0.5), (4, 1.0), (5, 1.0)])) == 1600
    )
    assert analyze.stopped_learning(rows([(1, 1.0), (2, 1.0)])) == 400
    assert analyze.stopped_learning(rows([(1, 1.0), (2, 0.9)])) is None
    no_updates = [{"step": 600, "frames": 2400, "eval_return": 1.0}]  # rows without the metric
    assert analyze.stopped_learning(rows([(1, 0.0), (2, 1.0)]) + no_updates) == 800
    assert analyze.stopped_learning(no_updates) is None
    assert analyze.stopped_learning(rows([(1, 0.0), (2, float("nan"))])) is None  # missing


def test_a_run_that_stopped_learning_is_kept_with_a_warning(tmp_path):
    rows = eval_rows([(400, 1.0), (800, 2.0)])
    rows[0]["nonfinite"], rows[1]["nonfinite"] = 0.25, 1.0
    stuck = write_run(tmp_path, "atari_pong", 1, rows)
    write_run(tmp_path, "atari_pong", 0, eval_rows([(400, 1.0)]))
    with pytest.warns(UserWarning, match=f"{stuck}: every update logged since frames 800 was"):
        runs = analyze.load_runs(tmp_path)
    assert [run.seed for run in runs] == [0, 1]


def test_an_atari_run_off_the_papers_protocol_is_kept_with_a_warning(tmp_path):
    """The debug preset's 100-step episodes would read as a share of full-episode human
    scores; a run with the suite's own limit (time_limit 0) is on protocol."""
    pairs = [(1000, 1.0)]
    write_run(tmp_path, "atari_pong", 0, eval_rows(pairs), presets=["atari", "debug"])
    write_run(tmp_path, "atari_boxing", 0, eval_rows(pairs), presets=["atari"])
    path = write_run(tmp_path, "atari_breakout", 0, eval_rows(pairs), presets=["atari"])
    config = (path / "config.yaml").read_text()
    (path / "config.yaml").write_text(config.replace("time_limit: 27000", "time_limit: 0"))
    with pytest.warns(UserWarning) as record:
        runs = analyze.load_runs(tmp_path)
    assert len(runs) == 3 and [str(w.message) for w in record] == [
        f"{tmp_path / 'atari_pong/seed_0'}: time_limit 100 (paper 27000): its returns are of "
        "other episodes than the paper's Atari protocol, so its normalized scores do not "
        "compare with the baselines or published curves"
    ]
    no_repeat = make_config(["atari"], {"action_repeat": 1})
    assert analyze.atari_protocol_differences(no_repeat) == ["action_repeat 1 (paper 4)"]


def test_seeds_that_end_before_the_final_window_are_named(tmp_path, capsys):
    # The final window of seed 0's 10,000 frames starts at 9,000: seed 1 ends in it.
    write_run(tmp_path / "runs", "atari_pong", 0, eval_rows([(1000, 1.0)], last_frames=10_000))
    write_run(tmp_path / "runs", "atari_pong", 1, eval_rows([(1000, 2.0)], last_frames=9_000))
    write_run(tmp_path / "runs", "atari_pong", 2, eval_rows([(1000, 3.0)], last_frames=8_996))
    write_run(tmp_path / "runs", "atari_boxing", 0, eval_rows([(1000, 1.0)]))
    (line,) = analyze.short_seeds(analyze.load_runs(tmp_path / "runs"))
    assert line == (
        "atari_pong: seed 2 at 8,996 frames, before the last 10 % of seed 0's 10,000; each "
        "seed's final return is its own last 10 %, so the task's score mixes stages of training"
    )
    assert analyze.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == f"warning: {line}\n"


def test_two_runs_of_one_task_and_seed_are_an_error(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.0)]), name="kl_0.5/seed_0")
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 2.0)]), name="kl_0.8/seed_0")
    with pytest.raises(analyze.AnalysisError, match=r"keep one with --only \(e\.g\. --only "
                       r"'kl_0\.5/\*'\)$"):  # fmt: skip
        analyze.load_runs(tmp_path)
    (run,) = analyze.load_runs(tmp_path, only="*0.8/*")
    assert run.returns[0] == 2.0
    # Deeper: two sweeps with a variant of one name; the hint names the first difference.
    write_run(tmp_path, "atari_boxing", 0, eval_rows([(10, 1.0)]), name="a/boxing/base/seed_0")
    write_run(tmp_path, "atari_boxing", 0, eval_rows([(10, 1.0)]), name="a/boxing/kl/seed_0")
    with pytest.raises(analyze.AnalysisError, match=r"--only '\*/base/\*'\)$"):
        analyze.load_runs(tmp_path, only="a/*")
    # The runs' own folders differ: a pattern that ends there.
    write_run(tmp_path, "atari_alien", 0, eval_rows([(10, 1.0)]), name="b/run_1")
    write_run(tmp_path, "atari_alien", 0, eval_rows([(10, 1.0)]), name="b/run_2")
    with pytest.raises(analyze.AnalysisError, match=r"--only '\*/run_1'\)$"):
        analyze.load_runs(tmp_path, only="b/*")
    assert len(analyze.load_runs(tmp_path, only="*/run_1")) == 1  # the hint keeps one
    # The first's differing name recurs in the other's path: the whole path.
    write_run(tmp_path, "atari_amidar", 0, eval_rows([(10, 1.0)]), name="c/x/y")
    write_run(tmp_path, "atari_amidar", 0, eval_rows([(10, 1.0)]), name="c/z/x/y")
    with pytest.raises(analyze.AnalysisError, match=r"--only 'c/x/y'\)$"):
        analyze.load_runs(tmp_path, only="c/*")


def test_run_folders_behind_links_are_read_once(tmp_path):
    store = tmp_path / "store"
    write_run(store, "atari_pong", 0, eval_rows([(10, 1.0)]), name="pong0")
    write_run(store, "atari_pong", 1, eval_rows([(10, 2.0)]), name="pong1")
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "a").symlink_to(store / "pong0")
    (gathered / "b").symlink_to(store / "pong1")
    (gathered / "b" / "loop").symlink_to(gathered)  # a cycle is entered once
    runs = analyze.load_runs(gathered)
    assert [(run.seed, run.path.name) for run in runs] == [(0, "a"), (1, "b")]
    with pytest.raises(analyze.AnalysisError, match="matching 'kl_0.9/'"):
        analyze.load_runs(tmp_path, only="kl_0.9/")
    # A pattern that matches no folder says what --only matches against.
    with pytest.raises(analyze.AnalysisError, match="whole folder under .*, like 'store/pong0'"):
        analyze.load_runs(tmp_path, only="store")


def test_bin_curve_by_hand():
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    frames = np.array([0.0, 5.0, 10.0, 30.0, 31.0])
    values = np.array([1.0, 3.0, 7.0, 9.0, 100.0])
    # [0, 10): 1, 3 | [10, 20): 7 | [20, 30]: 9 (right edge kept); 31 is past the edges.
    np.testing.assert_array_equal(analyze.bin_curve(frames, values, edges), [2.0, 7.0, 9.0])
    binned = analyze.bin_curve(np.array([25.0]), np.array([4.0]), edges)
    np.testing.assert_array_equal(binned, [np.nan, np.nan, 4.0])


def test_curve_band_is_mean_min_max_over_seeds_of_binned_curves():
    edges = np.array([0.0, 10.0, 20.0, 30.0])
    seed_a = (np.array([1.0, 2.0, 25.0]), np.array([2.0, 4.0, 10.0]))  # bins: 3, -, 10
    seed_b = (np.array([5.0, 29.0]), np.array([5.0, 20.0]))  # bins: 5, -, 20
    x, mean, low, high = analyze.curve_band([seed_a, seed_b], edges)
    chex.assert_shape([x, mean, low, high], (2,))  # the middle bin is empty for both seeds
    np.testing.assert_array_equal(x, [5.0, 25.0])
    np.testing.assert_array_equal(mean, [4.0, 15.0])
    np.testing.assert_array_equal(low, [3.0, 10.0])
    np.testing.assert_array_equal(high, [5.0, 20.0])


def test_curve_band_holds_a_seed_that_ended_early_at_its_last_value():
    """As the official plot pads a shorter run with its last score: the mean over seeds
    does not jump where one seed's data ends, and the band still spans every seed."""
    edges = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    long = (np.array([5.0, 15.0, 25.0, 35.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    short = (np.array([5.0, 15.0]), np.array([11.0, 12.0]))  # ends in the second bin
    late = (np.array([25.0, 35.0]), np.array([6.0, 8.0]))  # starts in the third: nothing before
    x, mean, low, high = analyze.curve_band([long, short, late], edges)
    np.testing.assert_array_equal(x, [5.0, 15.0, 25.0, 35.0])
    np.testing.assert_array_equal(mean, [6.0, 7.0, 7.0, 8.0])  # (3 + 12 + 6) / 3, (4 + 12 + 8) / 3
    np.testing.assert_array_equal(low, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(high, [11.0, 12.0, 12.0, 12.0])


def test_plot_task_draws_reference_and_baselines_only_when_given(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(0, -20.0), (100, 0.0)]))
    write_run(tmp_path, "atari_pong", 1, eval_rows([(0, -21.0), (100, 2.0)]))
    runs = analyze.load_runs(tmp_path)
    # A synthetic reference, one seed: the evals past the runs' 100 frames are not drawn.
    reference = [(np.array([0.0, 100.0, 500.0]), np.array([-19.0, 5.0, 21.0]))]
    ax = Figure().add_subplot()
    analyze.plot_task(ax, "atari_pong", runs, bins=2, baseline=PONG, reference=reference)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {
        "dreamer-jax (2 seeds)",
        "DreamerV2 official (1 seed)",
        "random",
        "human gamer",
    }
    np.testing.assert_array_equal(lines["dreamer-jax (2 seeds)"].get_ydata(), [-20.5, 1.0])
    np.testing.assert_array_equal(lines["DreamerV2 official (1 seed)"].get_ydata(), [-19.0, 5.0])
    assert lines["random"].get_ydata()[0] == PONG["random"]
    assert lines["human gamer"].get_ydata()[0] == PONG["human_gamer"]
    ax = Figure().add_subplot()
    analyze.plot_task(ax, "classic_cartpole", runs, bins=2)
    assert [line.get_label() for line in ax.get_lines()] == ["dreamer-jax (2 seeds)"]
    ax = Figure().add_subplot()  # one evaluation each: the seeds' spread as a bar, not lost
    one = [run._replace(frames=run.frames[:1], returns=run.returns[:1]) for run in runs]
    analyze.plot_task(ax, "classic_cartpole", one, bins=2)
    (errorbar,) = ax.containers
    _, _, (bars,) = errorbar
    low, high = sorted(run.returns[0] for run in one)
    np.testing.assert_array_equal(bars.get_segments()[0][:, 1], [low, high])
    ax = Figure().add_subplot()  # a reference that starts past the runs' frames: legend only
    analyze.plot_task(ax, "atari_pong", runs, bins=2, reference=[(np.array([1e6]), np.ones(1))])
    lines = ax.get_lines()
    assert [len(line.get_xdata()) for line in lines] == [2, 0]
    end = analyze.frame_edges(runs, 2)[-1]
    label = f"DreamerV2 official (1 seed): no evaluation by {end:.3g} frames"
    assert lines[1].get_label() == label
    assert label in [text.get_text() for text in ax.get_legend().get_texts()]


def test_plot_aggregate_draws_the_iqm_interval_and_the_four_aggregates():
    agg = {
        "tasks": 3,
        "gamer_median": 2.0,
        "gamer_mean": 3.0,
        "record_mean": 0.5,
        "clipped_record_mean": 0.4,
        "iqm": 1.5,
        "iqm_ci": [1.0, 2.5],
        "iqm_seeds_per_task": 4,
    }
    ax = Figure().add_subplot()
    analyze.plot_aggregate(ax, agg)
    (errorbar,) = ax.containers
    _, _, (bars,) = errorbar
    np.testing.assert_array_equal(bars.get_segments()[0][:, 0], [1.0, 2.5])
    points = [line for line in ax.get_lines() if line.get_marker() == "s"]
    np.testing.assert_array_equal(points[0].get_xdata(), [2.0, 3.0, 0.5, 0.4])


@pytest.mark.parametrize("interval, bar", [([1.6, 2.5], [1.5, 2.5]), ([0.5, 1.4], [0.5, 1.5])])
def test_plot_aggregate_draws_an_iqm_outside_its_few_draws_interval(interval, bar):
    """`--reps 1` can leave the IQM below or above its interval: the bar reaches the point
    instead of a negative length past it (QA: matplotlib raised, after aggregate.json was
    written)."""
    agg = {"tasks": 3, "gamer_median": 2.0, "gamer_mean": 3.0, "record_mean": 0.5,
           "clipped_record_mean": 0.4, "iqm": 1.5, "iqm_ci": interval,
           "iqm_seeds_per_task": 1}  # fmt: skip
    ax = Figure().add_subplot()
    analyze.plot_aggregate(ax, agg)
    (errorbar,) = ax.containers
    _, _, (bars,) = errorbar
    np.testing.assert_array_equal(bars.get_segments()[0][:, 0], bar)


def test_a_runs_own_subfolders_are_not_searched_for_runs(tmp_path):
    """An online wandb run leaves `wandb/run-*/files/config.yaml` (wandb's, not a run's) in
    the run folder; it is not read (QA: a 'skipping a run' warning per run)."""
    run = write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.0)]))
    files = run / "wandb" / "run-20261129_000000-abc" / "files"
    files.mkdir(parents=True)
    (files / "config.yaml").write_text("_wandb:\n  value: {}\n")
    (run / "replay").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = analyze.load_runs(tmp_path)
    assert [(r.task, r.seed) for r in runs] == [("atari_pong", 0)]


def test_frame_edges_put_regular_evals_one_per_bin(tmp_path):
    write_run(tmp_path, "atari_pong", 0, eval_rows([(100, 1.0), (200, 2.0)]))
    write_run(tmp_path, "atari_pong", 1, eval_rows([(100, 3.0), (200, 4.0), (300, 5.0)]))
    runs = analyze.load_runs(tmp_path)
    curves = [(run.frames, run.returns) for run in runs]
    # At most as many bins as evaluations (3), spanning the first to the last eval.
    edges = analyze.frame_edges(runs, bins=40)
    np.testing.assert_allclose(edges, [100, 100 + 200 / 3, 100 + 400 / 3, 300])
    # Seed 0 ends at 200: its last value holds in the bin of 300 (mean of 2 and 5).
    np.testing.assert_array_equal(analyze.curve_band(curves, edges)[1], [2.0, 3.0, 3.5])
    edges = analyze.frame_edges(runs, bins=2)
    np.testing.assert_array_equal(edges, [100, 200, 300])
    # [100, 200): 1 and 3 | [200, 300]: 2 and mean(4, 5) for the two seeds.
    np.testing.assert_array_equal(analyze.curve_band(curves, edges)[1], [2.0, 3.25])


def test_main_writes_aggregate_json_and_figures(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyze.main([str(sweep), "--out", str(out), "--reps", "30"]) == 0
    result = json.loads((out / "aggregate.json").read_text())
    summary = analyze.task_summary(analyze.load_runs(sweep), analyze.load_baselines())
    assert result["tasks"] == json.loads(json.dumps(summary))
    assert result["tasks"]["classic_cartpole"]["normalized"] is False
    assert result["aggregate"]["gamer_median"] == pytest.approx(2.6625)
    assert result["aggregate"]["bootstrap_reps"] == 30
    names = ["aggregate.png", "curves.png"] + [f"curves_{task}.png" for task in summary]
    for name in names:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    printed = capsys.readouterr().out
    assert "note: classic_cartpole has no Atari baselines" in printed
    assert "over 3 Atari tasks: gamer median 2.66" in printed


def test_main_logs_to_wandb_offline(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tmp_path / "out"
    args = [
        str(sweep),
        "--out",
        str(out),
        "--reps",
        "10",
        "--wandb.mode",
        "offline",
        "--wandb.group",
        "atari55",
    ]
    assert analyze.main(args) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
    images = {p.name.split("_")[0] for p in (run_dir / "files/media/images").rglob("*.png")}
    assert {"curves", "aggregate"} <= images


def strict_json(path):
    """The JSON in `path`, failing on the NaN and Infinity that only Python's json accepts."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}: not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_nonfinite_metrics_count_as_missing_and_the_json_is_strict(tmp_path, capsys):
    """NaN and Infinity literals, as json.dumps writes them into metrics.jsonl: seed 0's late
    non-finite evals are left out of its final return, seed 1 (no finite eval) and seed 2 (a
    row without finite frames) are skipped."""
    runs = tmp_path / "runs"
    seed_0 = write_run(runs, "atari_pong", 0, eval_rows([(100, -5.0), (960, 3.0)]))
    late = ['{"step": 245, "frames": 980, "eval_return": NaN}',
            '{"step": 250, "frames": 1000, "eval_return": Infinity}']  # fmt: skip
    with (seed_0 / "metrics.jsonl").open("a") as file:
        file.write("\n".join(late) + "\n")
    seed_1 = write_run(runs, "atari_pong", 1, [])
    (seed_1 / "metrics.jsonl").write_text(
        '{"step": 25, "frames": 100, "eval_return": NaN}\n'
        '{"step": 50, "frames": 200, "eval_return": -Infinity}\n'
    )
    seed_2 = write_run(runs, "atari_pong", 2, eval_rows([(100, 1.0)]))
    with (seed_2 / "metrics.jsonl").open("a") as file:
        file.write('{"step": 50, "frames": NaN, "eval_return": 2.0}\n')
    out = tmp_path / "out"
    assert analyze.main([str(runs), "--out", str(out), "--reps", "10"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping {seed_1}: no finite eval_return" in err
    assert f"warning: skipping {seed_2}: metrics.jsonl has rows without finite frames" in err
    pong = strict_json(out / "aggregate.json")["tasks"]["atari_pong"]
    assert pong["seed_returns"] == {"0": 3.0} and pong["final_return"] == 3.0


def test_results_that_overflow_are_null_in_strict_json(tmp_path):
    """Finite returns whose mean overflows to inf: null in aggregate.json, never Infinity."""
    write_run(tmp_path, "atari_pong", 0, eval_rows([(10, 1.7e308), (10, 1.7e308)]))
    out = tmp_path / "out"
    assert analyze.main([str(tmp_path), "--out", str(out), "--reps", "10"]) == 0
    result = strict_json(out / "aggregate.json")
    assert result["tasks"]["atari_pong"]["final_return"] is None
    assert result["aggregate"]["iqm"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295], got 9999"),
        (["--seed", "4294967296"], "--seed must be in [0, 4294967295], got 4294967296"),
        (["--reps", "99999999999999999999"], "--reps must be <= 1000000, got 9999"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--no_such_option"], "unrecognized arguments: --no_such_option"),
        (["--wandb.mode", "on"], "argument --wandb.mode: invalid choice: 'on'"),
    ],
)
def test_bad_options_are_one_line_before_anything_is_written(
    sweep, tmp_path, capsys, args, message
):
    out = tmp_path / "out"
    assert analyze.main([str(sweep), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_out_is_one_line_naming_it(sweep, capsys):
    assert analyze.main([str(sweep)]) == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --out\n"


def help_text(capsys) -> str:
    """`--help` through main, its words joined by single spaces (argparse wraps lines)."""
    with pytest.raises(SystemExit) as exit_:
        analyze.main(["--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_states_each_real_default(capsys):
    text = help_text(capsys)
    assert "(default: None)" not in text and "(default: )" not in text
    assert "--out DIR where results go, created if missing (required" in text
    assert "--reps REPS bootstrap resamples for the CI, 1 to 1000000 (default: 2000)" in text


def test_only_examples_name_the_shipped_ablation_sweep(capsys):
    """The --only examples of docs/analysis.md and --help: the folder and a variant that
    experiments/ablations.yaml writes (<root>/<name>/<task>/<variant>/seed_<s>)."""
    import yaml

    sweep = yaml.safe_load((ROOT / "experiments" / "ablations.yaml").read_text())
    docs = (ROOT / "docs" / "analysis.md").read_text()
    (example,) = re.findall(r"analyze (\S+) --only '\*/(\w+)/\*'", docs)
    assert example[0] == f"{sweep['root']}/{sweep['name']}"
    assert example[1] in sweep["variants"]
    assert re.search(r"'\*/(\w+)/\*'", help_text(capsys))[1] in sweep["variants"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "dreamer_jax.analyze", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("runs_dir", ["missing", "empty"])
def test_cli_no_runs_exits_2_with_one_line(tmp_path, runs_dir):
    (tmp_path / "empty").mkdir()
    result = _cli(str(tmp_path / runs_dir), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert ("does not exist" in result.stderr) == (runs_dir == "missing")
    assert not (tmp_path / "out").exists()


def test_cli_help():
    result = _cli("--help")
    assert (
        result.returncode == 0 and "RUNS_DIR" in result.stdout and "--wandb.mode" in result.stdout
    )


def test_figures_of_an_earlier_analysis_in_the_output_are_named(tmp_path, capsys):
    for task in ("atari_pong", "atari_boxing"):
        write_run(tmp_path / "runs", task, 0, eval_rows([(1000, 1.0)]))
    out = tmp_path / "out"
    assert analyze.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    args = [str(tmp_path / "runs"), "--only", "atari_pong/*", "--out", str(out)]
    assert analyze.main(args) == 0
    assert capsys.readouterr().err == (
        f"warning: {out} also holds figures of an earlier analysis: curves_atari_boxing.png\n"
    )
    assert (out / "curves_atari_boxing.png").is_file()  # kept


def test_an_output_directory_that_cannot_be_written_is_refused_before_reading(tmp_path):
    write_run(tmp_path / "runs", "classic_cartpole", 0, eval_rows([(10, 1.0)]))
    (tmp_path / "runs/classic_cartpole/seed_0/config.yaml").write_text("{")  # would warn
    (tmp_path / "afile").write_text("")
    result = _cli(str(tmp_path / "runs"), "--out", str(tmp_path / "afile" / "out"))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: output directory {tmp_path / 'afile' / 'out'} is not writable: Not a directory\n"
    )


def test_cli_warnings_are_one_line_each(tmp_path):
    write_run(tmp_path, "classic_cartpole", 0, eval_rows([(10, 1.0)]))
    broken = write_run(tmp_path, "classic_cartpole", 1, eval_rows([(10, 1.0)])) / "config.yaml"
    broken.write_text("{")
    result = _cli(str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"warning: skipping a run: {broken} is not valid YAML")
