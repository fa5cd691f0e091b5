"""Summarize a `jax.profiler` Perfetto trace: per timeline (thread or GPU stream), its busy
time and the ops that take most of it — enough to see, without TensorBoard, whether a step is
bound by kernels or by the gaps between them.

    python scripts/trace_summary.py DIR_OR_TRACE [--top 12] [--timelines 8]

DIR_OR_TRACE is a `perfetto_trace.json.gz` or a folder holding one (e.g. the `--profile DIR`
of scripts/bench.py). Per timeline, busiest first: events, busy = the union of its events'
intervals (nested events count once), span = first start to last end, and the top ops by
summed duration (nested ones count inside their parents too, so shares can add to over 100 %).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys


def load_events(path: pathlib.Path) -> list[dict]:
    """The trace's events; `path` is the file or a folder searched for the newest one."""
    if path.is_dir():
        traces = sorted(path.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
        path = traces[-1]
    with gzip.open(path, "rt") as file:
        trace = json.load(file)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of `[start, end)` intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(events: list[dict], top: int = 12, timelines: int = 8) -> list[dict]:
    """Per timeline `(process, thread)` with complete ('X') events, busiest first:
    `{"timeline", "events", "busy_us", "span_us", "ops": [(name, count, total_us), ...]}`."""
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"
    }
    by_line = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_line[(e["pid"], e.get("tid"))].append(e)
    lines = []
    for key, line in by_line.items():
        intervals = [(e["ts"], e["ts"] + e["dur"]) for e in line]
        ops = collections.defaultdict(lambda: [0, 0.0])
        for e in line:
            ops[e["name"]][0] += 1
            ops[e["name"]][1] += e["dur"]
        ranked = sorted(ops.items(), key=lambda item: -item[1][1])[:top]
        name = f"{processes.get(key[0], key[0])} / {threads.get(key, key[1])}"
        lines.append({
            "timeline": name,
            "events": len(line),
            "busy_us": busy_time(intervals),
            "span_us": max(b for _, b in intervals) - min(a for a, _ in intervals),
            "ops": [(op, count, total) for op, (count, total) in ranked],
        })  # fmt: skip
    return sorted(lines, key=lambda line: -line["busy_us"])[:timelines]


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    options = {"--top": 12, "--timelines": 8}
    for name in options:
        if name in argv:
            i = argv.index(name)
            options[name] = int(argv[i + 1])
            argv = argv[:i] + argv[i + 2 :]
    try:
        events = load_events(pathlib.Path(argv[0]))
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot read a trace from {argv[0]}: {error}", file=sys.stderr)
        return 1
    for line in summarize(events, options["--top"], options["--timelines"]):
        busy, span = line["busy_us"], line["span_us"]
        print(f"\n{line['timeline']}: {line['events']} events, busy {busy / 1e3:.1f} ms "
              f"of a {span / 1e3:.1f} ms span ({100 * busy / max(span, 1e-9):.0f} %)")  # fmt: skip
        for op, count, total in line["ops"]:
            share = 100 * total / max(busy, 1e-9)
            print(f"  {total / 1e3:9.2f} ms {share:5.1f} % {count:6d}x  {op[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
