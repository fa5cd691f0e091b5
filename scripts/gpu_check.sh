#!/usr/bin/env bash
# One GPU check for a lent device machine (H100/H200, about 9.5 minutes), with .whl/ carried
# (built by scripts/gpu_wheels.sh):
#
#   bash scripts/gpu_check.sh                     # results under $OUT (default ./gpu_out)
#   GPU_CHECK_SMOKE=1 PYTHON=/tmp/gpusim/bin/python bash scripts/gpu_check.sh   # tiny, CPU
#
# Runs, each under `timeout` (a failure or a timeout is recorded and the next step runs),
# what the many-seed targets need first; GPU_CHECK_PARTS (default "learner e2e policy collector
# flags seeds conv") picks and orders the parts after step 0:
#   0. nvidia-smi -L, jax version and devices, the project's imports;
#   learner: the learner, bf16, Atari preset, scripts/bench.py --num_seeds N, 20 updates, for
#      the first two of $GPU_CHECK_SEEDS (default 1 8 2 4 16), each with a jax.profiler trace
#      of three more updates (profile_seeds_N.json.gz, and the update's optimized HLO
#      hlo_seeds_N.txt.gz, summarized per GPU stream in log.txt by scripts/trace_summary.py,
#      with the kernels per update, the costliest named by their HLO op and source line, and
#      the 50-step loops' costliest) -> learner_seeds.json;
#   e2e: end to end on Atari Boxing, bf16, one env per seed: 1 seed, then 8 seeds -> e2e.json
#      (frames/s summed over seeds and updates/s of the metrics rows past the prefill, and the
#      rows' `time_*` shares, also as ms per loop step: where the run loop's wall time went);
#   policy: the jitted policy step of the first two seed counts, one env per seed, as the
#      acting loop calls it (scripts/bench.py --policy: dispatch and time to the action), in
#      log.txt;
#   collector: the acting loop's host side (envpool's Atari Boxing steps with random actions,
#      and the replays), 1 and 8 seeds of one env, scripts/bench.py --collector, in log.txt;
#   flags: the $GPU_CHECK_FLAG_SEEDS-seed learner (default 1) under each XLA_FLAGS variant of
#      $GPU_CHECK_FLAGS (";"-separated; default: cuBLAS instead of Triton for every dot, whose
#      gemm fusions pad the loops' kernels in every step) -> learner_seeds.json, each run with
#      its xla_flags;
#   seeds: the learner for the other seed counts of $GPU_CHECK_SEEDS;
#   conv: the image encoder and decoder, forward + backward at the Atari batch, bf16: the
#      matmul lowering against flax's convolutions (cuDNN there), scripts/bench_conv.py, in
#      log.txt.
# Writes at most 8 files to $OUT (the device tool's limit): log.txt (all output), steps.tsv
# (each step's exit code, seconds and timeout), learner_seeds.json, e2e.json, the two traces
# and their two HLO texts; the JSON files are
# rewritten after each step, so a cut-off run still leaves what it measured.
#
# Time: the whole script keeps to GPU_CHECK_BUDGET seconds (default 560). Each step's timeout
# is its own cap, cut to what the budget leaves after the time held back for the e2e runs
# still to come; a step with under 30 s left is skipped (steps.tsv says so), so a slow
# compile costs the last parts first. On an H200 the default parts reach the `collector` part
# (2026-11-29, before it was added: the first `flags` variant); a second call on the still-warm
# machine can run the rest, e.g.
# `GPU_CHECK_PARTS="flags seeds" GPU_CHECK_BUDGET=240 bash scripts/gpu_check.sh`. One bench call is mostly start-up plus the ~35 s compile of
# train_step. The run tool's timeout_s should be about BUDGET + 40; it hands an idle machine
# back after about 30 s, so make the second call at once (a fresh start costs about 30 s).
set -uo pipefail  # no -e: every step runs whatever the previous one did

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
STEPS="$OUT/steps.tsv"
SMOKE="${GPU_CHECK_SMOKE:-0}"
BUDGET="${GPU_CHECK_BUDGET:-560}"
WORK="${GPU_CHECK_TMP:-/tmp/gpu_check}"  # bench JSONs (merged into $OUT), compile cache
: >"$LOG"
printf 'step\trc\tseconds\ttimeout_s\n' >"$STEPS"
rm -rf "$WORK/bench" "$WORK/profile"
mkdir -p "$WORK/bench" "$WORK/profile"

export PYTHONPATH="$ROOT/.whl:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# One process at a time holds the GPU; leave room for cuDNN/cuBLAS workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
# Persistent compile (and XLA autotune) cache, emptied first so that bench's compile_s is a
# real compile even on a machine that ran this before.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
    export JAX_COMPILATION_CACHE_DIR="$WORK/jax_cache"
    rm -rf "$JAX_COMPILATION_CACHE_DIR"
fi
export PYTHONUNBUFFERED=1

# The image's python that has jax (python or python3), unless PYTHON names one.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import jax" 2>/dev/null; then
            PY="$candidate"
            break
        fi
    done
    PY="${PY:-python3}"
fi

say() { echo "== $(date +%T) +${SECONDS}s $*" | tee -a "$LOG"; }

# run_step NAME CAP RESERVE CMD...: runs CMD under timeout min(CAP, budget left - RESERVE),
# output to the console and log.txt; records rc (124: timed out; "skipped": no budget).
run_step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((BUDGET - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < 30)); then
        say "$name: skipped, ${left}s of the budget left"
        printf '%s\tskipped\t0\t0\n' "$name" >>"$STEPS"
        return 0
    fi
    say "$name (timeout ${limit}s): $*"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" </dev/null 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "$name: rc $rc after $((SECONDS - start))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$STEPS"
}

if [ "$SMOKE" = 1 ]; then
    PRESET=(--configs atari debug)
    SEEDS="${GPU_CHECK_SEEDS:-1 2}"
    FLAG_SEEDS="${GPU_CHECK_FLAG_SEEDS:-2}"
    UPDATES=2
    # debug preset: prefill 300, 100-step episodes.
    PREFILL=300
    E2E1=(--steps 700 --prefill "$PREFILL" --log_every 100)
    E2E8_SEEDS=2
    E2E8=(--steps 600 --prefill "$PREFILL" --log_every 100)
    CONV=(--sizes debug --repeats 1)
else
    PRESET=(--configs atari)
    SEEDS="${GPU_CHECK_SEEDS:-1 8 2 4 16}"
    FLAG_SEEDS="${GPU_CHECK_FLAG_SEEDS:-1}"
    UPDATES=20
    # The atari preset's prefill is 50k policy steps (pretrain 1, already the minimum); cut
    # to 5k so that these short runs reach the training phase: random Boxing episodes are
    # ~1.8k policy steps, so every seed's replay holds an episode by then. Steps are policy
    # steps per seed (action_repeat 4: 4 frames each); --steps is sized so that each run
    # ends inside its timeout on an H100/H200 (bf16, 1 env: ~150-200 policy steps/s per seed
    # once trained every 16 steps; a SIGTERM from timeout still checkpoints and keeps the
    # metrics rows written so far).
    PREFILL=5000
    E2E1=(--steps 15000 --prefill "$PREFILL" --log_every 2000)
    E2E8_SEEDS=8
    E2E8=(--steps 10000 --prefill "$PREFILL" --log_every 2000)
    CONV=(--sizes atari --repeats 3)
fi

# XLA flag variants for the `flags` part: every dot through cuBLAS instead of Triton gemm
# fusions, which pad the loops' kernels in every step (2.3 ms of one seed's 14.6 ms of kernels
# on 2026-11-29; 8 seeds: 1.02x). Whole while loops in CUDA graphs
# (--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL) gave 8 seeds nothing that day.
# Unknown flags fail that step.
FLAGS="${GPU_CHECK_FLAGS:---xla_gpu_enable_triton_gemm=false}"

merge_bench() {
    "$PY" - "$WORK/bench" "$STEPS" "$OUT/learner_seeds.json" <<'EOF'
import csv, json, pathlib, sys
folder, steps, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
status = {r["step"]: r for r in csv.DictReader(open(steps), delimiter="\t")}
runs = []
for name, row in status.items():
    if not name.startswith("bench_"):
        continue
    tag = name[len("bench_"):]
    path = folder / f"{tag}.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    runs.append({"tag": tag, "rc": row["rc"], "wall_s": int(row["seconds"]), **figures})
out.write_text(json.dumps({"runs": runs}, indent=1))
for r in runs:
    flags = f" [XLA_FLAGS {r.get('xla_flags')}]" if r["tag"].startswith("flags_") else ""
    if "updates_per_sec" in r:
        print(f"learner N={r['num_seeds']}: {r['updates_per_sec']:.2f} updates/s, "
              f"{r['seed_updates_per_sec']:.2f} seed-updates/s, compile {r['compile_s']:.1f} s, "
              f"{r['memory_kind']} {r['memory_gib']:.2f} GiB{flags}")
    else:
        print(f"learner {r['tag']}: no result (rc {r['rc']})")
EOF
}

summarize_e2e() {
    "$PY" - "$STEPS" "$OUT/e2e.json" "$PREFILL" /tmp/e2e1 /tmp/e2e8 <<'EOF'
import csv, json, math, pathlib, sys
import yaml
steps, out, prefill = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
status = {r["step"]: r for r in csv.DictReader(open(steps), delimiter="\t")}
result = {"prefill": prefill, "note": "rows with step > prefill; fps = frames/s of one seed "
          "(policy steps x action_repeat); frames_per_sec = sum over seeds of each seed's mean"}
for logdir in map(pathlib.Path, sys.argv[4:]):
    name = logdir.name
    files = sorted(logdir.rglob("metrics.jsonl")) if logdir.exists() else []
    seeds, fps_means, ups_means, rows_first, fps_steady, ups_steady = [], [], [], [], [], []
    time_shares, time_ms = {}, {}
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("step", 0) > prefill and r.get("fps") is not None]
        if not rows:
            continue
        seeds.append(path.parent.name)
        fps_means.append(sum(r["fps"] for r in rows) / len(rows))
        ups = [r["updates_per_sec"] for r in rows if r.get("updates_per_sec") is not None]
        ups_means.append(sum(ups) / len(ups) if ups else math.nan)
        # The first row past the prefill also holds the policy's recompiles; without it:
        steady = rows[1:] or rows
        fps_steady.append(sum(r["fps"] for r in steady) / len(steady))
        ups = [r["updates_per_sec"] for r in steady if r.get("updates_per_sec") is not None]
        ups_steady.append(sum(ups) / len(ups) if ups else math.nan)
        if not rows_first:
            rows_first = [{k: r.get(k) for k in ("step", "fps", "updates_per_sec", "updates")}
                          for r in rows]
            # Where the loop's wall time went (the same for every seed: one loop).
            parts = sorted(k for k in steady[0] if k.startswith("time_"))
            time_shares = {k: sum(r[k] for r in steady) / len(steady) for k in parts}
            # The same as milliseconds per loop step (one policy step of every seed's envs).
            config = yaml.safe_load((path.parent / "config.yaml").read_text())
            frames = config["action_repeat"] * config["envs"]  # one seed's, per loop step
            loop_ms = [1000 * frames / r["fps"] for r in steady]
            time_ms = {k: sum(r[k] * ms for r, ms in zip(steady, loop_ms)) / len(steady)
                       for k in parts}  # fmt: skip
            time_ms["loop_step"] = sum(loop_ms) / len(loop_ms)
    row = status.get(name, {})
    result[name] = {
        "rc": row.get("rc"), "wall_s": row.get("seconds"), "timeout_s": row.get("timeout_s"),
        "metrics_files": len(files), "seeds_with_rows": len(seeds),
        "rows_per_seed": len(rows_first),
        "frames_per_sec": sum(fps_means) if fps_means else None,
        "fps_per_seed": fps_means,
        "updates_per_sec": sum(ups_means) / len(ups_means) if ups_means else None,
        "frames_per_sec_without_first_row": sum(fps_steady) if fps_steady else None,
        "updates_per_sec_without_first_row": (
            sum(ups_steady) / len(ups_steady) if ups_steady else None),
        "rows_first_seed": rows_first,
        "time_shares_without_first_row": time_shares,
        "ms_per_loop_step_without_first_row": time_ms,
    }
    r = result[name]
    print(f"{name}: rc {r['rc']}, {r['seeds_with_rows']} seeds with {r['rows_per_seed']} rows "
          f"past the prefill, frames/s (sum over seeds) {r['frames_per_sec']}, "
          f"updates/s {r['updates_per_sec']}; without the first row "
          f"{r['frames_per_sec_without_first_row']} frames/s, "
          f"{r['updates_per_sec_without_first_row']} updates/s; wall time: "
          + ", ".join(f"{k[5:]} {v:.1%}" for k, v in time_shares.items()))
    if time_ms:
        print(f"{name}: ms per loop step {time_ms['loop_step']:.2f}: " + ", ".join(
            f"{k[5:]} {v:.2f}" for k, v in time_ms.items() if k.startswith("time_")))
out.write_text(json.dumps(result, indent=1))
EOF
}

say "gpu_check: smoke=$SMOKE budget=${BUDGET}s python=$PY out=$OUT"
{
    nvidia-smi -L || echo "nvidia-smi: none"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    du -sh "$ROOT/.whl" || echo "no .whl (scripts/gpu_wheels.sh builds it)"
} 2>&1 | tee -a "$LOG"
# Timeouts: each step's cap, and what the e2e runs hold back from the steps before them.
PARTS="${GPU_CHECK_PARTS:-learner e2e policy collector flags seeds conv}"
E2E1_CAP=150 E2E8_CAP=180 E2E1_MIN=130 E2E8_MIN=160
# Held back for the e2e runs by every step before them (none once they ran, or if not asked).
E2E=0
[[ " $PARTS " == *" e2e "* ]] && E2E=$((E2E1_MIN + E2E8_MIN))
read -r -a SEED_LIST <<<"$SEEDS"
FIRST_SEEDS=("${SEED_LIST[@]:0:2}")  # profiled, and measured before the e2e runs
LATER_SEEDS=("${SEED_LIST[@]:2}")

run_step env 60 $((E2E + 150)) "$PY" -c "
import sys, jax
print('python', sys.version.split()[0], 'jax', jax.__version__, 'backend', jax.default_backend())
print('devices', jax.devices())
import distrax, envpool, tensorboardX, wandb, gymnasium, dreamer_jax.train
print('imports ok: distrax', distrax.__version__, 'envpool', envpool.__version__,
      'wandb', wandb.__version__, 'from', envpool.__file__)
"

# bench TAG N RESERVE [ARGS...]: the N-seed learner, $WORK/bench/TAG.json, merged into
# learner_seeds.json.
bench() {
    local tag=$1 n=$2 reserve=$3
    shift 3
    run_step "bench_$tag" 120 "$reserve" "$PY" scripts/bench.py "${PRESET[@]}" \
        --precision bf16 --num_seeds "$n" --updates "$UPDATES" --no-record \
        --json "$WORK/bench/$tag.json" "$@"
    merge_bench >/dev/null 2>&1 || true
}

# The learner for the first two seed counts, each with a trace of three more updates.
part_learner() {
    local reserve=$((E2E + 100)) n trace
    for n in "${FIRST_SEEDS[@]}"; do
        bench "seeds_$n" "$n" "$reserve" --profile "$WORK/profile/seeds_$n"
        trace=$(find "$WORK/profile/seeds_$n" -name perfetto_trace.json.gz 2>/dev/null | head -1)
        hlo="$WORK/profile/seeds_$n/train_step.hlo.txt.gz"
        if [ -n "$trace" ] && [ -f "$hlo" ]; then
            cp "$trace" "$OUT/profile_seeds_$n.json.gz"
            cp "$hlo" "$OUT/hlo_seeds_$n.txt.gz"
            say "trace of 3 updates, $n seed(s), per timeline:"
            "$PY" scripts/trace_summary.py "$trace" --hlo "$hlo" --top 15 --timelines 6 2>&1 |
                tee -a "$LOG"
            say "kernels per update, the costliest, and the observe scan's (50 steps):"
            "$PY" scripts/trace_summary.py "$trace" --hlo "$hlo" --updates 3 --loop 50 --top 15 2>&1 |
                grep -Ev "^ +[0-9.]+ µs  " | tee -a "$LOG"
        fi
        reserve=$((E2E + 10))
    done
    merge_bench 2>&1 | tee -a "$LOG"
}

# End to end, one env per seed (a logdir with data would be resumed: start clean).
part_e2e() {
    E2E=0
    rm -rf /tmp/e2e1 /tmp/e2e8
    run_step e2e1 $E2E1_CAP $((E2E8_MIN + 10)) "$PY" -m dreamer_jax.train "${PRESET[@]}" \
        --task atari_boxing --precision bf16 --envs 1 --num_seeds 1 --logdir /tmp/e2e1 \
        "${E2E1[@]}" --eval_every 1000000 --wandb.mode disabled
    summarize_e2e >/dev/null 2>&1 || true
    run_step e2e8 $E2E8_CAP 10 "$PY" -m dreamer_jax.train "${PRESET[@]}" --task atari_boxing \
        --precision bf16 --envs 1 --num_seeds "$E2E8_SEEDS" --logdir /tmp/e2e8 "${E2E8[@]}" \
        --eval_every 1000000 --wandb.mode disabled
    summarize_e2e 2>&1 | tee -a "$LOG"
}

# The learner under each XLA_FLAGS variant (added to any XLA_FLAGS already set).
part_flags() {
    local i=0 variant variants
    IFS=';' read -r -a variants <<<"$FLAGS"
    for variant in "${variants[@]}"; do
        i=$((i + 1))
        XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$variant" bench "flags_$i" "$FLAG_SEEDS" $((E2E + 10))
    done
    merge_bench 2>&1 | tee -a "$LOG"
}

# The learner for the other seed counts.
part_seeds() {
    local n
    ((${#LATER_SEEDS[@]})) || return 0
    for n in "${LATER_SEEDS[@]}"; do
        bench "seeds_$n" "$n" $((E2E + 10))
    done
    merge_bench 2>&1 | tee -a "$LOG"
}

# The policy step as the acting loop calls it, for the first two seed counts (in log.txt).
part_policy() {
    local n
    for n in "${FIRST_SEEDS[@]}"; do
        run_step "policy_$n" 60 0 "$PY" scripts/bench.py "${PRESET[@]}" --policy \
            --precision bf16 --num_seeds "$n" --updates 200 --no-record
    done
}

# The acting loop's host side (envpool and the replays): what a policy step costs this
# machine's CPU besides the policy.
part_collector() {
    local n
    for n in 1 8; do
        run_step "collector_$n" 40 0 "$PY" scripts/bench.py "${PRESET[@]}" --collector \
            --task atari_boxing --num_seeds "$n" --no-record
    done
}

# Convolutions: matmul lowering vs flax/cuDNN.
part_conv() {
    run_step conv 60 0 "$PY" scripts/bench_conv.py "${CONV[@]}" --precision bf16
}

for part in $PARTS; do
    case "$part" in
        learner | e2e | policy | collector | flags | seeds | conv) "part_$part" ;;
        *) say "unknown part '$part' in GPU_CHECK_PARTS (learner e2e policy collector flags seeds conv)" ;;
    esac
done

# Nothing large is copied: list what came out.
say "done; $OUT holds:"
ls -la "$OUT" 2>&1 | tee -a "$LOG"
cat "$STEPS"
