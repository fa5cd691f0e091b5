"""Kill a real training run at random moments and check that it always recovers.

    python scripts/chaos.py --kills 3 [--seed 0] [--num_seeds 1] [--logdir DIR] [-- extra options]

Starts `python -m dreamer_jax.train` on a tiny classic-control config, SIGKILLs it at a
random moment K times (each once the run is a random number of steps, up to two checkpoint
intervals, past where it last resumed), restarts it each time, then lets it finish.
Checks, every time:
- it resumes (after the first checkpoint exists) and its step never goes back past the
  last checkpoint seen before the kill;
- every episode file finished before a kill is still there, loads (allow_pickle=False),
  and is in the replay after the restart (none skipped as corrupt), or, if it finished after
  the checkpoint the run resumes from, is kept in `replay_after_checkpoint/` (those steps
  are collected again);
- the final run exits 0 and metrics.jsonl has strictly increasing, unique steps.
With `--num_seeds N` the run trains seeds 0..N-1 in one program and every seed's folder is
checked. `--seed` seeds the kill moments.
Prints one line per kill and a summary; exits 1 on the first failed check.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from dreamer_jax.logger import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPISODE = re.compile(r"^(\d+)-(\d+)\.npz$")
CHECKPOINT_EVERY = 300
TRAIN = [
    "--configs", "classic", "debug", "--task", "classic_cartpole",
    "--checkpoint_every", str(CHECKPOINT_EVERY), "--log_every", "100", "--eval_every", "1000",
    "--wandb.mode", "disabled",
]  # fmt: skip
LOGGED_STEP = re.compile(r'"step": (\d+)')


def logged_step(folder: pathlib.Path) -> int:
    """The latest step in `folder`'s metrics.jsonl (0 before its first row)."""
    path = folder / "metrics.jsonl"
    steps = LOGGED_STEP.findall(path.read_text()) if path.exists() else []
    return int(steps[-1]) if steps else 0


class ChaosFailure(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ChaosFailure(message)


def seed_dirs(logdir: pathlib.Path, num_seeds: int) -> list[pathlib.Path]:
    """Where each seed's replay and metrics are (train.py's layout)."""
    return [logdir] if num_seeds == 1 else [logdir / f"seed_{s}" for s in range(num_seeds)]


def episode_files(folders: list[pathlib.Path]) -> dict[pathlib.Path, int]:
    """Final episode files of every seed and their lengths."""
    files = {}
    for replay in (folder / "replay" for folder in folders):
        if replay.is_dir():
            files.update(
                {p: int(m.group(2)) for p in replay.iterdir() if (m := EPISODE.match(p.name))}
            )
    return files


def set_aside(folders: list[pathlib.Path]) -> set[tuple[pathlib.Path, str]]:
    """`(replay folder, file name)` of the episode files a restart has set aside."""
    return {
        (folder / "replay", path.name)
        for folder in folders
        for path in (folder / "replay_after_checkpoint").glob("*/*.npz")
    }


def checkpoint_steps(logdir: pathlib.Path) -> list[int]:
    directory = logdir / "checkpoints"
    if not directory.is_dir():
        return []
    done = [p for p in directory.iterdir() if p.name.isdigit() and (p / "loop").exists()]
    return sorted(int(p.name) for p in done)


def start(
    logdir: pathlib.Path, steps: int, extra: list[str]
) -> tuple[subprocess.Popen, pathlib.Path]:
    log = logdir.parent / f"{logdir.name}-{time.time_ns()}.log"
    handle = log.open("w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Restarts reuse compiled programs, as a real restarted job on the same machine would.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax_cache"))
    command = [sys.executable, "-m", "dreamer_jax.train", *TRAIN, "--steps", str(steps)]
    command += ["--logdir", str(logdir)]
    process = subprocess.Popen(command + extra, stdout=handle, stderr=subprocess.STDOUT, env=env)
    return process, log


def wait_for(log: pathlib.Path, pattern: str, process: subprocess.Popen, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return match
        if process.poll() is not None:
            return re.search(pattern, log.read_text())
        time.sleep(0.2)
    return None


def verify_restart(log, process, files_before, last_checkpoint, minimum_length, folders):
    """After a restart: resumed from >= the last checkpoint, replay complete and clean (every
    file it kept loaded; none lost, the ones it set aside kept aside)."""
    started = wait_for(log, r"replay: (\d+) episodes, \d+ steps, (\d+) files skipped", process, 300)
    check(started is not None, f"restart did not start: {log.read_text()[-2000:]}")
    resumed = re.search(r"resuming from checkpoint at step (\d+)", log.read_text())
    if last_checkpoint is not None:
        check(resumed is not None, "a checkpoint existed but the run did not resume")
        check(
            int(resumed.group(1)) >= last_checkpoint,
            f"resumed at {resumed.group(1)}, before the last checkpoint {last_checkpoint}",
        )
    episodes, skipped = int(started.group(1)), int(started.group(2))
    check(skipped == 0, f"{skipped} corrupt replay files after a kill")
    aside = set_aside(folders)
    kept = {p: n for p, n in files_before.items() if (p.parent, p.name) not in aside}
    expected = sum(1 for length in kept.values() if length >= minimum_length)
    check(episodes >= expected, f"replay holds {episodes} episodes, {expected} finished before")
    return int(resumed.group(1)) if resumed else 0


def run(kills: int, seed: int, logdir: pathlib.Path, extra: list[str], num_seeds: int) -> None:
    rng = np.random.default_rng(seed)
    folders = seed_dirs(logdir, num_seeds)
    extra = [*extra, "--num_seeds", str(num_seeds)]
    minimum_length = 10  # the debug preset's replay.minlen and dataset.length
    # Each kill comes after at least one new checkpoint (300 steps), often more: leave room.
    steps = 1000 * (kills + 2)
    process, log = start(logdir, steps, extra)
    killed = 0
    check(wait_for(log, r"dreamer-jax:", process, 300) is not None, log.read_text()[-2000:])
    resumed = 0
    for kill in range(kills):
        # A random moment after the run has made progress past its last resume point: a new
        # checkpoint exists and the log has reached a random step up to one checkpoint
        # interval past it, then 0-0.5 s more (mid-update, mid-episode or mid-save). Chosen
        # by step, not by time: with compiled programs cached a run can take 700 steps a
        # second, and a few seconds' wait once ran past the run's end.
        target = resumed + CHECKPOINT_EVERY + int(rng.integers(0, CHECKPOINT_EVERY))
        deadline = time.time() + 600
        while time.time() < deadline and process.poll() is None:
            checkpointed = any(step > resumed for step in checkpoint_steps(logdir))
            if checkpointed and logged_step(folders[0]) >= target:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:
            check(process.returncode == 0, f"run failed: {log.read_text()[-2000:]}")
            print(f"the run finished before kill {kill + 1}")
            break
        steps_before = checkpoint_steps(logdir)
        process.send_signal(signal.SIGKILL)
        process.wait()
        files_before = episode_files(folders)
        for path in files_before:
            with np.load(path, allow_pickle=False) as data:
                check("is_first" in data.files, f"episode file {path} is incomplete")
        last_checkpoint = steps_before[-1] if steps_before else None
        killed += 1
        process, log = start(logdir, steps, extra)
        resumed = verify_restart(
            log, process, files_before, last_checkpoint, minimum_length, folders
        )
        aside = set_aside(folders)
        missing = {
            p
            for p in set(files_before) - set(episode_files(folders))
            if (p.parent, p.name) not in aside
        }
        check(not missing, f"episode files vanished: {sorted(missing)[:5]}")
        print(
            f"kill {kill + 1}: checkpoint before kill {last_checkpoint}, resumed at {resumed}, "
            f"{len(files_before)} episode files intact ({len(aside)} set aside in all)",
            flush=True,
        )
    check(process.wait(timeout=1800) == 0, f"final run failed: {log.read_text()[-2000:]}")
    for folder in folders:
        logged = [row["step"] for row in read_metrics(folder / "metrics.jsonl")]
        check(logged == sorted(set(logged)), f"{folder}: metrics steps repeat or go back: {logged}")
        check(logged[-1] >= steps - 100, f"{folder}: the run stopped at step {logged[-1]}")
    check(killed == kills, f"only {killed} of {kills} kills happened before the run finished")
    print(f"chaos: {killed} kills survived; {len(logged)} log rows, final step {logged[-1]}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs, at random moments (3)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments (0)")
    parser.add_argument("--num_seeds", type=int, default=1, help="the run's --num_seeds (1)")
    parser.add_argument(
        "--logdir", type=pathlib.Path, default=None,
        help="a new or empty folder for the run (a temporary one by default)",
    )  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    # Bad arguments are the caller's error (exit 2), not a failed recovery (exit 1).
    if args.kills < 0 or args.num_seeds < 1:
        parser.error(
            f"--kills must be >= 0 and --num_seeds >= 1, got {args.kills}, {args.num_seeds}"
        )
    if args.logdir is not None and args.logdir.exists() and any(args.logdir.iterdir()):
        parser.error(f"--logdir {args.logdir} is not empty: the check needs a fresh run")
    logdir = args.logdir or pathlib.Path(tempfile.mkdtemp(prefix="chaos-")) / "run"
    try:  # the runs' logs go beside the logdir
        logdir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--logdir {logdir}: cannot create its parent folder: {error.strerror}")
    try:
        run(args.kills, args.seed, logdir, extra, args.num_seeds)
    except ChaosFailure as failure:
        print(f"chaos: FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
