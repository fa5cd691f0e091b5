"""Summarize a `jax.profiler` Perfetto trace: per timeline (thread or GPU stream), its busy
time and the ops that take most of it — enough to see, without TensorBoard, whether a step is
bound by kernels or by the gaps between them.

    python scripts/trace_summary.py DIR_OR_TRACE [--top 12] [--timelines 8]
    python scripts/trace_summary.py TRACE --updates 3 [--loop 50]   # GPU kernels per update
    python scripts/trace_summary.py TRACE --hlo train_step.hlo.txt.gz ...  # ops named

DIR_OR_TRACE is a `perfetto_trace.json.gz` or a folder holding one (e.g. the `--profile DIR`
of scripts/bench.py). Per timeline, busiest first: events, busy = the union of its events'
intervals (nested events count once), span = first start to last end, and the top ops by
summed duration (nested ones count inside their parents too, so shares can add to over 100 %).

With `--updates K` (the number of identical steps traced, 3 for bench.py's --profile) it
prints the GPU kernels instead (events with `kernel_details`; in a CPU trace, with `--hlo`,
XLA:CPU's ops, loops left out), per update: their count and
time, how much of it is kernels under 5 µs, kernel time by how many times a kernel runs
per update (1: once; 50: in a 50-step loop such as the observe scan), and the `--top`
costliest kernels. `--loop R` also lists one iteration of the loop whose kernels run R times
per update, in order, and the `--top` kernels that run R times per update by their time
(every loop of R steps: a scan's forward and backward passes).

`--hlo FILE` names what each listed op or kernel computes, from the traced program's optimized
HLO text (`compiled.as_text()`, plain or gzipped; `scripts/bench.py --profile DIR` writes
`DIR/train_step.hlo.txt.gz`, which a DIR argument picks up by itself): its result shape and
opcode, its jax scope (transformations and Flax modules, e.g.
`transpose(jvp(WorldModel.decode))/decoder/ConvTranspose_3`: the decoder's backward pass) and
the source line that emitted it; the kernels' time per update is also summed by scope.
Trace events are matched by name (a GPU kernel carries its
fusion's name with `.` written `_`) or by their `hlo_op`; cuBLAS kernels and command buffers
mostly stay unnamed. An XLA kernel of a GPU trace that the HLO does not name means the HLO is
another program's (another seed count's, say, whose kernels are partly named alike): a
warning says so and nothing is named from it.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import zlib
from typing import NamedTuple

from dreamer_jax.config import ConfigError, OneLineParser
from dreamer_jax.startup import quiet_on_broken_pipe

HLO_FILE = "train_step.hlo.txt.gz"  # what scripts/bench.py --profile DIR writes into DIR
# `%name = shape opcode(`, the head of an HLO instruction line (`ROOT` marks a result).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.+?) ([a-z][\w-]*)\(")


def load_events(path: pathlib.Path) -> list[dict]:
    """The trace's events; `path` is the file or a folder searched for the newest one."""
    if path.is_dir():
        traces = sorted(path.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise FileNotFoundError(f"no perfetto_trace.json.gz under {path}")
        path = traces[-1]
    with gzip.open(path, "rt") as file:
        trace = json.load(file)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError("not a Chrome/Perfetto trace (a list of event objects)")
    return events


def _frame_tables(lines: list[str]) -> dict[str, dict[int, str]]:
    """The HLO text's source tables, `{"FileNames": {id: row}, "FunctionNames": ...,
    "FileLocations": ..., "StackFrames": ...}`: each a title line, then rows `id text`."""
    tables, current = {}, None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (row := re.match(r"(\d+) (.*)", line)):
            current[int(row.group(1))] = row.group(2)
        else:
            current = None
    return tables


def _source_line(frame_id: int, tables: dict[str, dict[int, str]]) -> str | None:
    """`file:line function` of a stack frame: the innermost source line of an instruction."""
    try:
        location_id = re.search(r"file_location_id=(\d+)", tables["StackFrames"][frame_id])
        location = tables["FileLocations"][int(location_id.group(1))]
        fields = dict(re.findall(r"(\w+)=(\d+)", location))
        file = tables["FileNames"][int(fields["file_name_id"])].strip('"')
        function = tables["FunctionNames"][int(fields["function_name_id"])].strip('"')
    except (KeyError, AttributeError):
        return None
    return f"{pathlib.PurePath(file).name}:{fields.get('line', '?')} {function}"


class HloOp(NamedTuple):
    """What an HLO instruction computes and where it comes from."""

    shape: str  # result shape without layouts, e.g. `bf16[6400,30,30,36]`
    opcode: str
    scope: str  # jax's op_name below the traced function: transformations, modules, primitive
    source: str  # `file:line function` of the innermost frame, or ""

    def __str__(self) -> str:
        return " · ".join(p for p in (f"{self.shape} {self.opcode}", self.scope, self.source) if p)


def load_hlo(path: pathlib.Path) -> dict[str, HloOp]:
    """`{instruction name: HloOp}` from an HLO text dump, each also under the kernel name
    XLA:GPU gives it (`.` written `_`)."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as file:
        lines = file.read().splitlines()
    tables = _frame_tables(lines)
    ops = {}
    for line in lines:
        head = _INSTRUCTION.match(line)
        if head is None:
            continue
        name, shape, opcode = head.groups()
        shape = re.sub(r"{[^}]*}", "", shape)  # layouts
        if shape.startswith("("):  # a loop's or call's whole state: its size says enough
            shape = f"({shape.count('[')} arrays)"
        op_name = re.search(r'op_name="([^"]*)"', line)
        # The outermost `jit(...)/` is the traced function itself; `;` joins fused ops.
        scope = op_name.group(1).split(";")[0].split("/", 1)[-1] if op_name else ""
        frame = re.search(r"stack_frame_id=(\d+)", line)
        source = _source_line(int(frame.group(1)), tables) if frame else None
        ops[name] = HloOp(shape, opcode, scope, source or "")
        ops.setdefault(name.replace(".", "_"), ops[name])
    return ops


# Kernels XLA:GPU generates carry their HLO op's name, e.g. `loop_add_fusion_12`,
# `input_reduce_fusion`, `gemm_fusion_dot_39`, `wrapped_concatenate`; library kernels (cuBLAS'
# `nvjet_…`, `cutlass…`, `memcpy…`) do not.
_XLA_KERNEL = re.compile(r"fusion|^(input|loop|wrapped|triton)_")


def foreign_kernels(kernels: list[dict], hlo: dict[str, HloOp]) -> list[str]:
    """The names of the XLA-generated kernels that the HLO does not name: with the traced
    program's HLO there are none (library kernels aside), so any says it is another's."""
    names = {e["name"] for e in kernels if describe(e, hlo) is None}
    return sorted(name for name in names if _XLA_KERNEL.search(name))


def describe(event: dict, hlo: dict[str, HloOp]) -> HloOp | None:
    """The HLO op of a trace event, if the HLO names it."""
    return hlo.get(event["name"]) or hlo.get(event.get("args", {}).get("hlo_op", ""))


def time_by_scope(
    kernels: list[dict], updates: int, hlo: dict[str, HloOp]
) -> list[tuple[str, float, float]]:
    """`[(scope, kernels per update, µs per update)]`, the costliest first: kernel time summed
    by the jax scope of each kernel's op without its primitive (e.g.
    `transpose(jvp(WorldModel.decode))/decoder/ConvTranspose_3`), "(no jax scope)" for the
    kernels the HLO does not name or names without one."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        op = describe(e, hlo)
        scope = op.scope.rsplit("/", 1)[0] if op and op.scope else "(no jax scope)"
        totals[scope][0] += 1
        totals[scope][1] += e["dur"]
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])
    return [(scope, n / updates, t / updates) for scope, (n, t) in ranked]


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
            by_line[(e.get("pid"), e.get("tid"))].append(e)
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


def gpu_kernels(events: list[dict]) -> list[dict]:
    """The GPU kernel events (those with `kernel_details`), in time order."""
    kernels = [e for e in events if e.get("ph") == "X" and "kernel_details" in e.get("args", {})]
    return sorted(kernels, key=lambda e: e["ts"])


def cpu_ops(events: list[dict], hlo: dict[str, HloOp]) -> list[dict]:
    """XLA:CPU's op events, those the HLO names, in time order: the CPU's counterpart of
    `gpu_kernels`. Loops and calls are left out: their time is that of the ops they run."""
    ops = [
        e
        for e in events
        if e.get("ph") == "X"
        and (op := hlo.get(e["name"]))
        and op.opcode not in ("while", "call", "conditional")
    ]
    return sorted(ops, key=lambda e: e["ts"])


def kernels_by_runs(kernels: list[dict], updates: int) -> dict[int, tuple[float, float]]:
    """`{runs per update: (kernels per update, µs per update)}` over `updates` identical
    steps: a kernel (by name) that ran `c` times ran `c // updates` times per update."""
    counts = collections.Counter(e["name"] for e in kernels)
    classes = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        runs = counts[e["name"]] // updates
        classes[runs][0] += 1
        classes[runs][1] += e["dur"]
    return {runs: (n / updates, t / updates) for runs, (n, t) in classes.items()}


def costliest(
    kernels: list[dict], updates: int, runs: int | None, top: int
) -> list[tuple[str, float]]:
    """`[(name, µs per update)]` of the `top` kernels that run `runs` times per update (any
    number if None), the costliest first: in a scan and its gradient, what one step pays for
    most."""
    counts = collections.Counter(e["name"] for e in kernels)
    time = collections.Counter()
    for e in kernels:
        if runs is None or counts[e["name"]] // updates == runs:
            time[e["name"]] += e["dur"] / updates
    return time.most_common(top)


def loop_iteration(kernels: list[dict], updates: int, runs: int) -> list[dict]:
    """The kernels of one iteration (the second) of the loop whose kernels run `runs` times
    per update: from one start of its first such kernel to the next, in the first update."""
    counts = collections.Counter(e["name"] for e in kernels)
    first_update = kernels[: len(kernels) // updates]
    starts = [i for i, e in enumerate(first_update) if counts[e["name"]] == runs * updates]
    if not starts:
        return []
    head = first_update[starts[0]]["name"]
    starts = [i for i, e in enumerate(first_update) if e["name"] == head]
    return first_update[starts[1] : starts[2]] if len(starts) > 2 else []


def print_kernels(
    events: list[dict], updates: int, loop: int | None, top: int, hlo: dict[str, HloOp]
) -> None:
    kernels, what = gpu_kernels(events), "GPU kernels"
    if not kernels and hlo:
        kernels, what = cpu_ops(events, hlo), "XLA:CPU ops"
    if not kernels:
        print("no GPU kernels in the trace" + ("" if hlo else " (--hlo names XLA:CPU's ops)"))
        return
    foreign = foreign_kernels(kernels, hlo) if hlo and what == "GPU kernels" else []
    if foreign:
        print(
            f"warning: {len(foreign)} of the trace's XLA kernels are not in the --hlo file "
            f"(e.g. {foreign[0]}): is it the traced program's HLO? Their names are left out."
        )
        hlo = {}
    small = [e["dur"] for e in kernels if e["dur"] < 5]
    total = sum(e["dur"] for e in kernels)
    counts = collections.Counter(e["name"] for e in kernels)
    uneven = sum(count % updates != 0 for count in counts.values())
    if uneven:
        # Every kernel of identical updates runs a multiple of `updates` times.
        print(
            f"warning: {uneven} of {len(counts)} {what} ran a number of times that "
            f"--updates {updates} does not divide: does the trace hold {updates} updates?"
        )
    # "  what the HLO says of it" per kernel name, or nothing.
    named = {e["name"]: f"  {op}" if (op := describe(e, hlo)) else "" for e in kernels}
    print(f"{what} per update: {len(kernels) / updates:.0f}, {total / updates / 1e3:.2f} "
          f"ms; under 5 µs: {len(small) / updates:.0f} kernels, "
          f"{sum(small) / updates / 1e3:.2f} ms")  # fmt: skip
    print("runs per update | kernels per update | ms per update")
    for runs, (n, t) in sorted(kernels_by_runs(kernels, updates).items(), key=lambda x: -x[1][1]):
        print(f"{runs:15d} | {n:18.0f} | {t / 1e3:.2f}")
    print(f"\nthe {top} costliest {what} per update (runs per update)")
    for name, time in costliest(kernels, updates, None, top):
        print(f"  {time / 1e3:7.3f} ms {counts[name] // updates:4d}x  {name[:60]}{named[name]}")
    if hlo:
        print(f"\n{what}' time per update by jax scope (the {top} costliest)")
        for scope, n, t in time_by_scope(kernels, updates, hlo)[:top]:
            print(f"  {t / 1e3:7.3f} ms {n:6.0f} kernels  {scope}")
    runs_seen = sorted(kernels_by_runs(kernels, updates))
    if loop is not None and loop not in runs_seen:
        print(f"\nno {what} run {loop} times per update; they run "
              f"{', '.join(map(str, runs_seen))} times")  # fmt: skip
    elif loop is not None:
        iteration = loop_iteration(kernels, updates, loop)
        total = sum(e["dur"] for e in iteration)
        print(f"\none iteration of the loop run {loop} times per update: {len(iteration)} "
              f"kernels, {total:.1f} µs")  # fmt: skip
        for e in iteration:
            print(f"  {e['dur']:7.1f} µs  {e['name'][:60]}{named[e['name']]}")
        print(f"\nthe {top} costliest kernels run {loop} times per update (all such loops)")
        for name, time in costliest(kernels, updates, loop, top):
            print(f"  {time / 1e3:7.3f} ms per update  {name[:60]}{named[name]}")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}")
    return int(text)


@quiet_on_broken_pipe
def main(argv: list[str]) -> int:
    parser = OneLineParser(
        prog="trace_summary.py", description=__doc__.split("\n\n")[0], add_help=False
    )
    parser.add_argument("trace", nargs="?", help="a perfetto_trace.json.gz or a folder of one")
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--top", type=_positive, default=12, help="ops or kernels listed (12)")
    parser.add_argument("--timelines", type=_positive, default=8, help="timelines listed (8)")
    parser.add_argument("--updates", type=_positive, default=None, help="kernels per update")
    parser.add_argument("--loop", type=_positive, default=None, help="a loop's kernels")
    parser.add_argument("--hlo", type=pathlib.Path, default=None, help="HLO text to name ops")
    try:
        args = parser.parse_args(argv)
        if not args.help and args.trace is None:
            raise ConfigError("give one trace file or folder (--help for usage)")
        if args.loop is not None and args.updates is None:
            raise ConfigError("--loop needs --updates (the updates the trace holds)")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.help:
        print(__doc__)
        return 0
    argv, hlo_path = [args.trace], args.hlo
    options = {"--top": args.top, "--timelines": args.timelines, "--updates": args.updates,
               "--loop": args.loop}  # fmt: skip
    try:
        events = load_events(pathlib.Path(argv[0]))
    except (OSError, EOFError, zlib.error, ValueError, KeyError) as error:
        print(f"error: cannot read a trace from {argv[0]}: {error}", file=sys.stderr)
        return 1
    if hlo_path is None and (pathlib.Path(argv[0]) / HLO_FILE).is_file():
        hlo_path = pathlib.Path(argv[0]) / HLO_FILE
    try:
        hlo = load_hlo(hlo_path) if hlo_path is not None else {}
        if hlo_path is not None and not hlo:
            raise ValueError("it holds no HLO instruction")
    except (OSError, UnicodeDecodeError, EOFError, zlib.error, ValueError) as error:
        print(f"error: cannot read HLO text from {hlo_path}: {error}", file=sys.stderr)
        return 1
    if options["--updates"] is not None:
        print_kernels(events, options["--updates"], options["--loop"], options["--top"], hlo)
        return 0
    lines = summarize(events, options["--top"], options["--timelines"])
    if not lines:
        print("no complete ('X') events with a duration in the trace")
    for line in lines:
        busy, span = line["busy_us"], line["span_us"]
        print(f"\n{line['timeline']}: {line['events']} events, busy {busy / 1e3:.1f} ms "
              f"of a {span / 1e3:.1f} ms span ({100 * busy / max(span, 1e-9):.0f} %)")  # fmt: skip
        for op, count, total in line["ops"]:
            share = 100 * total / max(busy, 1e-9)
            described = f"  {hlo[op]}" if op in hlo else ""
            print(f"  {total / 1e3:9.2f} ms {share:5.1f} % {count:6d}x  {op[:110]}{described}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
