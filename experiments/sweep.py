"""Print (or run, one after another) the training commands of a benchmark sweep.

    python experiments/sweep.py                         # the paper's 55 Atari games, seed 0
    python experiments/sweep.py --games pong breakout --seeds 0 1 2 --run
    python experiments/sweep.py --root runs/sweep -- --precision bf16   # extra train options

Each run logs to `<root>/atari_<game>/<seed>`; rerunning a command resumes that run, so a
sweep interrupted anywhere can be restarted as it is.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from dreamer_jax.envs import ATARI_GAMES


def commands(games, seeds, root, extra):
    for game in games:
        for seed in seeds:
            task = f"atari_{game}"
            yield [
                sys.executable, "-m", "dreamer_jax.train", "--configs", "atari",
                "--task", task, "--seed", str(seed), "--logdir", f"{root}/{task}/{seed}", *extra,
            ]  # fmt: skip


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--games", nargs="+", default=list(ATARI_GAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--root", default="runs")
    parser.add_argument("--run", action="store_true", help="run the commands one by one")
    args, extra = parser.parse_known_args(argv)
    unknown = sorted(set(args.games) - set(ATARI_GAMES))
    if unknown:
        print(f"error: unknown games {', '.join(unknown)}", file=sys.stderr)
        return 2
    for command in commands(args.games, args.seeds, args.root, [a for a in extra if a != "--"]):
        print(shlex.join(command), flush=True)
        if args.run and subprocess.run(command).returncode != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
