"""scripts/trace_summary.py: busy time as a union of intervals, and per-timeline op totals, on
small hand-checked traces (a real jax.profiler trace is read in tests/test_bench.py)."""

import gzip
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_path = ROOT / "scripts" / "trace_summary.py"
_spec = importlib.util.spec_from_file_location("trace_summary", _path)
trace_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_summary)


def test_busy_time_is_the_union_of_intervals():
    assert trace_summary.busy_time([]) == 0.0
    # [0, 10) holds [2, 5) (nested); [8, 12) overlaps its end; [20, 21) stands alone.
    assert trace_summary.busy_time([(8, 12), (0, 10), (2, 5), (20, 21)]) == 13.0


def _events():
    meta = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #1"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    kernels = [("conv", 0, 4), ("gemm", 5, 1), ("conv", 10, 4), ("gemm", 20, 1)]
    device = [{"ph": "X", "pid": 1, "tid": 7, "ts": t, "dur": d, "name": n} for n, t, d in kernels]
    host = [{"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 2, "name": "dispatch"}]
    return meta + device + host


def test_summary_ranks_timelines_and_ops():
    lines = trace_summary.summarize(_events(), top=1)
    assert [line["timeline"] for line in lines] == ["/device:GPU:0 / Stream #1", "/host:CPU / 3"]
    stream = lines[0]
    assert stream["events"] == 4 and stream["busy_us"] == 10 and stream["span_us"] == 21
    assert stream["ops"] == [("conv", 2, 8)]  # top=1: only the op with the most time


def test_main_reads_a_folder_and_fails_clearly(tmp_path, capsys):
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as file:
        json.dump({"traceEvents": _events()}, file)
    assert trace_summary.main([str(tmp_path)]) == 0
    assert "busy 0.0 ms of a 0.0 ms span (48 %)" in capsys.readouterr().out
    assert trace_summary.main([str(tmp_path / "missing")]) == 1
    assert "cannot read a trace" in capsys.readouterr().err
