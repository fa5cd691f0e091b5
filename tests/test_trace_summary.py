"""scripts/trace_summary.py: busy time as a union of intervals, and per-timeline op totals, on
small hand-checked traces (a real jax.profiler trace is read in tests/test_bench.py)."""

import gzip
import json

import trace_summary


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


def _kernels(updates: int):
    """`updates` identical steps: a once-per-step kernel `a`, then a 3-step loop of `b, c`,
    then `d`; durations in µs."""
    events, t = [], 0.0
    for _ in range(updates):
        for name, dur in [("a", 10.0), *[("b", 2.0), ("c", 3.0)] * 3, ("d", 1.0)]:
            events.append({"ph": "X", "pid": 1, "tid": 7, "ts": t, "dur": dur, "name": name,
                           "args": {"kernel_details": "grid:1,1,1"}})  # fmt: skip
            t += dur + 1
    host = {"ph": "X", "pid": 2, "tid": 3, "ts": 0, "dur": 100, "name": "dispatch", "args": {}}
    return [*events, host]


def test_kernels_grouped_by_runs_per_update_and_one_loop_iteration():
    kernels = trace_summary.gpu_kernels(_kernels(2))
    assert len(kernels) == 16  # the host event is no kernel
    by_runs = trace_summary.kernels_by_runs(kernels, updates=2)
    assert by_runs == {1: (2.0, 11.0), 3: (6.0, 15.0)}  # per update: a + d; 3 × (b + c)
    iteration = trace_summary.loop_iteration(kernels, updates=2, runs=3)
    assert [e["name"] for e in iteration] == ["b", "c"]
    assert trace_summary.loop_iteration(kernels, updates=2, runs=5) == []
    assert trace_summary.costliest(kernels, updates=2, runs=3, top=1) == [("c", 9.0)]
    assert trace_summary.costliest(kernels, updates=2, runs=1, top=5) == [("a", 10.0), ("d", 1.0)]


def test_main_prints_kernels_per_update(tmp_path, capsys):
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as file:
        json.dump({"traceEvents": _kernels(3)}, file)
    assert trace_summary.main([str(path), "--updates", "3", "--loop", "3"]) == 0
    out = capsys.readouterr().out
    assert "GPU kernels per update: 8, 0.03 ms; under 5 µs: 7 kernels, 0.02 ms" in out
    assert "one iteration of the loop run 3 times per update: 2 kernels, 5.0 µs" in out
    assert "  0.009 ms per update  c\n    0.006 ms per update  b\n" in out
    assert "warning" not in out
    # A wrong --updates, or a --loop count no kernel has, is said rather than divided through.
    assert trace_summary.main([str(path), "--updates", "2", "--loop", "5"]) == 0
    out = capsys.readouterr().out
    assert "warning: 4 of 4 GPU kernels ran a number of times that --updates 2 does not" in out
    assert "no GPU kernels run 5 times per update; they run 1, 4 times" in out


def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys):
    bad = (["x", "--updates"], ["x", "--updates", "0"], ["x", "--loop", "y"], ["a", "b"])
    bad += (["x", "--loop", "3"],)  # without --updates
    for argv in (*bad, ["x", "--bogus"], []):
        assert trace_summary.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert trace_summary.main(["x", "--help"]) == 0  # anywhere, as in the other commands
    assert capsys.readouterr().out.startswith("Summarize a `jax.profiler` Perfetto trace")


# Two instructions in the format of `compiled.as_text()` (jax 0.10): source tables first.
_HLO = """HloModule jit_f, is_scheduled=true

FileNames
1 "/src/dreamer_jax/networks.py"

FunctionNames
1 "_stride2_taps"

FileLocations
1 {file_name_id=1 function_name_id=1 line=215 end_line=215 column=4 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}

ENTRY %main (p: bf16[8,64,64,1]) -> bf16[8,30,30,36] {
  %while.3 = (s32[], f32[4,32]{1,0}) while(%tuple.1), condition=%cond, body=%body
  ROOT %loop_concatenate_fusion.1 = bf16[8,30,30,36]{3,2,1,0} fusion(%p), kind=kLoop, METADATA
}
""".replace(
    "METADATA",
    'metadata={op_name="jit(f)/transpose(jvp(WorldModel.decode))/decoder/concatenate"'
    " stack_frame_id=1}",
)


def test_hlo_names_shape_scope_and_source_line_under_the_gpu_kernel_name_too(tmp_path):
    path = tmp_path / "f.hlo.txt.gz"
    with gzip.open(path, "wt") as file:
        file.write(_HLO)
    hlo = trace_summary.load_hlo(path)
    concatenate = hlo["loop_concatenate_fusion.1"]
    assert (
        hlo["loop_concatenate_fusion_1"]
        == concatenate
        == trace_summary.HloOp(
            "bf16[8,30,30,36]",
            "fusion",
            "transpose(jvp(WorldModel.decode))/decoder/concatenate",
            "networks.py:215 _stride2_taps",
        )
    )
    assert str(concatenate) == (
        "bf16[8,30,30,36] fusion · transpose(jvp(WorldModel.decode))/decoder/concatenate"
        " · networks.py:215 _stride2_taps"
    )
    assert str(hlo["while.3"]) == "(2 arrays) while"  # no metadata: shape and opcode alone
    kernel = {"name": "nvjet_gemm", "args": {"hlo_op": "while.3"}}
    assert trace_summary.describe(kernel, hlo) == hlo["while.3"]
    assert trace_summary.describe({"name": "other", "args": {}}, hlo) is None
    kernels = [
        {"name": "loop_concatenate_fusion_1", "dur": 6.0},
        {"name": "loop_concatenate_fusion_1", "dur": 4.0},
        {"name": "other", "dur": 3.0},
        {"name": "nvjet_gemm", "dur": 1.0, "args": {"hlo_op": "while.3"}},
    ]
    assert trace_summary.time_by_scope(kernels, 2, hlo) == [
        ("transpose(jvp(WorldModel.decode))/decoder", 1.0, 5.0),
        ("(no jax scope)", 1.0, 2.0),  # unnamed, and named but without a scope
    ]


def test_hlo_of_a_real_compiled_function_names_its_scope_and_this_line(tmp_path):
    import jax
    import jax.numpy as jnp

    def f(x, w):
        with jax.named_scope("layer"):
            return jnp.tanh(x @ w)  # the line the dot's description names

    line = f.__code__.co_firstlineno + 2
    x = jnp.ones((8, 16))
    path = tmp_path / "f.hlo.txt"
    path.write_text(jax.jit(f).lower(x, x.T).compile().as_text())
    ops = list(trace_summary.load_hlo(path).values())
    assert any(
        op.shape == "f32[8,8]"
        and op.scope.startswith("layer/")
        and op.source.startswith(f"test_trace_summary.py:{line} ")
        for op in ops
    ), ops


def test_main_names_kernels_from_an_hlo_file_or_fails_clearly(tmp_path, capsys):
    events = _kernels(3)
    for e in events:
        e["name"] = {"a": "loop_concatenate_fusion_1"}.get(e["name"], e["name"])
    trace = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(trace, "wt") as file:
        json.dump({"traceEvents": events}, file)
    (tmp_path / "f.hlo.txt").write_text(_HLO)
    assert (
        trace_summary.main([str(trace), "--updates", "3", "--hlo", str(tmp_path / "f.hlo.txt")])
        == 0
    )
    out = capsys.readouterr().out
    assert "the 12 costliest GPU kernels per update (runs per update)\n" in out
    assert "  0.010 ms    1x  loop_concatenate_fusion_1  bf16[8,30,30,36] fusion · " in out
    assert "    0.009 ms    3x  c\n" in out  # a kernel the HLO does not name
    assert "    0.010 ms      1 kernels  transpose(jvp(WorldModel.decode))/decoder\n" in out
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    assert trace_summary.main([str(trace), "--hlo", str(tmp_path / "bad.gz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read HLO text from ") and err.count("\n") == 1
    (tmp_path / "empty.hlo.txt").write_text("not an HLO dump\n")
    assert trace_summary.main([str(trace), "--hlo", str(tmp_path / "empty.hlo.txt")]) == 1
    assert "empty.hlo.txt: it holds no HLO instruction\n" in capsys.readouterr().err
    assert trace_summary.main([str(trace), "--hlo"]) == 2


def test_an_hlo_of_another_program_is_told_and_names_nothing(tmp_path, capsys):
    """XLA's kernels of a GPU trace all carry names of the traced program's HLO; one the HLO
    lacks means another program's HLO, whose alike names would mislabel the kernels.
    Library kernels (cuBLAS) are never in the HLO and say nothing."""
    (tmp_path / "f.hlo.txt").write_text(_HLO)
    hlo = trace_summary.load_hlo(tmp_path / "f.hlo.txt")
    events = _kernels(1)
    names = {"a": "loop_concatenate_fusion_1", "b": "nvjet_sm90_tst_128x16", "c": "memcpy32"}
    for e in events:
        e["name"] = names.get(e["name"], e["name"])
    assert trace_summary.foreign_kernels(trace_summary.gpu_kernels(events), hlo) == []
    trace_summary.print_kernels(events, updates=1, loop=None, top=5, hlo=hlo)
    out = capsys.readouterr().out
    assert "warning" not in out and "loop_concatenate_fusion_1  bf16[8,30,30,36]" in out
    events[-2]["name"] = "input_reduce_fusion_7"  # the last `d`: a kernel of another program
    trace_summary.print_kernels(events, updates=1, loop=None, top=5, hlo=hlo)
    out = capsys.readouterr().out
    assert out.startswith(
        "warning: 1 of the trace's XLA kernels are not in the --hlo file (e.g. "
        "input_reduce_fusion_7): is it the traced program's HLO? Their names are left out.\n"
    )
    assert "bf16[8,30,30,36]" not in out and "by jax scope" not in out


def test_without_gpu_kernels_the_hlo_named_xla_cpu_ops_stand_in_loops_left_out(tmp_path, capsys):
    hlo_path = tmp_path / "f.hlo.txt"
    hlo_path.write_text(_HLO)
    hlo = trace_summary.load_hlo(hlo_path)
    events = [  # one update: the loop holds the fusion twice; a host event the HLO never names
        {"ph": "X", "pid": 1, "tid": 2, "ts": 0, "dur": 10, "name": "while.3"},
        {"ph": "X", "pid": 1, "tid": 2, "ts": 1, "dur": 3, "name": "loop_concatenate_fusion.1"},
        {"ph": "X", "pid": 1, "tid": 2, "ts": 5, "dur": 4, "name": "loop_concatenate_fusion.1"},
        {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 20, "name": "PjitFunction(f)"},
    ]
    ops = trace_summary.cpu_ops(events, hlo)
    assert [e["ts"] for e in ops] == [1, 5]
    trace_summary.print_kernels(events, updates=1, loop=None, top=3, hlo=hlo)
    out = capsys.readouterr().out
    assert out.startswith("XLA:CPU ops per update: 2, 0.01 ms; under 5 µs: 2 kernels")
    assert "    0.007 ms    2x  loop_concatenate_fusion.1  bf16[8,30,30,36] fusion · " in out
    trace_summary.print_kernels(events, updates=1, loop=None, top=3, hlo={})
    assert capsys.readouterr().out == "no GPU kernels in the trace (--hlo names XLA:CPU's ops)\n"


def test_a_corrupt_or_truncated_or_misshapen_trace_is_one_error_line(tmp_path, capsys):
    whole = gzip.compress(json.dumps({"traceEvents": _events() * 200}).encode())
    corrupt = bytearray(whole)
    corrupt[100:164] = bytes(range(64))
    misshapen = gzip.compress(b"[1, 2]")
    for name, data in [("truncated", whole[: len(whole) // 2]), ("corrupt", corrupt),
                       ("misshapen", misshapen)]:  # fmt: skip
        path = tmp_path / f"{name}.json.gz"
        path.write_bytes(bytes(data))
        assert trace_summary.main([str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read a trace from {path}: ") and err.count("\n") == 1
        hlo = tmp_path / "t.json.gz"
        hlo.write_bytes(gzip.compress(json.dumps(_events()).encode()))
        assert trace_summary.main([str(hlo), "--hlo", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read HLO text from {path}: ") or "no HLO" in err


def test_a_trace_without_complete_events_says_so(tmp_path, capsys):
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(json.dumps([{"ph": "M", "name": "x", "pid": 1}]).encode()))
    assert trace_summary.main([str(path)]) == 0
    assert "no complete ('X') events" in capsys.readouterr().out
