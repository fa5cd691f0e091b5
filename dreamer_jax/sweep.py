"""Run a grid of training runs from a sweep file: tasks × seeds × variants.

    python -m dreamer_jax.sweep experiments/smoke.yaml --dry-run
    python -m dreamer_jax.sweep experiments/atari55.yaml --jobs 4
    python -m dreamer_jax.sweep experiments/ablations.yaml --only 'atari_pong/*' --launcher slurm

A sweep file (YAML) holds `tasks` and `seeds` (required), and optionally `name` (default:
the file's stem), `configs` (presets), `overrides` (`{dotted.key: value}` or nested),
`variants` (`{variant: overrides}`, default one variant `base` with none), `root` (default
`runs`, relative to the working directory), `seeds_per_run` (default 1: seeds trained
together in one program with `--num_seeds`) and `slurm` (options of `--launcher slurm`).

Each run logs to `<root>/<name>/<task>/<variant>/seed_<s>` (with `seeds_per_run` N > 1:
`.../seeds_<s>-<s+N-1>`, holding a `seed_<s>` folder per seed), its output to that path plus
`.log`. A run whose checkpoints reach its config's `steps` is finished and skipped; one
whose logdir exists is resumed (train resumes by itself); others start fresh. Every run's
config is checked before anything starts; a bad sweep file exits 2 with one line.
More in docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import fnmatch
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from dreamer_jax.config import (
    Config,
    ConfigError,
    OneLineParser,
    changed_keys,
    load_config,
    load_run_config,
    program_name,
)
from dreamer_jax.envs import available_tasks
from dreamer_jax.paths import DirectoryError, check_creatable, ensure_writable
from dreamer_jax.startup import quiet_on_broken_pipe

FIELDS = (
    "name", "configs", "overrides", "tasks", "seeds", "seeds_per_run", "variants", "root",
    "slurm",
)  # fmt: skip
DEFAULT_VARIANT = "base"
# The grid sets these for every run; a sweep file must not.
GRID_KEYS = ("task", "seed", "num_seeds", "logdir")
STATUSES = ("done", "resumed", "skipped", "failed", "interrupted", "not started")
# A name that is one safe path segment, well within a file system's 255 bytes per name.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_SEGMENT_RULE = "1 to 100 letters, digits, '_', '.', '-'"
_LOG_TAIL_BYTES = 4096
POLL_S = 0.2  # how often the local launcher checks its runs


class SweepError(ValueError):
    """A bad sweep file, option or submission. The message is one line."""


class RunFailed(RuntimeError):
    """A run of a Slurm job exited non-zero. The message is one line."""


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file. `overrides` and each variant's are flat `{dotted.key: value}`."""

    path: pathlib.Path
    name: str
    configs: tuple[str, ...]
    overrides: dict[str, Any]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    seeds_per_run: int
    variants: dict[str, dict[str, Any]]
    root: pathlib.Path
    slurm: dict[str, Any]


@dataclass(frozen=True)
class Run:
    """One cell of the grid: its train command and where it logs; `steps` from its config
    (the whole config as `train` will parse the command, None where not built from a sweep
    file). It trains seeds `seed … seed + num_seeds − 1`."""

    task: str
    variant: str
    seed: int
    logdir: pathlib.Path
    command: tuple[str, ...]
    steps: int
    num_seeds: int = 1
    config: Config | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.variant}/{self.logdir.name}"

    @property
    def log(self) -> pathlib.Path:
        """Next to the logdir, so the run's own folder holds only what train writes."""
        return self.logdir.with_name(self.logdir.name + ".log")


@dataclass(frozen=True)
class Outcome:
    run: Run
    status: str  # one of STATUSES
    returncode: int | None = None
    problem: str = ""  # why a failed run could not start (it has no exit code)


@dataclass(frozen=True)
class SlurmJob:
    """What `--launcher slurm` submits for one run: `parameters` go to submitit's
    `AutoExecutor.update_parameters`."""

    command: tuple[str, ...]
    logdir: pathlib.Path
    log: pathlib.Path
    parameters: dict[str, Any]


# ---------------------------------------------------------------------------- sweep file


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (YAML keeps the
    last value without a word; in a sweep file that silently drops a setting)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base loader names an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_sweep(path: str | pathlib.Path) -> Sweep:
    """The sweep file at `path`, its fields type-checked and its tasks known (SweepError)."""
    path = pathlib.Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise SweepError(f"sweep file {path} not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SweepError(f"sweep file {path} cannot be read: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise SweepError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must hold a mapping with at least 'tasks' and 'seeds'")

    def fail(message: str) -> SweepError:
        return SweepError(f"{path}: {message}")

    unknown = sorted(map(str, set(data) - set(FIELDS)))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; a sweep file holds {', '.join(FIELDS)}")
    for field in ("tasks", "seeds"):
        if field not in data:
            raise fail(f"'{field}' is required")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _SEGMENT.fullmatch(name):
        given = "" if "name" in data else ", taken from the file's name: give a 'name'"
        raise fail(f"'name' must be {_SEGMENT_RULE}, got {name!r}{given}")
    root = data.get("root", "runs")
    if not isinstance(root, str) or not root:
        raise fail(f"'root' must be a non-empty path, got {root!r}")
    tasks = _distinct(data["tasks"], str, "tasks", fail)
    known = available_tasks()
    for task in tasks:
        if task not in known:
            close = ", ".join(difflib.get_close_matches(task, known, n=3, cutoff=0.6)) or "none"
            raise fail(f"unknown task '{task}'; close matches: {close}")
    seeds = _distinct(data["seeds"], int, "seeds", fail)
    if any(seed < 0 for seed in seeds):
        raise fail(f"'seeds' must be ints >= 0, got {list(seeds)}")
    per_run = data.get("seeds_per_run", 1)
    if isinstance(per_run, bool) or not isinstance(per_run, int) or per_run < 1:
        raise fail(f"'seeds_per_run' must be an int >= 1, got {per_run!r}")
    for group in _seed_groups(seeds, per_run):
        if len(group) != per_run or group != tuple(range(group[0], group[0] + per_run)):
            raise fail(
                f"'seeds_per_run' {per_run} needs the seeds in runs of {per_run} consecutive "
                f"ints, got {list(group)}"
            )
    configs = data.get("configs", [])
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise fail(f"'configs' must be a list of preset names, got {configs!r}")
    variants = data.get("variants", {DEFAULT_VARIANT: {}})
    if not isinstance(variants, dict) or not variants:
        raise fail(f"'variants' must be a non-empty mapping of name to overrides, got {variants!r}")
    for variant in variants:
        if not isinstance(variant, str):
            # YAML 1.1 reads a bare off/on/yes/no as a bool and 1e3 as a number.
            raise fail(f"variant name {variant!r} is not a string; quote it in the file")
        if not _SEGMENT.fullmatch(variant):
            raise fail(f"variant name {variant!r} must be {_SEGMENT_RULE}")
    slurm = data.get("slurm", {})
    if not isinstance(slurm, dict) or not all(isinstance(key, str) for key in slurm):
        raise fail(f"'slurm' must be a mapping of option to value, got {slurm!r}")
    if "job_name" in slurm:
        raise fail("'slurm' sets no job_name: each job is named after its run")
    if "time" in slurm:
        slurm = {**slurm, "time": _slurm_minutes(slurm["time"], fail)}
    return Sweep(
        path=path,
        name=name,
        configs=tuple(configs),
        overrides=_overrides(data.get("overrides"), "overrides", fail),
        tasks=tasks,
        seeds=seeds,
        seeds_per_run=per_run,
        variants={v: _overrides(o, f"variant '{v}'", fail) for v, o in variants.items()},
        root=pathlib.Path(root).expanduser(),  # as train reads its --logdir
        slurm=dict(slurm),
    )


_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


def _slurm_minutes(value: Any, fail: Callable[[str], SweepError]) -> int:
    """`slurm: time` in minutes, as submitit takes it: an int, or Slurm's own text
    ("2-00:00:00", "12:00:00", "90"), rounded up to whole minutes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SLURM_TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise fail(
            f"'slurm: time' must be minutes (an int > 0) or Slurm's D-HH:MM:SS, got {value!r}"
        )
    days, first, second, third = (int(part) if part else None for part in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    elif third is not None:  # HH:MM:SS
        seconds = (first * 60 + second) * 60 + third
    else:  # MM or MM:SS
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise fail(f"'slurm: time' must be longer than 0, got {value!r}")
    return -(-seconds // 60)


def _seed_groups(seeds: Sequence[int], per_run: int) -> list[tuple[int, ...]]:
    """The seeds, in order, cut into the groups of `per_run` that train together."""
    return [tuple(seeds[i : i + per_run]) for i in range(0, len(seeds), per_run)]


def _distinct(values: Any, kind: type, field: str, fail) -> tuple:
    """`values` as a tuple, if it is a non-empty list of distinct `kind`s."""
    ok = isinstance(values, list) and values
    if not ok or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        what = "ints" if kind is int else "names"
        raise fail(f"'{field}' must be a non-empty list of {what}, got {values!r}")
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise fail(f"'{field}' repeats {', '.join(repeated)}: two runs would share a logdir")
    return tuple(values)


def _overrides(tree: Any, where: str, fail) -> dict[str, Any]:
    """A mapping of overrides (None: none), nested groups flattened to dotted keys."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise fail(f"{where} must be a mapping of config keys to values, got {tree!r}")
    flat = _flatten(tree)
    twice = sorted(key for key, count in Counter(key for key, _ in flat).items() if count > 1)
    if twice:
        raise fail(f"{where} sets {', '.join(twice)} twice (nested and dotted)")
    flat = dict(flat)
    grid = [key for key in flat if key in GRID_KEYS]
    if grid:
        raise fail(f"{where} sets {', '.join(grid)}, which the grid sets for each run")
    return flat


def _flatten(tree: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """`(dotted key, value)` of every leaf, in order; a key set both nested and dotted
    (`kl: {balance: 0.5}` and `kl.balance: 0.6`) comes twice."""
    flat = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat += _flatten(value, f"{prefix}{key}.")
        else:
            flat.append((f"{prefix}{key}", value))
    return flat


def _cli_value(value: Any) -> str:
    """A value as the train command line reads it back (config.parse_args); ConfigError for
    one it cannot: null (no key takes it) and a list item with a comma (the separator)."""
    if value is None:
        raise ConfigError("null is no value of a config key; use '' for an empty string")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        items = [_cli_value(item) for item in value]
        if any("," in item for item in items):
            raise ConfigError(f"a list item cannot hold a comma on the command line: {value!r}")
        return f"[{','.join(items)}]"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # YAML's 1.0e+7: --steps 10000000
    return str(value)


def expand(sweep: Sweep) -> list[Run]:
    """Every run of the grid, tasks outermost, then variants, then seeds. Each command is
    parsed as train will parse it, so a bad key or value fails here (SweepError naming the
    run), before any run starts."""
    runs = []
    for task in sweep.tasks:
        for variant, variant_overrides in sweep.variants.items():
            # The sweep's own settings (base, then variant) win over these defaults.
            overrides = {
                "wandb.group": sweep.name,
                "wandb.tags": [variant],
                **sweep.overrides,
                **variant_overrides,
            }
            for group in _seed_groups(sweep.seeds, sweep.seeds_per_run):
                seed, count = group[0], len(group)
                folder = f"seed_{seed}" if count == 1 else f"seeds_{seed}-{group[-1]}"
                logdir = sweep.root / sweep.name / task / variant / folder
                args = ["--task", task, "--seed", str(seed), "--logdir", str(logdir)]
                if count > 1:
                    args += ["--num_seeds", str(count)]
                if sweep.configs:
                    args = ["--configs", *sweep.configs, *args]
                try:
                    for key, value in overrides.items():
                        text = _cli_value(value)
                        # "--key=--x": a value that looks like an option is still the value.
                        args += [f"--{key}={text}"] if text.startswith("--") else [f"--{key}", text]
                    config = load_config(args)
                except ConfigError as error:
                    name = f"{task}/{variant}/{folder}"
                    raise SweepError(f"{sweep.path}: run {name}: {error}") from None
                command = (sys.executable, "-m", "dreamer_jax.train", *args)
                runs.append(Run(task, variant, seed, logdir, command, config.steps, count, config))
    _refuse_repeated_variants(sweep, runs)
    return runs


def _refuse_repeated_variants(sweep: Sweep, runs: Sequence[Run]) -> None:
    """SweepError when two variants give a run the same config (`kl.balance: 0.8` against
    `kl: {balance: 0.8}`, or a variant that sets the defaults): the second would spend its
    runs repeating the first's."""
    seen: dict[tuple, str] = {}
    for run in runs:
        flat = run.config.flat()
        for key in ("logdir", "wandb.tags"):  # the variant's name only
            flat.pop(key)
        same = (run.task, run.seed, tuple(sorted((k, repr(v)) for k, v in flat.items())))
        first = seen.setdefault(same, run.variant)
        if first != run.variant:
            raise SweepError(
                f"{sweep.path}: variants '{first}' and '{run.variant}' give {run.task} the "
                "same config: the second would repeat the first's runs"
            )


def select(runs: Sequence[Run], pattern: str | None) -> list[Run]:
    """The runs whose `<task>/<variant>/seed_<s>` (or `.../seeds_<a>-<b>`) matches the fnmatch
    `pattern` (None: all)."""
    if pattern is None:
        return list(runs)
    chosen = [run for run in runs if fnmatch.fnmatchcase(run.name, pattern)]
    if not chosen:
        raise SweepError(f"--only '{pattern}' matches no run (runs are named like {runs[0].name})")
    return chosen


# ---------------------------------------------------------------------------- run state


def checkpoint_steps(logdir: pathlib.Path) -> list[int]:
    """The steps of the checkpoints under `<logdir>/checkpoints` (orbax names each step's
    directory by the integer; anything else, like an unfinished save, is not one)."""
    directory = logdir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in directory.iterdir()
        if entry.name.isascii() and entry.name.isdigit() and entry.is_dir()
    )


def run_state(run: Run) -> str:
    """`finished` (its latest checkpoint at `run.steps` or later, readable and owing no
    work: a run stopped during its last evaluation is not), `resume` (the logdir exists) or
    `new`."""
    steps = checkpoint_steps(run.logdir)
    if steps and steps[-1] >= run.steps and _done_at(run.logdir, steps[-1], run.steps):
        return "finished"
    return "resume" if run.logdir.exists() else "new"


def _done_at(logdir: pathlib.Path, step: int, steps: int) -> bool:
    """Whether checkpoint `step` of a run of `steps` has a loop state that matches its
    checksum and owes no updates, evaluation or log row. One that does not read is not
    done: resumed, the run sets it aside and redoes its steps from the checkpoint before
    (its arrays are not read here, a whole sweep's would take minutes)."""
    # jax and flax: only for a run at its end.
    from dreamer_jax.checkpoint import saved_loop_state
    from dreamer_jax.train import owed_work

    loop = saved_loop_state(logdir / "checkpoints" / str(step))
    try:
        return loop is not None and not owed_work(loop, steps)
    except (KeyError, TypeError):  # not a loop state train restores: it sets it aside too
        return False


def finished_run_warnings(run: Run) -> list[str]:
    """Warnings for a finished `run` whose saved config is not the one the sweep file gives
    it now: other values beyond run length and logging (which a resume may change), or a
    latest checkpoint past the file's `steps` (a shorter run is resumed, a longer one is not
    cut back). []
    if it saved no config that can be read (train names that when the run resumes)."""
    if run.config is None or run_state(run) != "finished":
        return []
    try:
        saved = load_run_config(run.logdir / "config.yaml")
    except ConfigError:
        return []
    rename = "give the edited sweep another name to run it"
    warnings = []
    drift = changed_keys(saved, run.config)
    if drift:
        warnings.append(
            f"warning: finished run {run.name} ran with another config than the sweep file "
            f"gives it now (it differs at {', '.join(drift)}); it is skipped as it is: {rename}"
        )
    reached = checkpoint_steps(run.logdir)[-1]  # a finished run has a checkpoint
    if reached > run.config["steps"]:
        warnings.append(
            f"warning: finished run {run.name} ran {reached} steps, more than the "
            f"{run.config['steps']} the sweep file gives it now; it is skipped as it is and "
            f"dreamer-analyze reads all {reached}: {rename}"
        )
    return warnings


def warn_of_drift(runs: Sequence[Run]) -> None:
    """On stderr, `finished_run_warnings` of each run (an unfinished one with another config
    fails with train's own message)."""
    for run in runs:
        for line in finished_run_warnings(run):
            print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- local launcher


def visible_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPUs children may use: the entries of `CUDA_VISIBLE_DEVICES` when it is set,
    else one per `GPU` line of `nvidia-smi -L`, else none."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listing.returncode != 0:
        return []
    gpu_lines = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpu_lines))]


def child_env(environ: Mapping[str, str], gpu: str | None) -> dict[str, str]:
    """The parent's environment, plus: no GPU memory preallocation (unless the parent sets
    it), so several runs fit on one GPU; `gpu` (if any) as the only visible device;
    unbuffered output, so the log follows the run."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


@contextlib.contextmanager
def _log_file(log: pathlib.Path, command: Sequence[str]) -> Iterator[Any]:
    """`log` opened for appending (a resumed run adds to its log), headed by the command."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as file:
        file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        file.flush()
        yield file


class _Interrupts:
    """Counts SIGINT/SIGTERM received while in the block, instead of raising."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.count = 0
        self._previous: dict = {}

    def _handle(self, *_):
        self.count += 1

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _least_loaded(gpus: Sequence[str], busy: Sequence[str | None]) -> str | None:
    """The first of `gpus` with the fewest runs in `busy` (None when there are no GPUs)."""
    if not gpus:
        return None
    load = [busy.count(gpu) for gpu in gpus]
    return gpus[load.index(min(load))]


def _start(run: Run, env: Mapping[str, str]) -> subprocess.Popen:
    """Starts `run` with its output appended to its log, in a session of its own."""
    with _log_file(run.log, run.command) as log:
        return subprocess.Popen(
            run.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _finished(run: Run) -> bool:
    """Whether `run` is finished; one whose state cannot be read is not (its start says why)."""
    try:
        return run_state(run) == "finished"
    except OSError:
        return False


def _os_problem(error: OSError) -> str:
    """`path: reason` for an OSError (the path the OS refused, when it names one)."""
    reason = error.strerror or str(error)
    return f"{error.filename}: {reason}" if error.filename is not None else reason


def _stop(processes: Iterable[subprocess.Popen]) -> None:
    """Sends each run a SIGINT, as Ctrl-C would: train saves a checkpoint and exits."""
    for process in processes:
        process.send_signal(signal.SIGINT)


@contextlib.contextmanager
def _stopped_on_error(running: Iterable[subprocess.Popen]) -> Iterator[None]:
    """On an error of the sweep itself, stops the `running` runs as Ctrl-C does and waits for
    them before it propagates: in sessions of their own, they would go on unattended."""
    try:
        yield
    except BaseException:
        _stop(running)
        for process in running:
            process.wait()
        raise


def run_local(
    runs: Sequence[Run],
    jobs: int,
    gpus: Sequence[str],
    environ: Mapping[str, str] | None = None,
) -> list[Outcome]:
    """Runs the unfinished `runs`, `jobs` at a time, each on the GPU running the fewest
    (round-robin when all are equal); the outcomes come in the order of `runs`.

    A failed run is recorded and the others go on; so is a run that cannot start (its log
    or folder cannot be made, or its command cannot be run), with one line on stderr. On
    SIGINT/SIGTERM no new run starts and each running one gets a SIGINT (train checkpoints
    and exits); the sweep waits for them. A second signal kills them (train keeps its last
    checkpoint through a kill). Children run in sessions of their own, so a terminal's
    Ctrl-C reaches them once, through the sweep; an error of the sweep itself stops them the
    same way.
    """
    environ = os.environ if environ is None else environ
    outcomes: dict[Run, Outcome] = {}
    pending = []
    for run in runs:
        if _finished(run):
            outcomes[run] = Outcome(run, "skipped")
        else:
            pending.append(run)
    total = len(pending)
    running: dict[subprocess.Popen, tuple[Run, str, str | None, float]] = {}
    forwarded = 0
    with _Interrupts() as interrupts, _stopped_on_error(running):
        while running or (pending and not interrupts.count):
            if interrupts.count > forwarded:
                # Two signals before the loop looked are a second request too.
                again, forwarded = forwarded > 0 or interrupts.count > 1, interrupts.count
                if again:
                    # Killed, not signalled: train takes two signals within a second for
                    # one request, and a kill -9 keeps its last checkpoint as well.
                    for process in running:
                        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                            os.killpg(process.pid, signal.SIGKILL)  # its session: all of it
                    print(f"sweep: quitting {len(running)} running run(s) now; each keeps "
                          "its last checkpoint", flush=True)  # fmt: skip
                else:
                    _stop(running)
                    print(
                        f"sweep: interrupted; asked {len(running)} running run(s) to "
                        "checkpoint and stop, starting no more (signal again to quit them now)",
                        flush=True,
                    )
            while pending and len(running) < jobs and not interrupts.count:
                run = pending.pop(0)
                gpu = _least_loaded(gpus, [slot[2] for slot in running.values()])
                try:
                    state = run_state(run)
                    process = _start(run, child_env(environ, gpu))
                except OSError as error:
                    problem = _os_problem(error)
                    outcomes[run] = Outcome(run, "failed", problem=problem)
                    print(f"error: run {run.name} cannot start: {problem}",
                          file=sys.stderr, flush=True)  # fmt: skip
                    continue
                running[process] = (run, state, gpu, time.monotonic())
                device = f" on GPU {gpu}" if gpu is not None else ""
                index = total - len(pending)
                print(f"[{index}/{total}] start {run.name} ({state}){device}, log {run.log}",
                      flush=True)  # fmt: skip
            finished = [process for process in running if process.poll() is not None]
            for process in finished:
                run, state, _, started = running.pop(process)
                code = process.returncode
                if code == 0:
                    status = "resumed" if state == "resume" else "done"
                else:
                    status = "interrupted" if forwarded else "failed"
                outcomes[run] = Outcome(run, status, code)
                took = _duration(time.monotonic() - started)
                print(f"{status} {run.name} (exit {code}, {took})", flush=True)
            if not finished:
                time.sleep(POLL_S)
    for run in pending:
        outcomes[run] = Outcome(run, "not started")
    return [outcomes[run] for run in runs]


def _last_line(path: pathlib.Path) -> str:
    """The last non-empty line of a log (where train writes its one-line error)."""
    try:
        with open(path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def summary(name: str, outcomes: Sequence[Outcome]) -> str:
    """A table of how many runs ended in each status, then each failure's logdir, log and
    last word: the log's last line, or why the run could not start."""
    counts = {status: 0 for status in STATUSES}
    for outcome in outcomes:
        counts[outcome.status] += 1
    lines = [f"sweep {name}: {len(outcomes)} run(s)"]
    lines += [f"  {status:<12} {count}" for status, count in counts.items()]
    failures = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failures:
        lines.append("failed runs:")
    for outcome in failures:
        run = outcome.run
        cause = "could not start" if outcome.problem else f"exit {outcome.returncode}"
        lines += [
            f"  {run.name} ({cause})",
            f"    logdir {run.logdir}",
            f"    log    {run.log}",
            f"    last   {outcome.problem or _last_line(run.log)}",
        ]
    if counts["interrupted"] or counts["not started"]:
        lines.append("run the same command again to resume the unfinished runs")
    return "\n".join(lines)


def exit_code(outcomes: Sequence[Outcome]) -> int:
    """1 if a run failed, else 130 if the sweep was interrupted, else 0."""
    statuses = {outcome.status for outcome in outcomes}
    if "failed" in statuses:
        return 1
    return 128 + signal.SIGINT if statuses & {"interrupted", "not started"} else 0


# ---------------------------------------------------------------------------- slurm launcher


def slurm_jobs(sweep: Sweep, runs: Sequence[Run]) -> list[SlurmJob]:
    """One job per run: the sweep file's `slurm:` options as submitit's `slurm_<option>`
    parameters (`time` in minutes, `partition`, `gpus_per_node`, `mem_gb`, ...), and a job
    name that says which run it is."""
    options = {f"slurm_{key}": value for key, value in sweep.slurm.items()}
    return [
        SlurmJob(
            command=run.command,
            logdir=run.logdir,
            log=run.log,
            parameters={
                **options,
                "slurm_job_name": f"{sweep.name}-{run.task}-{run.variant}-{run.seed}"
                + (f"-{run.seed + run.num_seeds - 1}" if run.num_seeds > 1 else ""),
            },
        )
        for run in runs
    ]


def run_logged(command: Sequence[str], log: str, cwd: str) -> int:
    """The body of a Slurm job: runs `command` in `cwd` with its output appended to `log`.
    Raises RunFailed when it exits non-zero, so the job is marked failed.

    Near its time limit Slurm signals every process of the job (submitit asks for SIGUSR2
    90 s ahead), and SIGUSR2 would kill train on the spot: train runs with it blocked. When
    submitit's handler then ends this function, train gets a SIGINT (it checkpoints and
    exits) and is waited for.
    """
    with _log_file(pathlib.Path(log), command) as file:
        # A blocked signal stays blocked across fork and exec.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        try:
            process = subprocess.Popen(
                list(command), stdout=file, stderr=subprocess.STDOUT, cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},  # one run per job: no GPU sharing
            )  # fmt: skip
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            code = process.wait()
        except BaseException:
            process.send_signal(signal.SIGINT)
            process.wait()
            raise
    if code != 0:
        raise RunFailed(f"exit {code}: {shlex.join(command)}; see {log}")
    return code


def _submitit():
    """The submitit module (an optional dependency, imported only for `--launcher slurm`)."""
    try:
        import submitit
    except ImportError:
        raise SweepError(
            "--launcher slurm needs the submitit package, which is not installed: pip install "
            "submitit (or dreamer-jax[slurm])"
        ) from None
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:  # submitit's own check is a traceback
        raise SweepError(
            f"--launcher slurm finds no Slurm on this machine ({' and '.join(missing)} not on "
            "PATH): submit from a Slurm login node, or run here with --launcher local"
        )
    return submitit


def submit_slurm(sweep: Sweep, jobs: Sequence[SlurmJob]) -> list[str]:
    """Submits each job through submitit; returns the Slurm job ids. submitit's own files
    go to `<root>/<name>/.submitit`."""
    submitit = _submitit()
    folder = sweep.root / sweep.name / ".submitit" / "%j"
    ids = []
    for job in jobs:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        try:
            executor.update_parameters(**job.parameters)
        except (NameError, AssertionError, TypeError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise SweepError(f"{sweep.path}: slurm options: {first}") from None
        try:
            submitted = executor.submit(run_logged, list(job.command), str(job.log), os.getcwd())
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise SweepError(
                f"submitting {job.logdir} failed after {len(ids)} job(s): {first}"
            ) from None
        ids.append(str(submitted.job_id))
        print(f"submitted job {submitted.job_id}: {job.logdir}, log {job.log}", flush=True)
    return ids


# ---------------------------------------------------------------------------- command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        error=SweepError,
        prog=program_name("dreamer_jax.sweep"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="the sweep file (YAML), e.g. experiments/smoke.yaml")
    parser.add_argument(
        "--dry-run", action="store_true", help="print each run's state and command; run nothing"
    )
    parser.add_argument(
        "--only", metavar="PATTERN", help="only the runs whose <task>/<variant>/seed_<s> match"
    )
    parser.add_argument(
        "--jobs", type=_positive, default=1, metavar="N", help="runs at once (local launcher)"
    )
    parser.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: subprocesses on this machine (default); slurm: one job per run (submitit)",
    )
    return parser


def _plan(sweep: Sweep, runs: Sequence[Run], launcher: str) -> str:
    """The dry-run listing: one line per run with its state, logdir and command."""
    lines = []
    if launcher == "slurm":
        options = " ".join(f"slurm_{k}={v}" for k, v in sweep.slurm.items()) or "(none)"
        lines.append(f"# slurm parameters: {options}")
    states = [run_state(run) for run in runs]
    lines += [
        f"{state:<8} {run.logdir}  {shlex.join(run.command)}"
        for state, run in zip(states, runs, strict=True)
    ]
    counts = ", ".join(f"{states.count(s)} {s}" for s in ("new", "resume", "finished"))
    lines.append(f"# {len(runs)} run(s): {counts}")
    return "\n".join(lines)


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        sweep = load_sweep(args.file)
        runs = select(expand(sweep), args.only)
        warn_of_drift(runs)
        if args.dry_run:
            check_creatable(sweep.root / sweep.name, "sweep folder")  # as the run would
            print(_plan(sweep, runs, args.launcher))
            return 0
        slurm = args.launcher == "slurm"
        todo = [run for run in runs if run_state(run) != "finished"] if slurm else []
        if todo:  # nothing to submit needs no submitit; checked before anything is created
            _submitit()
        # A root that cannot hold the sweep (under a file, read-only, full) fails every run.
        ensure_writable(sweep.root / sweep.name, "sweep folder")
        if slurm:
            ids = submit_slurm(sweep, slurm_jobs(sweep, todo)) if todo else []
            print(f"sweep {sweep.name}: {len(ids)} job(s) submitted, "
                  f"{len(runs) - len(todo)} finished run(s) skipped")  # fmt: skip
            return 0
        outcomes = run_local(runs, args.jobs, visible_gpus(os.environ))
    except (SweepError, DirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(sweep.name, outcomes), flush=True)
    return exit_code(outcomes)


if __name__ == "__main__":
    sys.exit(main())
