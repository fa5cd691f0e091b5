#!/usr/bin/env bash
# Boxing for about 1M frames on a lent device machine (H100/H200, about 9 minutes), the
# learning check of the action fix (docs/results.md), with .whl/ carried (scripts/gpu_wheels.sh):
#
#   bash scripts/gpu_boxing.sh                    # results under $OUT (default ./gpu_out)
#   GPU_CHECK_SMOKE=1 PYTHON=.venv/bin/python bash scripts/gpu_boxing.sh   # tiny, CPU
#
# One training run, `--configs atari --task atari_boxing --precision bf16 --envs 16`, to
# 250k policy steps (1M frames) or until the budget runs out: `timeout` then sends SIGTERM,
# the run checkpoints and exits, and every metrics row written so far is kept. Copies
# metrics.jsonl and config.yaml to $OUT and prints train/eval returns by frames; compare them
# here with the official curve (../shared/reference/atari-dreamerv2.json, not on the device).
# GPU_CHECK_BUDGET (default 540 s) bounds the whole script; the run tool's timeout_s should
# be about BUDGET + 40.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
BUDGET="${GPU_CHECK_BUDGET:-540}"
LOGDIR="${GPU_CHECK_TMP:-/tmp/gpu_boxing}/run"
rm -rf "$LOGDIR"  # a logdir with data would be resumed
: >"$LOG"

export PYTHONPATH="$ROOT/.whl:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
command -v python >/dev/null && python -c "import jax" 2>/dev/null && PY="${PYTHON:-python}"

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    RUN=(--configs atari debug --steps 800 --eval_every 400 --log_every 200 --envs 4)
else
    RUN=(--configs atari --steps 250000 --eval_every 50000 --log_every 5000 --envs 16)
fi

echo "== gpu_boxing: budget ${BUDGET}s, python $PY, out $OUT" | tee -a "$LOG"
nvidia-smi -L 2>&1 | tee -a "$LOG"
LIMIT=$((BUDGET - SECONDS - 30))
echo "== train (timeout ${LIMIT}s)" | tee -a "$LOG"
timeout -k 30 "$LIMIT" "$PY" -m dreamer_jax.train "${RUN[@]}" --task atari_boxing \
    --precision bf16 --logdir "$LOGDIR" --wandb.mode disabled </dev/null 2>&1 | tee -a "$LOG"
echo "== train: rc ${PIPESTATUS[0]} after ${SECONDS}s (124: the budget ran out)" | tee -a "$LOG"

cp "$LOGDIR/metrics.jsonl" "$LOGDIR/config.yaml" "$OUT/" 2>&1 | tee -a "$LOG"
"$PY" - "$OUT/metrics.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("step    frames   train_return  eval_return  fps  updates")
for r in rows:
    print(f"{r['step']:7d} {r['frames']:8d} {r.get('train_return', float('nan')):13.1f} "
          f"{r.get('eval_return', float('nan')):12.1f} {r.get('fps', 0):5.0f} {r.get('updates', 0):8.0f}")
EOF
ls -la "$OUT" | tee -a "$LOG"
