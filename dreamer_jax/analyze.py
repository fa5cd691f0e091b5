"""Final scores, normalized Atari aggregates and learning curves of many runs, for a paper.

    python -m dreamer_jax.analyze runs/atari55 --out results [--reps 2000] [--wandb.mode online]

Reads every run under RUNS_DIR (a folder holding `config.yaml` and `metrics.jsonl`; its task
and seed come from its config) and writes, under --out:
  aggregate.json     per task: seeds, final return (mean over seeds), normalized scores; over
                     the tasks with Atari baselines: the paper's four aggregates and the IQM
                     with its 95 % stratified-bootstrap confidence interval.
  curves_<task>.png  eval return against frames (binned mean and min-max band over seeds),
                     with the official DreamerV2 curves and the random and human-gamer scores.
  curves.png         every task's curve in one grid.
  aggregate.png      the aggregates: the IQM with its interval, the other four as points.
With `--wandb.mode offline|online` the numbers and figures also go to a wandb run of their own
(job_type "analysis"). Each definition is stated exactly in the docstring of its function
below, and in docs/analysis.md. Reference data (`dreamer_jax/data/`, copied from the official
DreamerV2 repository, each file naming its source) serve normalization and plots only.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import math
import os
import pathlib
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from dreamer_jax.config import (
    Config,
    ConfigError,
    OneLineParser,
    load_run_config,
    make_config,
    program_name,
    warn_in_one_line,
)
from dreamer_jax.logger import METRICS_FILE, WANDB_INIT_TIMEOUT_S, read_metrics
from dreamer_jax.paths import DirectoryError, check_creatable, ensure_writable, write_atomic
from dreamer_jax.startup import quiet_on_broken_pipe

DATA_DIR = pathlib.Path(__file__).with_name("data")
BASELINES_PATH = DATA_DIR / "atari_baselines.json"
CURVES_PATH = DATA_DIR / "atari_dreamerv2_curves.json.gz"
CONFIG_FILE = "config.yaml"
# A seed's final return averages its evaluations over this last fraction of its frames.
FINAL_FRACTION = 0.1
# The curves file also holds a "nosched" variant; the paper's agent is "dreamerv2".
REFERENCE_METHOD = "dreamerv2"
CONFIDENCE = 0.95
# rliable resamples with numpy's global RNG, whose seeds lie in [0, 2**32).
MAX_BOOTSTRAP_SEED = 2**32 - 1
# rliable holds every resample in memory and draws them in a Python loop: a million already
# takes hours, and far more cannot be allocated at all.
MAX_REPS = 1_000_000
BASELINE_KEYS = ("random", "human_gamer", "human_record")


class AnalysisError(RuntimeError):
    """Nothing to analyze, a bad argument, or wandb cannot start. The message is one line."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except None or "" (no value): such an option's help says what
    leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default in (None, "") else super()._get_help_string(action)


class Run(NamedTuple):
    """One run's evaluations: `frames` and `returns` [N] of its rows that hold an eval_return,
    in logged order, and `last_frames`, the frames of its last logged row (eval or not)."""

    path: pathlib.Path
    task: str
    seed: int
    frames: np.ndarray
    returns: np.ndarray
    last_frames: int


def load_runs(runs_dir: str | pathlib.Path, only: str | None = None) -> list[Run]:
    """Every run under `runs_dir` (any depth), sorted by path; with `only`, those whose folder
    path relative to `runs_dir` matches that fnmatch pattern (`*` also matches "/").

    A run whose config.yaml or metrics.jsonl cannot be used, or that has logged no finite
    eval_return yet (NaN and Infinity count as missing), is skipped with a one-line warning.
    AnalysisError when `runs_dir` is not a directory, holds no usable run, or holds two runs
    of one task and seed (a folder that mixes variants of a sweep: their seeds would be
    averaged as one method's)."""
    runs_dir = pathlib.Path(runs_dir)
    if not runs_dir.is_dir():
        what = "is not a directory" if runs_dir.exists() else "does not exist"
        raise AnalysisError(f"{runs_dir} {what}")
    every_folder = _metrics_folders(runs_dir)
    folders = every_folder
    if only is not None:
        folders = [f for f in folders if fnmatch.fnmatchcase(str(f.relative_to(runs_dir)), only)]
    found = [_load_run(folder) for folder in folders]
    runs = [run for run in found if run is not None]
    if not runs:
        where = runs_dir if only is None else f"{runs_dir} matching {only!r}"
        hint = ""
        if only is not None and every_folder and not folders:
            example = every_folder[0].relative_to(runs_dir)
            hint = f" (--only matches a run's whole folder under {runs_dir}, like '{example}')"
        raise AnalysisError(
            f"no run under {where}{hint}: a run is a folder holding {CONFIG_FILE} and a "
            f"{METRICS_FILE} with eval_return rows"
        )
    first: dict[tuple[str, int], Run] = {}
    for run in runs:
        other = first.setdefault((run.task, run.seed), run)
        if other is not run:
            raise AnalysisError(
                f"{other.path} and {run.path} are both {run.task} seed {run.seed}: keep one "
                f"with --only (e.g. --only {_only_example(other.path, run.path, runs_dir)!r})"
            )
    return runs


def _metrics_folders(runs_dir: pathlib.Path) -> list[pathlib.Path]:
    """The folders under `runs_dir` that hold a metrics file or a run's config, sorted,
    following links to folders (run folders gathered from several places) but entering each
    folder once. Inside a run only its seed folders are searched: its `wandb/`, `replay/`
    and `checkpoints/` hold no run (an online wandb run's `files/config.yaml` is wandb's)."""
    folders, seen = [], set()
    for root, dirs, files in os.walk(runs_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back into the tree, or two links to one folder
            dirs.clear()
            continue
        seen.add(real)
        if METRICS_FILE in files or CONFIG_FILE in files:
            folders.append(pathlib.Path(root))
            dirs[:] = [name for name in dirs if name.startswith("seed_")]
    return sorted(folders)


def _only_example(first: pathlib.Path, second: pathlib.Path, runs_dir: pathlib.Path) -> str:
    """An `--only` pattern that keeps `first` and not `second`: their first differing folder."""
    a, b = first.relative_to(runs_dir).parts, second.relative_to(runs_dir).parts
    exact = str(first.relative_to(runs_dir))
    differ = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if differ is None:  # one run inside the other
        return exact
    pattern = ("*/" if differ else "") + a[differ] + ("/*" if differ < len(a) - 1 else "")
    # The folder's name may recur elsewhere in the other's path: then only the path will do.
    if fnmatch.fnmatchcase("/".join(b), pattern) or not fnmatch.fnmatchcase(exact, pattern):
        return exact
    return pattern


def _load_run(path: pathlib.Path) -> Run | None:
    """The run in folder `path`, or None (with a warning) when it cannot be used."""
    if not (path / CONFIG_FILE).is_file():
        # A run whose config.yaml was lost, or a metrics file of something else.
        warnings.warn(f"skipping {path}: {METRICS_FILE} without {CONFIG_FILE}", stacklevel=2)
        return None
    try:
        config = load_run_config(path / CONFIG_FILE)
        if not (path / METRICS_FILE).exists():
            # A many-seed run's own folder: its seeds' folders are the runs.
            if config.num_seeds == 1:
                warnings.warn(f"skipping {path}: no {METRICS_FILE} yet", stacklevel=2)
            return None
        rows = read_metrics(path / METRICS_FILE)
    except (ConfigError, OSError) as error:
        warnings.warn(f"skipping a run: {error}", stacklevel=2)
        return None
    if not all(_finite(row.get("frames")) for row in rows):
        warnings.warn(
            f"skipping {path}: {METRICS_FILE} has rows without finite frames", stacklevel=2
        )
        return None
    evals = [row for row in rows if _finite(row.get("eval_return"))]
    if not evals:
        warnings.warn(f"skipping {path}: no finite eval_return logged yet", stacklevel=2)
        return None
    differs = atari_protocol_differences(config)
    if differs:
        warnings.warn(
            f"{path}: {', '.join(differs)}: its returns are of other episodes than the "
            "paper's Atari protocol, so its normalized scores do not compare with the "
            "baselines or published curves",
            stacklevel=2,
        )
    since = stopped_learning(rows)
    if since is not None:
        warnings.warn(
            f"{path}: every update logged since frames {since} was non-finite (skipped), so "
            "its later evaluations are of parameters that stopped learning there",
            stacklevel=2,
        )
    return Run(
        path=path,
        task=config.task,
        seed=config.seed,
        frames=np.array([row["frames"] for row in evals], float),
        returns=np.array([row["eval_return"] for row in evals], float),
        last_frames=rows[-1]["frames"],
    )


def atari_protocol_differences(config: Config) -> list[str]:
    """How an Atari run's episodes differ from the paper's (SPEC §5: episodes of at most
    27,000 policy steps of 4 frames; the other settings are fixed in `envs`), in words, e.g.
    `["time_limit 100 (paper 27000)"]` for the debug preset; [] for any other task."""
    if not config.task.startswith("atari_"):
        return []
    paper = make_config(["atari"])
    # time_limit 0 is the suite's own limit, which for Atari is the paper's.
    ran = {
        "time_limit": config.time_limit or paper.time_limit,
        "action_repeat": config.action_repeat,
    }
    return [
        f"{key} {value} (paper {paper[key]})" for key, value in ran.items() if value != paper[key]
    ]


def _finite(value: Any) -> bool:
    """Whether `value` is a finite number. json.loads reads NaN and Infinity as floats: they
    count as missing, as a NaN evaluation would make every mean over it NaN."""
    return isinstance(value, int | float) and math.isfinite(value)


def _finite_or_none(value: Any) -> Any:
    """`value` (nested dicts and lists) with non-finite floats as None: strict JSON."""
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value if not isinstance(value, float) or math.isfinite(value) else None


def stopped_learning(rows: Sequence[dict]) -> int | None:
    """The frames of the first row of a run's final stretch of rows in which every update was
    non-finite (its `nonfinite` metric, the fraction of updates skipped since the previous
    row, is 1), or None when its last logged updates learned."""
    since = None
    for row in reversed([row for row in rows if _finite(row.get("nonfinite"))]):
        if row["nonfinite"] < 1:
            break
        since = row["frames"]
    return since


def final_return(run: Run) -> float:
    """The mean of the run's eval returns logged in the last 10 % of its frames: its eval rows
    with `frames >= 0.9 · last_frames`, where `last_frames` is the frames of its last logged
    row (eval or not). If none is that late, its last eval return alone."""
    late = run.frames >= (1 - FINAL_FRACTION) * run.last_frames
    return float(run.returns[late].mean()) if late.any() else float(run.returns[-1])


def runs_by_task(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """`{task: [runs sorted by seed]}`, tasks in sorted order."""
    by_task: dict[str, list[Run]] = {}
    for run in sorted(runs, key=lambda r: (r.task, r.seed)):
        by_task.setdefault(run.task, []).append(run)
    return by_task


def short_seeds(runs: Sequence[Run]) -> list[str]:
    """One line per task whose seeds end far apart: those whose last row is before the final
    window (the last 10 %) of the task's longest seed. Each seed's final return is its own
    last 10 %, so such a task's score mixes stages of training (a sweep still running, or a
    seed that stopped early)."""
    lines = []
    for task, task_runs in runs_by_task(runs).items():
        longest = max(task_runs, key=lambda run: run.last_frames)
        short = [r for r in task_runs if r.last_frames < (1 - FINAL_FRACTION) * longest.last_frames]
        if short:
            ends = ", ".join(f"seed {r.seed} at {r.last_frames:,} frames" for r in short)
            window = f"last {100 * FINAL_FRACTION:g} %"
            lines.append(
                f"{task}: {ends}, before the {window} of seed {longest.seed}'s "
                f"{longest.last_frames:,}; each seed's final return is its own {window}, "
                "so the task's score mixes stages of training"
            )
    return lines


def load_baselines(path: pathlib.Path = BASELINES_PATH) -> dict[str, dict[str, float]]:
    """`{task: {"random", "human_gamer", "human_record"}}` for the Atari games that have all
    three (the packaged copy of the official DreamerV2 scores; the file names its source)."""
    scores = json.loads(path.read_text(encoding="utf-8"))["scores"]
    return {task: s for task, s in scores.items() if all(k in s for k in BASELINE_KEYS)}


def load_reference_curves(path: pathlib.Path = CURVES_PATH) -> dict[str, list[tuple]]:
    """`{task: [(frames [N], returns [N]) per seed]}` of the official DreamerV2 Atari runs
    (the paper's agent, 200M frames; the file names its source). For plots only."""
    with gzip.open(path, "rt", encoding="utf-8") as file:
        runs = json.load(file)["runs"]
    curves: dict[str, list[tuple]] = {}
    for run in runs:
        if run["method"] == REFERENCE_METHOD:
            curve = (np.asarray(run["xs"], float), np.asarray(run["ys"], float))
            curves.setdefault(run["task"], []).append(curve)
    return curves


def normalize(scores: Any, baseline: Mapping[str, float], high: str) -> np.ndarray:
    """`(scores − random) / (baseline[high] − random)`: 0 is random play, 1 the human gamer
    (`high="human_gamer"`) or the human world record (`high="human_record"`)."""
    low = baseline["random"]
    return (np.asarray(scores, float) - low) / (baseline[high] - low)


def normalized_means(returns: np.ndarray, baseline: Mapping[str, float]) -> dict[str, float]:
    """Means over seeds of the gamer-, record- and clipped-record-normalized `returns` [S];
    clipping is per seed: `min(record-normalized, 1)`."""
    record = normalize(returns, baseline, "human_record")
    return {
        "final_gamer_normalized": float(normalize(returns, baseline, "human_gamer").mean()),
        "final_record_normalized": float(record.mean()),
        "final_clipped_record_normalized": float(np.minimum(record, 1.0).mean()),
    }


def task_summary(runs: Sequence[Run], baselines: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per task, tasks and seeds sorted: `seeds`; `frames`, the fewest any seed reached;
    `seed_returns` ({seed: final return}); `final_return`, their mean; `normalized`, whether
    the task has Atari baselines, and if so `normalized_means` of the seeds' final returns."""
    summary = {}
    for task, task_runs in runs_by_task(runs).items():
        returns = np.array([final_return(run) for run in task_runs])
        entry = {
            "seeds": len(task_runs),
            "frames": min(run.last_frames for run in task_runs),
            "final_return": float(returns.mean()),
            "seed_returns": {
                str(run.seed): float(r) for run, r in zip(task_runs, returns, strict=True)
            },
            "normalized": task in baselines,
        }
        if task in baselines:
            entry.update(normalized_means(returns, baselines[task]))
        summary[task] = entry
    return summary


def aggregate(
    summary: Mapping[str, Mapping], baselines: Mapping[str, Mapping], reps: int, seed: int = 0
) -> dict[str, Any] | None:
    """The aggregates over the tasks of `summary` (from `task_summary`) that have baselines;
    None if none has. With a task's score = its mean over seeds (`normalized_means`):
      gamer_median, gamer_mean: median and mean over tasks of the gamer-normalized scores;
      record_mean: mean over tasks of the record-normalized scores;
      clipped_record_mean: mean over tasks of the clipped-record scores (clipped per seed);
      iqm, iqm_ci: `iqm_with_ci` of the gamer-normalized final returns of every task × seed
        (`iqm_ci` None with one seed per task: the bootstrap resamples seeds within tasks).
    Where tasks have different numbers of seeds, the IQM takes each task's lowest
    `iqm_seeds_per_task` seeds (the smallest count), as the bootstrap needs a full matrix."""
    tasks = [task for task, entry in summary.items() if entry["normalized"]]
    if not tasks:
        return None
    scores = {
        name: np.array([summary[t][f"final_{name}_normalized"] for t in tasks])
        for name in ("gamer", "record", "clipped_record")
    }
    per_task = min(summary[t]["seeds"] for t in tasks)
    lowest = {t: list(summary[t]["seed_returns"].values())[:per_task] for t in tasks}
    gamer = np.stack([normalize(lowest[t], baselines[t], "human_gamer") for t in tasks], 1)
    iqm, ci = iqm_with_ci(gamer, reps, seed)
    if per_task < 2:
        ci = None  # resampling one seed within each task draws the same scores every time
    return {
        "tasks": len(tasks),
        "gamer_median": float(np.median(scores["gamer"])),
        "gamer_mean": float(scores["gamer"].mean()),
        "record_mean": float(scores["record"].mean()),
        "clipped_record_mean": float(scores["clipped_record"].mean()),
        "iqm": iqm,
        "iqm_ci": ci,
        "iqm_seeds_per_task": per_task,
        "bootstrap_reps": reps,
        "bootstrap_seed": seed,
    }


def iqm_with_ci(scores: np.ndarray, reps: int, seed: int = 0) -> tuple[float, list[float]]:
    """The interquartile mean of `scores` [seeds, tasks] (the mean of the middle 50 % of all
    its values: `rliable.metrics.aggregate_iqm`) and its 95 % confidence interval [lo, hi]
    from rliable's stratified bootstrap (seeds resampled with replacement within each task,
    `reps` resamples, percentile interval), reproducible for a given `seed`."""
    # Imported here: rliable pulls in arch and statsmodels, seconds that --help need not wait.
    from rliable import library, metrics

    def iqm(x: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_iqm(x)])

    # rliable 1.2 resamples with numpy's global RNG whatever `random_state` says: seed it for
    # this call only, and give the caller's state back.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        points, intervals = library.get_interval_estimates(
            {"iqm": scores}, iqm, reps=reps, confidence_interval_size=CONFIDENCE
        )
    finally:
        np.random.set_state(state)
    low, high = intervals["iqm"][:, 0]
    return float(points["iqm"][0]), [float(low), float(high)]


def bin_curve(frames: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The mean of `values` [N] in each frame bin `[edges[i], edges[i+1])` (the last bin also
    holds its right edge) [K = len(edges) − 1]; NaN where a bin holds none. Points outside
    `[edges[0], edges[-1]]` are left out."""
    keep = (frames >= edges[0]) & (frames <= edges[-1])
    bins = len(edges) - 1
    index = np.minimum(np.searchsorted(edges, frames[keep], side="right") - 1, bins - 1)
    sums = np.bincount(index, values[keep], minlength=bins)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def curve_band(curves: Sequence[tuple], edges: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each seed's `(frames, returns)` binned by `bin_curve`, a seed that ended early held at
    its last value in the later bins (as the official plot pads a shorter run with its last
    score: the mean does not jump where a seed's data ends), then per bin the mean, min and
    max over the seeds that have a value there; bins empty for every seed are dropped.
    Returns bin centers, mean, min, max, each [K']."""
    binned = np.stack([bin_curve(frames, returns, edges) for frames, returns in curves])
    for seed_bins in binned:
        (filled_bins,) = np.nonzero(np.isfinite(seed_bins))
        if filled_bins.size:
            seed_bins[filled_bins[-1] + 1 :] = seed_bins[filled_bins[-1]]
    filled = np.isfinite(binned).any(axis=0)
    binned = binned[:, filled]  # [S, K']
    centers = ((edges[:-1] + edges[1:]) / 2)[filled]
    return centers, np.nanmean(binned, 0), np.nanmin(binned, 0), np.nanmax(binned, 0)


def frame_edges(runs: Sequence[Run], bins: int) -> np.ndarray:
    """Bin edges [K + 1]: K equal bins from the runs' first to their last eval frames, K =
    `bins` or, if fewer, the most evaluations any run logged: evaluations at a fixed interval
    then fall one per bin, so a short run's curve has neither gaps nor merged points."""
    count = min(bins, max(len(run.frames) for run in runs))
    first = min(run.frames.min() for run in runs)
    return np.linspace(first, max(run.frames.max() for run in runs), count + 1)


def plot_task(
    ax,
    task: str,
    runs: Sequence[Run],
    bins: int,
    baseline: Mapping[str, float] | None = None,
    reference: Sequence[tuple] = (),
) -> None:
    """Draws on the matplotlib `ax` the runs' eval return against frames (`curve_band` on
    `frame_edges`: mean line, min-max band over seeds); the official DreamerV2 `reference`
    curves binned alike (mean over their seeds, gray), so only within the runs' frames, the
    budget compared, and only in the legend if none of their evaluations falls there; and dashed
    random and human-gamer lines when `baseline` is given."""
    edges = frame_edges(runs, bins)
    x, mean, low, high = curve_band([(run.frames, run.returns) for run in runs], edges)
    (line,) = ax.plot(x, mean, marker=_marker(x), label=f"dreamer-jax ({_seeds(len(runs))})")
    if len(x) == 1:  # a band one point wide would not show: the seeds' min-max as a bar
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], color=line.get_color(), capsize=4)
    else:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.25, linewidth=0)
    if reference:
        ref_x, ref_mean, _, _ = curve_band(reference, edges)
        label = f"DreamerV2 official ({_seeds(len(reference))})"
        if len(ref_x):
            ax.plot(ref_x, ref_mean, marker=_marker(ref_x), color="gray", label=label)
        else:  # said in the legend, not left out silently
            ax.plot([], [], color="gray", label=f"{label}: no evaluation by {edges[-1]:.3g} frames")
    if baseline:
        ax.axhline(baseline["random"], ls="--", lw=1, color="tab:red", label="random")
        ax.axhline(baseline["human_gamer"], ls="--", lw=1, color="tab:green", label="human gamer")
    ax.set_title(task)
    ax.set_xlabel("frames")
    ax.set_ylabel("eval return")
    ax.legend(fontsize="x-small")


def _seeds(count: int) -> str:
    return f"{count} seed{'s' * (count != 1)}"


def _marker(x: np.ndarray) -> str | None:
    return "o" if len(x) == 1 else None  # a line of one point would not show


def write_plots(
    out: pathlib.Path,
    runs: Sequence[Run],
    agg: Mapping[str, Any] | None,
    baselines: Mapping[str, Mapping],
    reference: Mapping[str, Sequence[tuple]],
    bins: int,
) -> list[pathlib.Path]:
    """Writes `curves_<task>.png` per task, `curves.png` (all tasks) and, when `agg` is not
    None, `aggregate.png` under `out`; returns their paths."""
    # Figure objects, not pyplot: no global backend or figure registry to set up or leak.
    from matplotlib.figure import Figure

    by_task = runs_by_task(runs)
    tasks = list(by_task)

    def draw(ax, task: str) -> None:
        plot_task(ax, task, by_task[task], bins, baselines.get(task), reference.get(task, ()))

    paths = []
    for task in tasks:
        fig = Figure(figsize=(5, 3.5), layout="constrained")
        draw(fig.add_subplot(), task)
        paths.append(_save(fig, out / f"curves_{task}.png"))
    cols = min(5, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, task in zip(axes, tasks, strict=False):
        draw(ax, task)
    for ax in axes[len(tasks) :]:
        ax.set_axis_off()
    paths.append(_save(fig, out / "curves.png"))
    if agg is not None:
        fig = Figure(figsize=(6, 3), layout="constrained")
        plot_aggregate(fig.add_subplot(), agg)
        paths.append(_save(fig, out / "aggregate.png"))
    return paths


def plot_aggregate(ax, agg: Mapping[str, Any]) -> None:
    """Draws on `ax` the IQM with its confidence interval and the other four aggregates of
    `agg` (from `aggregate`) as points, against a dashed line at 1 (human level)."""
    names = ["gamer_median", "gamer_mean", "record_mean", "clipped_record_mean"]
    low, high = agg["iqm_ci"] or (agg["iqm"], agg["iqm"])
    ax.errorbar(
        [agg["iqm"]],
        [0],
        # A few bootstrap draws (--reps 1) can leave the point outside its interval.
        xerr=[[max(agg["iqm"] - low, 0.0)], [max(high - agg["iqm"], 0.0)]],
        fmt="o",
        capsize=4,
        label=f"IQM, {CONFIDENCE:.0%} CI" if agg["iqm_ci"] else "IQM (one seed per task: no CI)",
    )
    ax.plot([agg[name] for name in names], range(1, len(names) + 1), "s", color="tab:gray")
    ax.axvline(1.0, ls="--", lw=1, color="black")
    ax.set_yticks(range(len(names) + 1), ["IQM (gamer)", *names])
    ax.invert_yaxis()
    ax.set_xlabel("normalized score")
    seeds = agg["iqm_seeds_per_task"]
    ax.set_title(f"{agg['tasks']} tasks, IQM over {seeds} seeds per task", fontsize="medium")
    ax.legend(fontsize="x-small")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, dpi=100)
    return path


def log_wandb(
    out: pathlib.Path,
    summary: Mapping[str, Mapping],
    agg: Mapping[str, Any] | None,
    images: Sequence[pathlib.Path],
    mode: str,
    project: str,
    group: str,
) -> None:
    """Logs the aggregate numbers, each task's final returns (a table) and the figures (as
    `wandb.Image`) into one new wandb run (job_type "analysis"), its files under `out`."""
    import wandb

    settings = wandb.Settings(silent=True, console="off", init_timeout=WANDB_INIT_TIMEOUT_S)
    try:
        run = wandb.init(
            project=project,
            group=group or None,
            job_type="analysis",
            dir=str(out),
            mode=mode,
            settings=settings,
        )
    except Exception as error:
        reason = (str(error).splitlines() or [""])[0]
        raise AnalysisError(
            f"wandb {mode} init failed ({type(error).__name__}: {reason})"
        ) from None
    columns = ["task", "seeds", "frames", "final_return", "final_gamer_normalized"]
    table = wandb.Table(
        columns=columns, data=[[t, *(e.get(c) for c in columns[1:])] for t, e in summary.items()]
    )
    numbers = {}
    if agg is not None:
        numbers = {f"aggregate/{k}": v for k, v in agg.items() if k != "iqm_ci"}
        if agg["iqm_ci"]:
            low, high = agg["iqm_ci"]
            numbers.update({"aggregate/iqm_ci_low": low, "aggregate/iqm_ci_high": high})
    run.log(
        {**numbers, "tasks": table, **{f"figures/{p.stem}": wandb.Image(str(p)) for p in images}}
    )
    run.finish()


def _report(summary: Mapping[str, Mapping], agg: Mapping[str, Any] | None) -> str:
    """The summary printed at the end: one line per task, then the aggregates."""
    lines = [f"{'task':<28} {'seeds':>5} {'frames':>11} {'final return':>13} {'gamer-norm':>10}"]
    for task, entry in summary.items():
        gamer = entry.get("final_gamer_normalized")
        lines.append(
            f"{task:<28} {entry['seeds']:>5} {entry['frames']:>11} "
            f"{entry['final_return']:>13.4g} {'-' if gamer is None else f'{gamer:.4g}':>10}"
        )
    if agg is not None:
        ci = "(one seed per task: no CI)"
        if agg["iqm_ci"]:
            low, high = agg["iqm_ci"]
            ci = f"[{low:.4g}, {high:.4g}] ({CONFIDENCE:.0%} CI)"
        lines.append(
            f"over {agg['tasks']} Atari tasks: gamer median {agg['gamer_median']:.4g}, "
            f"gamer mean {agg['gamer_mean']:.4g}, record mean {agg['record_mean']:.4g}, "
            f"clipped record mean {agg['clipped_record_mean']:.4g}, IQM {agg['iqm']:.4g} {ci}"
        )
    return "\n".join(lines)


def check_options(args: argparse.Namespace) -> None:
    """AnalysisError (one line) for an option out of range, before anything is read or made."""
    for name in ("reps", "bins"):
        if getattr(args, name) < 1:
            raise AnalysisError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.reps > MAX_REPS:
        raise AnalysisError(f"--reps must be <= {MAX_REPS}, got {args.reps}")
    if not 0 <= args.seed <= MAX_BOOTSTRAP_SEED:
        raise AnalysisError(f"--seed must be in [0, {MAX_BOOTSTRAP_SEED}], got {args.seed}")


def analyze(args: argparse.Namespace) -> None:
    """The whole command: read, score, write the JSON and the figures, print, log to wandb."""
    check_options(args)
    out = pathlib.Path(args.out)
    check_creatable(out, "output directory")  # before a sweep's worth of reading
    runs = load_runs(args.runs_dir, args.only)
    ensure_writable(out, "output directory")  # created once there is something to write
    baselines = load_baselines()
    summary = task_summary(runs, baselines)
    for line in short_seeds(runs):
        warnings.warn(line, stacklevel=2)
    for task, entry in summary.items():
        if not entry["normalized"]:
            print(
                f"note: {task} has no Atari baselines: raw final return only, "
                "left out of the aggregates"
            )
    agg = aggregate(summary, baselines, args.reps, args.seed)
    if agg is None:
        print("note: no task has Atari baselines, so there are no aggregates")
    elif len({summary[t]["seeds"] for t in summary if summary[t]["normalized"]}) > 1:
        print(
            f"note: tasks have different seed counts; the IQM uses each task's "
            f"{agg['iqm_seeds_per_task']} lowest seeds"
        )
    result = {"runs_dir": str(args.runs_dir), "only": args.only, "tasks": summary, "aggregate": agg}
    text = json.dumps(_finite_or_none(result), indent=2, allow_nan=False)
    write_atomic(out / "aggregate.json", (text + "\n").encode())
    images = write_plots(out, runs, agg, baselines, load_reference_curves(), args.bins)
    stale = sorted({*out.glob("curves_*.png"), *out.glob("aggregate.png")} - set(images))
    if stale:  # kept (never deleted), but named: they are not of these runs
        names = ", ".join(path.name for path in stale)
        warnings.warn(f"{out} also holds figures of an earlier analysis: {names}", stacklevel=2)
    print(_report(summary, agg))
    print(f"wrote {out / 'aggregate.json'} and {len(images)} figures to {out}")
    if args.wandb_mode != "disabled":
        log_wandb(out, summary, agg, images, args.wandb_mode, args.wandb_project, args.wandb_group)


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        error=AnalysisError,
        prog=program_name("dreamer_jax.analyze"),
        formatter_class=_HelpFormatter,
        description=__doc__.splitlines()[0] + " See docs/analysis.md.",
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched for runs")
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where results go, created if missing (required: there is no default)",
    )
    parser.add_argument(
        "--only",
        metavar="GLOB",
        help="only the runs whose folder, relative to RUNS_DIR, matches GLOB "
        "(e.g. '*/kl_balance_off/*' for one variant of a sweep; default: every run)",
    )
    parser.add_argument(
        "--reps", type=int, default=2000, help=f"bootstrap resamples for the CI, 1 to {MAX_REPS}"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help=f"bootstrap seed, 0 to {MAX_BOOTSTRAP_SEED}"
    )
    parser.add_argument("--bins", type=int, default=40, help="frame bins of the curves")
    parser.add_argument(
        "--wandb.mode",
        dest="wandb_mode",
        default="disabled",
        choices=("disabled", "offline", "online"),
    )
    parser.add_argument("--wandb.project", dest="wandb_project", default="dreamer-jax")
    parser.add_argument(
        "--wandb.group", dest="wandb_group", default="", help="e.g. the sweep (default: no group)"
    )
    return parser


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = warn_in_one_line  # a skipped run is one line, not a source dump
        try:
            analyze(_parser().parse_args(argv))
        except (AnalysisError, DirectoryError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
