"""The sweep runner: grid expansion, layout, run states and validation as fast unit tests;
the local launcher with stand-in commands (concurrency, GPU assignment, Ctrl-C) and for real
on tiny cartpole runs; the Slurm launcher by the jobs it would submit to a fake submitit."""

import errno
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import zlib

import pytest
import yaml

from dreamer_jax.config import load_config
from dreamer_jax.envs import ATARI_GAMES
from dreamer_jax.sweep import (
    Run,
    RunFailed,
    exit_code,
    expand,
    load_sweep,
    main,
    run_local,
    run_logged,
    run_state,
    slurm_jobs,
    summary,
    visible_gpus,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"


def write_sweep(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_config(run):
    """The config the run's train command resolves to."""
    assert run.command[1:3] == ("-m", "dreamer_jax.train")
    return load_config(run.command[3:])


def make_checkpoint(logdir, step, next_eval=None, checksum=True):
    """Checkpoint `step` as far as the sweep reads it: its loop state (owing nothing unless
    `next_eval` says so) marked as checksummed, with its CRC-32 as the format defines it
    (`checksum=False`: a checkpoint from before checksums, neither mark nor checksums)."""
    folder = logdir / "checkpoints" / str(step)
    loop = {"step": step, "updates": 9, "updates_owed": 0, "next_eval": next_eval or step + 1}
    if checksum:
        loop["checksummed"] = True
        crc = zlib.crc32(json.dumps(loop, sort_keys=True).encode())
        (folder / "checksums").mkdir(parents=True)
        (folder / "checksums" / "metadata").write_text(json.dumps({"state": {}, "loop": crc}))
    (folder / "loop").mkdir(parents=True)
    (folder / "loop" / "metadata").write_text(json.dumps(loop))


# ---------------------------------------------------------------------------- the grid


def test_grid_expands_tasks_variants_seeds_with_layout_and_overrides(tmp_path):
    path = write_sweep(
        tmp_path,
        f"""
        name: study
        configs: [classic, debug]
        overrides: {{kl.balance: 0.6, dataset: {{batch: 2}}, steps: 1.0e+3}}
        tasks: [classic_cartpole, classic_acrobot]
        seeds: [3, 1]
        variants:
          a: {{kl.balance: 0.5}}
          b: {{kl: {{balance: 0.7}}, encoder.mlp_layers: [8, 8]}}
        root: {tmp_path / "out"}
        """,
    )
    runs = expand(load_sweep(path))
    assert [run.name for run in runs] == [
        f"{task}/{variant}/seed_{seed}"
        for task in ("classic_cartpole", "classic_acrobot")
        for variant in ("a", "b")
        for seed in (3, 1)
    ]
    for run in runs:
        logdir = tmp_path / "out" / "study" / run.task / run.variant / f"seed_{run.seed}"
        assert run.logdir == logdir
        assert run.log == logdir.parent / f"seed_{run.seed}.log"
        config = run_config(run)
        assert (config.task, config.seed, config.logdir) == (run.task, run.seed, str(logdir))
        assert config.dataset.batch == 2 and config.steps == run.steps == 1000
        assert config.kl.balance == {"a": 0.5, "b": 0.7}[run.variant]  # the variant wins
        assert list(config.encoder.mlp_layers) == ([8, 8] if run.variant == "b" else [32, 32])
        assert config.rssm.deter == 32  # the debug preset
        assert config.wandb.group == "study" and list(config.wandb.tags) == [run.variant]


def test_seeds_per_run_packs_consecutive_seeds_into_one_program(tmp_path):
    path = write_sweep(
        tmp_path,
        f"""
        name: packed
        configs: [classic, debug]
        tasks: [classic_cartpole]
        seeds: [4, 5, 6, 7, 0, 1, 2, 3]
        seeds_per_run: 4
        root: {tmp_path}
        """,
    )
    runs = expand(load_sweep(path))
    assert [run.name for run in runs] == [
        "classic_cartpole/base/seeds_4-7",
        "classic_cartpole/base/seeds_0-3",
    ]
    for run, first in zip(runs, (4, 0), strict=True):
        config = run_config(run)
        assert (config.seed, config.num_seeds, run.seed, run.num_seeds) == (first, 4, first, 4)
        assert run.logdir == tmp_path / "packed" / "classic_cartpole" / "base" / run.logdir.name
        assert config.logdir == str(run.logdir)


def test_two_seeds_per_run_train_both_seeds(tmp_path):
    """The smallest packing: each program of `seeds_per_run: 2` trains its two seeds
    (`--num_seeds 2`), not only the first one its folder is named after."""
    path = write_sweep(
        tmp_path,
        f"""
        tasks: [classic_cartpole]
        seeds: [0, 1, 2, 3]
        seeds_per_run: 2
        root: {tmp_path}
        """,
    )
    runs = expand(load_sweep(path))
    assert [run.logdir.name for run in runs] == ["seeds_0-1", "seeds_2-3"]
    for run, first in zip(runs, (0, 2), strict=True):
        config = run_config(run)
        assert (config.seed, config.num_seeds, run.num_seeds) == (first, 2, 2)


def test_without_variants_there_is_one_named_base(tmp_path):
    path = write_sweep(tmp_path, "tasks: [classic_cartpole]\nseeds: [0]\n", name="mine.yaml")
    sweep = load_sweep(path)
    (run,) = expand(sweep)
    assert sweep.name == "mine" and run.variant == "base"
    assert run.logdir == pathlib.Path("runs/mine/classic_cartpole/base/seed_0")
    assert run_config(run).kl.balance == 0.8  # the defaults, untouched


def test_run_state_new_resume_finished(tmp_path):
    logdir = tmp_path / "run"
    run = Run("classic_cartpole", "base", 0, logdir, ("true",), steps=100)
    assert run_state(run) == "new"
    logdir.mkdir()
    assert run_state(run) == "resume"
    make_checkpoint(logdir, 0)
    make_checkpoint(logdir, 50)
    # An unfinished orbax save, a stray folder and a file are not checkpoints.
    (logdir / "checkpoints" / "150.orbax-checkpoint-tmp-1700000000").mkdir()
    (logdir / "checkpoints" / "notes").mkdir()
    (logdir / "checkpoints" / "200").write_text("")
    assert run_state(run) == "resume"
    make_checkpoint(logdir, 100)
    assert run_state(run) == "finished"
    latest = logdir / "checkpoints" / "100"
    # Stopped during its last evaluation: train's resume does it, so the sweep resumes it.
    shutil.rmtree(latest)
    make_checkpoint(logdir, 100, next_eval=100)
    assert run_state(run) == "resume"
    shutil.rmtree(latest)
    make_checkpoint(logdir, 100, checksum=False)  # from before checksums: read unchecked
    assert run_state(run) == "finished"
    (latest / "loop" / "metadata").write_text('{"step": 100}')  # not a loop state train reads
    assert run_state(run) == "resume"


@pytest.mark.parametrize("damage", ["edited", "checksums deleted", "loop deleted", "garbled"])
def test_a_run_whose_latest_checkpoint_is_damaged_is_resumed_not_finished(tmp_path, damage):
    """Resumed, train sets that checkpoint aside and redoes its steps from the one before;
    skipped as finished, the run would stay without a usable last checkpoint."""
    logdir = tmp_path / "run"
    run = Run("classic_cartpole", "base", 0, logdir, ("true",), steps=100)
    make_checkpoint(logdir, 50)
    make_checkpoint(logdir, 100)
    latest = logdir / "checkpoints" / "100"
    loop_file = latest / "loop" / "metadata"
    if damage == "edited":
        loop_file.write_text(loop_file.read_text().replace('"updates": 9', '"updates": 8'))
    elif damage == "checksums deleted":
        shutil.rmtree(latest / "checksums")
    elif damage == "loop deleted":
        loop_file.unlink()
    else:
        loop_file.write_text(loop_file.read_text()[:-5])
    assert run_state(run) == "resume"


def test_dry_run_prints_states_and_commands_and_creates_nothing(tmp_path, capsys):
    root = tmp_path / "runs"
    path = write_sweep(
        tmp_path,
        f"""
        configs: [classic, debug]
        overrides: {{steps: 400}}
        tasks: [classic_cartpole]
        seeds: [0, 1, 2]
        root: {root}
        """,
    )
    runs = expand(load_sweep(path))
    make_checkpoint(runs[0].logdir, 400)
    runs[1].logdir.mkdir(parents=True)
    before = sorted(root.rglob("*"))
    assert main([str(path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [
        [state, str(run.logdir)]
        for state, run in zip(("finished", "resume", "new"), runs, strict=True)
    ]
    for line, run in zip(lines, runs, strict=False):
        assert line.endswith(shlex.join(run.command))
    assert lines[3] == "# 3 run(s): 1 new, 1 resume, 1 finished"
    assert sorted(root.rglob("*")) == before


def test_a_finished_run_with_another_config_than_the_file_is_named_in_a_warning(tmp_path, capsys):
    """A sweep file edited after its runs finished: they are skipped all the same (nothing
    is touched), and each that ran with another config says at which keys, on stderr, in
    `--dry-run` and in a real run alike; run length and logging do not count, except a run
    longer than the file now asks (dreamer-analyze would score all of it)."""
    path = write_sweep(
        tmp_path,
        f"""
        configs: [classic, debug]
        overrides: {{steps: 400}}
        tasks: [classic_cartpole]
        seeds: [0, 1, 2, 3]
        root: {tmp_path / "runs"}
        """,
    )
    runs = expand(load_sweep(path))
    for run, reached in zip(runs, (400, 400, 500, 400), strict=True):
        make_checkpoint(run.logdir, reached)
    runs[0].config.update({"kl.balance": 0.5, "prefill": 200}).save(runs[0].logdir / "config.yaml")
    # Asked for 500 steps, stopped at 400 and finished by the file's 400: nothing to say.
    runs[1].config.update({"log_every": 7, "steps": 500}).save(runs[1].logdir / "config.yaml")
    runs[2].config.update({"steps": 500}).save(runs[2].logdir / "config.yaml")
    (runs[3].logdir / "config.yaml").write_text("{unclosed: [")  # train would name it
    files = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    before = files()
    for args in (["--dry-run"], []):
        assert main([str(path), *args]) == 0
        drift, longer = capsys.readouterr().err.splitlines()
        assert drift.startswith("warning: finished run classic_cartpole/base/seed_0 ran with")
        assert "(it differs at kl.balance, prefill); it is skipped" in drift
        assert longer.startswith(
            "warning: finished run classic_cartpole/base/seed_2 ran 500 steps, more than the "
            "400 the sweep file gives it now; it is skipped as it is and dreamer-analyze"
        )
    assert files() == before


def test_only_filters_runs_by_pattern(tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        f"""
        tasks: [classic_cartpole, classic_acrobot]
        seeds: [0, 1]
        root: {tmp_path}
        """,
    )
    assert main([str(path), "--dry-run", "--only", "classic_a*/seed_1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "classic_acrobot/base/seed_1 " in out[0]
    assert main([str(path), "--dry-run", "--only", "atari_*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only 'atari_*' matches no run" in err


BAD_SWEEPS = [
    ("tasks: [classic_cartpole]\nseeds: [0]\nseed: 1\n", "unknown key(s) seed"),
    ("seeds: [0]\n", "'tasks' is required"),
    ("tasks: [classic_cartpole]\nseeds: '0'\n", "'seeds' must be a non-empty list of ints"),
    ("tasks: [classic_cartpole]\nseeds: [0, true]\n", "'seeds' must be a non-empty list"),
    ("tasks: [classic_cartpole]\nseeds: [1, 1]\n", "'seeds' repeats 1"),
    ("tasks: [classic_cartpol]\nseeds: [0]\n", "unknown task 'classic_cartpol'; close matches: "
     "classic_cartpole"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nname: a/b\n", "'name' must be"),
    ("tasks: [classic_cartpole]\nseeds: [0]\noverrides: {seed: 3}\n",
     "overrides sets seed, which the grid sets"),
    ("tasks: [classic_cartpole]\nseeds: [0]\noverrides: {num_seeds: 3}\n",
     "overrides sets num_seeds, which the grid sets"),
    ("tasks: [classic_cartpole]\nseeds: [0, 1]\nseeds_per_run: 0\n",
     "'seeds_per_run' must be an int >= 1, got 0"),
    ("tasks: [classic_cartpole]\nseeds: [0, 2]\nseeds_per_run: 2\n",
     "needs the seeds in runs of 2 consecutive ints, got [0, 2]"),
    ("tasks: [classic_cartpole]\nseeds: [0, 1, 2]\nseeds_per_run: 2\n",
     "needs the seeds in runs of 2 consecutive ints, got [2]"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nvariants: {v: [1]}\n", "variant 'v' must be a map"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nconfigs: [nope]\n",
     "run classic_cartpole/base/seed_0: unknown config preset 'nope'"),
    ("tasks: [classic_cartpole]\nseeds: [0, 7]\nvariants: {kl_off: {kl.balance: 2}}\n",
     "run classic_cartpole/kl_off/seed_0: config key 'kl.balance' expects a number in [0, 1]"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nvariants: {off: {}}\n",
     "variant name False is not a string; quote it"),
    ("tasks: [classic_cartpole]\nseeds: [0]\noverrides: {steps: 5, steps: 6}\n",
     "not valid YAML at line 3: key 'steps' appears twice"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nseeds: [1]\n",
     "not valid YAML at line 3: key 'seeds' appears twice"),
    ("tasks: [classic_cartpole]\nseeds: [0]\n"
     "variants: {v: {kl: {balance: 0.5}, kl.balance: 0.6}}\n",
     "variant 'v' sets kl.balance twice (nested and dotted)"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nvariants: {x: {rssm: {detr: 3}}}\n",
     "run classic_cartpole/x/seed_0: unknown config key 'rssm.detr'"),
    # A folder name past the file system's 255 bytes would fail only when a run starts.
    (f"tasks: [classic_cartpole]\nseeds: [0]\nvariants: {{{'v' * 101}: {{}}}}\n",
     f"variant name '{'v' * 101}' must be 1 to 100 letters"),
    (f"tasks: [classic_cartpole]\nseeds: [0]\nname: {'n' * 101}\n", "'name' must be 1 to 100"),
    ("tasks: [classic_cartpole]\nseeds: [0]\n"
     "variants: {a: {kl.balance: 0.5}, b: {kl: {balance: 0.5}}}\n",
     "variants 'a' and 'b' give classic_cartpole the same config"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nvariants: {base: {}, none: {}}\n",
     "variants 'base' and 'none' give classic_cartpole the same config"),
    ("tasks: [classic_cartpole\n", "is not valid YAML at line"),
    ("- 1\n", "must hold a mapping"),
    # The command line cannot say these (QA: null became 'None', a comma two tags).
    ("tasks: [classic_cartpole]\nseeds: [0]\noverrides: {wandb.entity: null}\n",
     "run classic_cartpole/base/seed_0: null is no value of a config key; use ''"),
    ("tasks: [classic_cartpole]\nseeds: [0]\noverrides: {wandb.tags: ['a,b', c]}\n",
     "a list item cannot hold a comma on the command line: ['a,b', 'c']"),
    # QA: a time submitit cannot read broke its requeue on preemption; a job_name was dropped.
    ("tasks: [classic_cartpole]\nseeds: [0]\nslurm: {time: abc}\n",
     "'slurm: time' must be minutes (an int > 0) or Slurm's D-HH:MM:SS, got 'abc'"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nslurm: {time: '0:00'}\n",
     "'slurm: time' must be longer than 0"),
    # An int 0 is Slurm's "no time limit", not the minutes a job asks for.
    ("tasks: [classic_cartpole]\nseeds: [0]\nslurm: {time: 0}\n",
     "'slurm: time' must be minutes (an int > 0) or Slurm's D-HH:MM:SS, got 0"),
    ("tasks: [classic_cartpole]\nseeds: [0]\nslurm: {job_name: x}\n",
     "'slurm' sets no job_name: each job is named after its run"),
]  # fmt: skip


@pytest.mark.parametrize("text, fragment", BAD_SWEEPS)
def test_bad_sweep_file_is_one_line_naming_the_file(tmp_path, capsys, text, fragment):
    path = write_sweep(tmp_path, text)
    assert main([str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and str(path) in captured.err
    assert fragment in captured.err


def test_a_name_taken_from_a_bad_file_name_says_so(tmp_path, capsys):
    path = write_sweep(tmp_path, "tasks: [classic_cartpole]\nseeds: [0]\n", name="my sweep.yaml")
    assert main([str(path), "--dry-run"]) == 2
    assert "got 'my sweep', taken from the file's name: give a 'name'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [(["missing.yaml"], "sweep file missing.yaml not found"),
     (["x.yaml", "--jobs", "0"], "argument --jobs: must be an int >= 1, got '0'"),
     (["x.yaml", "--launcher", "pbs"], "argument --launcher: invalid choice: 'pbs'")],
)  # fmt: skip
def test_bad_command_line_is_one_line(capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_help_exits_0_with_the_sweep_file_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--launcher" in out and "<task>/<variant>/seed_<s>" in out


def test_shipped_sweeps_expand_to_the_intended_grids():
    atari = expand(load_sweep(EXPERIMENTS / "atari55.yaml"))
    assert len(atari) == 55 * 5
    assert {run.task for run in atari} == {f"atari_{game}" for game in ATARI_GAMES}
    assert {run.seed for run in atari} == set(range(5))
    config = run_config(atari[0])
    assert config.action_repeat == 4 and config.steps == 5e7 and config.rssm.deter == 600

    pong = expand(load_sweep(EXPERIMENTS / "pong_seeds.yaml"))
    assert {run.task for run in pong} == {"atari_pong"} and len(pong) == 10

    ablations = expand(load_sweep(EXPERIMENTS / "ablations.yaml"))
    settings = {
        run.variant: (run_config(run).kl.balance, run_config(run).actor_grad)
        for run in ablations
        if run.task == "atari_pong" and run.seed == 0
    }
    assert settings == {
        "reinforce": (0.8, "reinforce"),
        "kl_balance_off": (0.5, "reinforce"),
        "dynamics": (0.8, "dynamics"),
    }

    smoke = expand(load_sweep(EXPERIMENTS / "smoke.yaml"))
    assert [run.name for run in smoke] == [f"classic_cartpole/base/seed_{s}" for s in (0, 1)]
    assert run_config(smoke[0]).rssm.deter == 32 and smoke[0].steps == 400


# ---------------------------------------------------------------------------- local launcher


def test_visible_gpus_from_cuda_visible_devices_or_nvidia_smi(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    tools = tmp_path / "bin"
    tools.mkdir()
    assert visible_gpus({"PATH": str(tools)}) == []  # no nvidia-smi: a CPU machine
    smi = tools / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\n"
        "echo '  MIG 3g.40gb Device 0: (UUID: MIG-b)'\n"
        "echo 'GPU 1: NVIDIA H100 (UUID: GPU-c)'\n"
    )
    smi.chmod(0o755)
    assert visible_gpus({"PATH": str(tools)}) == ["0", "1"]


# Records its environment, then waits until `count` runs have recorded theirs: it exits 0
# only if all ran at once.
TOGETHER = """
import os, pathlib, sys, time
marks, name, count = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
env = [os.environ.get(k, "-") for k in
       ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE", "SWEEP_TEST_VAR")]
(marks / name).write_text(" ".join(env))
deadline = time.monotonic() + 20
while len(list(marks.iterdir())) < count:
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
"""


def test_jobs_run_at_once_with_gpus_round_robin_and_the_parent_environment(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    runs = [
        Run("t", "v", seed, tmp_path / "runs" / f"seed_{seed}",
            (sys.executable, "-c", TOGETHER, str(marks), f"seed_{seed}", "3"), steps=1)
        for seed in range(3)
    ]  # fmt: skip
    environ = {**os.environ, "SWEEP_TEST_VAR": "inherited"}
    environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    environ.pop("CUDA_VISIBLE_DEVICES", None)
    outcomes = run_local(runs, jobs=3, gpus=["0", "1"], environ=environ)
    assert [(o.status, o.returncode) for o in outcomes] == [("done", 0)] * 3
    seen = {path.name: path.read_text().split() for path in marks.iterdir()}
    assert seen == {
        "seed_0": ["0", "false", "inherited"],
        "seed_1": ["1", "false", "inherited"],
        "seed_2": ["0", "false", "inherited"],
    }


# Marks that it started; on SIGINT marks that it stopped and exits 130 (as train does).
PATIENT = """
import pathlib, signal, sys, time
marks, name = pathlib.Path(sys.argv[1]), sys.argv[2]
def stop(*_):
    time.sleep(0.3)  # a checkpoint being written
    (marks / f"stopped_{name}").write_text("")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
(marks / f"started_{name}").write_text("")
time.sleep(60)
"""

SWEEP_PROGRAM = """
import pathlib, sys
from dreamer_jax.sweep import Run, exit_code, run_local, summary
marks = pathlib.Path(sys.argv[1])
runs = [Run("t", "v", s, marks / "runs" / f"seed_{s}",
            (sys.executable, "-c", sys.argv[2], str(marks), str(s)), 1) for s in range(3)]
outcomes = run_local(runs, jobs=2, gpus=[])
print(summary("patient", outcomes), flush=True)
sys.exit(exit_code(outcomes))
"""


def _interrupt_sweep(folder: pathlib.Path, child: str, signal_at: list[list[str]], timeout: float):
    """Runs `SWEEP_PROGRAM` with runs of `child` and sends it a SIGINT as soon as the runs have
    left each list of marks of `signal_at` in `folder` (60 s at most each); its exit code and
    output, within `timeout` s of the last signal."""
    sweep = subprocess.Popen(
        [sys.executable, "-c", SWEEP_PROGRAM, str(folder), child],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for marks in signal_at:
            deadline = time.monotonic() + 60
            while not all((folder / mark).exists() for mark in marks):
                assert time.monotonic() < deadline and sweep.poll() is None
                time.sleep(0.05)
            sweep.send_signal(signal.SIGINT)
        out, _ = sweep.communicate(timeout=timeout)
    finally:
        sweep.kill()
    return sweep.returncode, out


def test_sigint_on_the_sweep_stops_the_runs_gracefully_and_waits(tmp_path):
    code, out = _interrupt_sweep(tmp_path, PATIENT, [["started_0", "started_1"]], timeout=60)
    assert code == 130, out
    # Both running runs got the signal and were waited for; the third never started.
    assert (tmp_path / "stopped_0").exists() and (tmp_path / "stopped_1").exists()
    assert not (tmp_path / "started_2").exists()
    assert "interrupted  2" in out and "not started  1" in out and "Traceback" not in out


# Marks that it was asked to stop, then takes its time (a long step or compile).
SLOW_TO_STOP = """
import pathlib, signal, sys, time
marks, name = pathlib.Path(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGINT, lambda *_: (marks / f"asked_{name}").write_text(""))
(marks / f"started_{name}").write_text("")
time.sleep(60)
"""


def test_a_second_sigint_on_the_sweep_quits_the_runs_now(tmp_path):
    # The second signal as soon as the first arrived; the runs' own 60 s not waited for.
    signal_at = [["started_0", "started_1"], ["asked_0", "asked_1"]]
    code, out = _interrupt_sweep(tmp_path, SLOW_TO_STOP, signal_at, timeout=30)
    assert code == 130, out
    assert "sweep: quitting 2 running run(s) now; each keeps its last checkpoint" in out
    assert "interrupted  2" in out and "not started  1" in out and "Traceback" not in out


def test_runs_that_cannot_start_fail_with_one_line_each_and_the_others_go_on(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    ok = (sys.executable, "-c", "pass")
    runs = [
        Run("t", "v", 0, runs_dir / "seed_0", ok, steps=1),
        Run("t", "v", 1, runs_dir / "seed_1", ok, steps=1),  # its log is a directory
        Run("t", "v", 2, runs_dir / "seed_2", (str(tmp_path / "no-python"),), steps=1),
        # A folder name past the OS's limit: even the run's state cannot be read.
        Run("t", "v", 3, runs_dir / ("x" * 300) / "seed_3", ok, steps=1),
        Run("t", "v", 4, runs_dir / "seed_4", ok, steps=1),
    ]
    (runs[1].log / "kept").mkdir(parents=True)
    outcomes = run_local(runs, jobs=2, gpus=[])
    assert [o.status for o in outcomes] == ["done", "failed", "failed", "failed", "done"]
    assert (runs[1].log / "kept").is_dir()  # nothing in the way is touched
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"error: run t/v/seed_1 cannot start: {runs[1].log}: Is a directory",
        f"error: run t/v/seed_2 cannot start: {tmp_path / 'no-python'}: No such file or directory",
        f"error: run t/v/seed_3 cannot start: {runs[3].logdir / 'checkpoints'}: File name too long",
    ]
    assert exit_code(outcomes) == 1
    table = summary("s", outcomes)
    assert "done         2" in table and "failed       3" in table
    assert f"  t/v/seed_1 (could not start)\n    logdir {runs[1].logdir}\n" in table
    assert f"    last   {runs[1].log}: Is a directory" in table


def test_a_log_in_the_way_fails_that_run_with_one_line_and_the_summary(tmp_path, capsys):
    path = write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path)))
    finished, blocked = expand(load_sweep(path))
    make_checkpoint(finished.logdir, 400)
    blocked.log.mkdir()
    assert main([str(path)]) == 1
    captured = capsys.readouterr()
    error = f"error: run {blocked.name} cannot start: {blocked.log}: Is a directory\n"
    assert captured.err == error
    assert "skipped      1" in captured.out and "failed       1" in captured.out
    assert f"{blocked.name} (could not start)" in captured.out
    assert blocked.log.is_dir() and not blocked.logdir.exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
@pytest.mark.parametrize("root, fragment", [
    ("afile/runs", "runs/sweep is not writable: Not a directory"),  # the root under a file
    (".", "sweep is a file, not a directory"),  # the sweep's own folder is a file
])  # fmt: skip
def test_a_sweep_root_that_cannot_hold_the_sweep_is_one_line_before_any_run(
    tmp_path, capsys, root, fragment, dry_run
):
    # A dry run, which creates nothing, says so too: its plan would not run.
    for name in ("afile", "sweep"):
        (tmp_path / name).write_text("kept")
    path = write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path / root)))
    before = sorted(tmp_path.rglob("*"))
    assert main([str(path), *dry_run]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: sweep folder ") and fragment in captured.err
    assert sorted(tmp_path.rglob("*")) == before
    assert (tmp_path / "afile").read_text() == (tmp_path / "sweep").read_text() == "kept"


class GoneStdout:
    """A stdout whose reader has gone (`sweep ... | head`), found out once `started` exists
    (the run is up, its SIGINT handler set)."""

    def __init__(self, started):
        self.started = started

    def write(self, text):
        deadline = time.monotonic() + 60
        while not self.started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        pass


def test_an_error_of_the_sweep_itself_stops_its_running_runs_and_waits(tmp_path, monkeypatch):
    command = (sys.executable, "-c", PATIENT, str(tmp_path), "0")
    run = Run("t", "v", 0, tmp_path / "runs" / "seed_0", command, steps=1)
    monkeypatch.setattr(sys, "stdout", GoneStdout(tmp_path / "started_0"))
    with pytest.raises(BrokenPipeError):
        run_local([run], jobs=1, gpus=[])
    # The run got a SIGINT, checkpointed and was waited for: it is not left running.
    assert (tmp_path / "stopped_0").exists()


def write_smoke_sweep(tmp_path, seeds):
    """experiments/smoke.yaml with other seeds, its runs under `tmp_path/runs`."""
    data = yaml.safe_load((EXPERIMENTS / "smoke.yaml").read_text())
    data.update(seeds=seeds, root="runs")
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_sweep(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "dreamer_jax.sweep", *map(str, args)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow  # two real training runs: 15-35 s on 2 cores
def test_local_sweep_for_real_finishes_reports_a_failure_then_skips(tmp_path):
    path = write_smoke_sweep(tmp_path, [0, 1, 2])
    base = pathlib.Path("runs/smoke/classic_cartpole/base")
    # A logdir with metrics but no checkpoint: train refuses it (exit 2) at run time. It is
    # the first run, so the runs after it show that the sweep goes on.
    doomed = tmp_path / base / "seed_0"
    doomed.mkdir(parents=True)
    (doomed / "metrics.jsonl").write_text('{"step": 0}\n')

    first = run_sweep(tmp_path, path, "--jobs", "2")
    assert first.returncode == 1, first.stdout + first.stderr
    out = first.stdout
    assert "done         2" in out and "failed       1" in out and "resumed      0" in out
    assert f"logdir {base / 'seed_0'}" in out and f"log    {base / 'seed_0.log'}" in out
    assert "holds a run's metrics or replay but no checkpoint" in out  # the log's last line
    for seed in (1, 2):
        checkpoints = (tmp_path / base / f"seed_{seed}" / "checkpoints").iterdir()
        assert max(int(checkpoint.name) for checkpoint in checkpoints) >= 400

    logs = {seed: (tmp_path / base / f"seed_{seed}.log").read_text() for seed in (1, 2)}
    second = run_sweep(tmp_path, path, "--only", "*/seed_[12]")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "skipped      2" in second.stdout and "done         0" in second.stdout
    assert logs == {seed: (tmp_path / base / f"seed_{seed}.log").read_text() for seed in (1, 2)}


# ---------------------------------------------------------------------------- slurm launcher


SLURM_SWEEP = """
configs: [classic, debug]
overrides: {steps: 400}
tasks: [classic_cartpole]
seeds: [0, 1]
root: ROOT
slurm: {partition: gpu, time: 60, gpus_per_node: 1, mem_gb: 16, account: lab}
"""


def test_slurm_job_specs(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path))))
    runs = expand(sweep)
    jobs = slurm_jobs(sweep, runs)
    assert [(job.command, job.logdir, job.log) for job in jobs] == [
        (run.command, run.logdir, run.log) for run in runs
    ]
    assert jobs[1].parameters == {
        "slurm_partition": "gpu",
        "slurm_time": 60,
        "slurm_gpus_per_node": 1,
        "slurm_mem_gb": 16,
        "slurm_account": "lab",
        "slurm_job_name": "sweep-classic_cartpole-base-1",
    }


@pytest.mark.parametrize(
    "time, minutes",
    [(90, 90), ("90", 90), ("1:30", 2), ("12:00:00", 720), ("2-00:00:00", 2880), ("1-02:03", 1563)],
)
def test_a_slurm_time_in_slurms_own_format_is_given_to_submitit_in_minutes(tmp_path, time, minutes):
    text = SLURM_SWEEP.replace("ROOT", str(tmp_path)).replace("time: 60", f"time: '{time}'")
    (job, _) = slurm_jobs(sweep := load_sweep(write_sweep(tmp_path, text)), expand(sweep))
    assert job.parameters["slurm_time"] == minutes


def test_overrides_reach_train_as_the_file_wrote_them(tmp_path):
    """A string that looks like an option goes as `--key=value` (QA: refused as 'no
    value'); an empty string stays empty."""
    path = write_sweep(
        tmp_path,
        """
        tasks: [classic_cartpole]
        seeds: [0]
        overrides: {wandb.notes: --lr sweep, wandb.entity: '', wandb.tags: [a b, c]}
        """,
    )
    (run,) = expand(load_sweep(path))
    assert "--wandb.notes=--lr sweep" in run.command
    config = run_config(run)
    assert (config.wandb.notes, config.wandb.entity) == ("--lr sweep", "")
    assert list(config.wandb.tags) == ["a b", "c"]


def test_a_root_under_home_is_where_train_puts_the_runs(tmp_path, monkeypatch):
    """`root: ~/runs` is the home folder's, as train reads a --logdir (QA: the sweep looked
    in ./~/runs, so a finished run was never seen as finished)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_sweep(tmp_path, "tasks: [classic_cartpole]\nseeds: [0]\nroot: ~/runs\n")
    (run,) = expand(load_sweep(path))
    assert run.logdir == tmp_path / "home" / "runs" / "sweep" / "classic_cartpole/base/seed_0"
    make_checkpoint(run.logdir, run.steps)
    assert run_state(run) == "finished"


class FakeExecutor:
    """Records what submitit's AutoExecutor would be asked to do."""

    submitted: list = []

    def __init__(self, folder, cluster=None):
        self.folder, self.cluster, self.parameters = folder, cluster, {}

    def update_parameters(self, **parameters):
        self.parameters.update(parameters)

    def submit(self, function, *args):
        FakeExecutor.submitted.append((self.folder, self.cluster, self.parameters, function, args))
        return types.SimpleNamespace(job_id=str(1000 + len(FakeExecutor.submitted)))


def fake_slurm(folder, monkeypatch):
    """`sbatch` and `srun` on PATH, as on a Slurm login node (they are never run)."""
    folder.mkdir()
    for command in ("sbatch", "srun"):
        (folder / command).write_text("#!/bin/sh\nexit 1\n")
        (folder / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_slurm_launcher_submits_the_unfinished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=FakeExecutor))
    fake_slurm(tmp_path / "bin", monkeypatch)
    monkeypatch.setattr(FakeExecutor, "submitted", [])
    path = write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path)))
    finished, todo = expand(load_sweep(path))
    make_checkpoint(finished.logdir, 400)
    assert main([str(path), "--launcher", "slurm"]) == 0
    ((folder, cluster, parameters, function, args),) = FakeExecutor.submitted
    assert cluster == "slurm" and folder == tmp_path / "sweep" / ".submitit" / "%j"
    assert parameters == slurm_jobs(load_sweep(path), [todo])[0].parameters
    assert function is run_logged
    assert args == (list(todo.command), str(todo.log), os.getcwd())
    out = capsys.readouterr().out
    assert f"submitted job 1001: {todo.logdir}" in out
    assert "1 job(s) submitted, 1 finished run(s) skipped" in out


def test_slurm_without_submitit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` fail
    path = write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path)))
    assert main([str(path), "--launcher", "slurm"]) == 2
    assert capsys.readouterr().err == (
        "error: --launcher slurm needs the submitit package, which is not installed: pip "
        "install submitit (or dreamer-jax[slurm])\n"
    )
    assert not (tmp_path / load_sweep(path).name).exists()  # found before anything is made
    # Once every run is finished there is nothing to submit, and no need of submitit.
    for run in expand(load_sweep(path)):
        make_checkpoint(run.logdir, 400)
    assert main([str(path), "--launcher", "slurm"]) == 0
    assert "0 job(s) submitted, 2 finished run(s) skipped" in capsys.readouterr().out


def test_slurm_on_a_machine_without_slurm_is_one_line(tmp_path, monkeypatch, capsys):
    """submitit installed but no sbatch or srun (QA: submitit's traceback, exit 1, and an
    empty sweep folder left behind)."""
    monkeypatch.setitem(sys.modules, "submitit", types.SimpleNamespace(AutoExecutor=FakeExecutor))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    path = write_sweep(tmp_path, SLURM_SWEEP.replace("ROOT", str(tmp_path)))
    assert main([str(path), "--launcher", "slurm"]) == 2
    assert capsys.readouterr().err == (
        "error: --launcher slurm finds no Slurm on this machine (sbatch and srun not on PATH): "
        "submit from a Slurm login node, or run here with --launcher local\n"
    )
    assert not (tmp_path / load_sweep(path).name).exists()


# A Slurm job's body as submitit runs it: its SIGUSR2 handler raises (the job timed out).
SLURM_JOB = """
import signal, sys
from dreamer_jax.sweep import run_logged
def timed_out(*_):
    raise RuntimeError("job timed out")
signal.signal(signal.SIGUSR2, timed_out)
marks, log, name = sys.argv[2:5]
run_logged([sys.executable, "-c", sys.argv[1], marks, name], log, marks)
"""


def test_slurm_job_time_limit_signal_lets_train_checkpoint(tmp_path):
    log = tmp_path / "seed_0.log"
    job = subprocess.Popen(
        [sys.executable, "-c", SLURM_JOB, PATIENT, str(tmp_path), str(log), "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started_0").exists():
            assert time.monotonic() < deadline and job.poll() is None
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGUSR2)  # Slurm signals every process of the job
        out, _ = job.communicate(timeout=60)
    finally:
        job.kill()
    # The run survived SIGUSR2, got a SIGINT and was waited for; then the job ended.
    assert (tmp_path / "stopped_0").exists()
    assert job.returncode == 1 and out.strip().endswith("RuntimeError: job timed out")


def test_run_logged_appends_output_and_raises_on_failure(tmp_path):
    log = tmp_path / "logs" / "seed_0.log"
    ok = [sys.executable, "-c", "import os; print('hello', os.getcwd())"]
    assert run_logged(ok, str(log), str(tmp_path)) == 0
    fail = [sys.executable, "-c", "import sys; sys.exit('error: boom')"]
    with pytest.raises(RunFailed, match=r"^exit 1: .*; see .*seed_0\.log$"):
        run_logged(fail, str(log), str(tmp_path))
    lines = log.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("# ") and lines[2].startswith("# ")
    assert lines[1] == f"hello {tmp_path}" and lines[3] == "error: boom"
