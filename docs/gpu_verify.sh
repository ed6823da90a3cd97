#!/usr/bin/env bash
# Everything docs/speed.md reports of a GPU, measured in one go, within 9 minutes:
#
#   OUT=/some/folder bash docs/gpu_verify.sh      (from the repository's root)
#
# Steps, most needed first, each under a timeout within the whole budget (BUDGET seconds,
# 540); a step that fails, times out or no longer fits is noted, and the next one runs. A
# summary comes last; everything lands in $OUT (6 files): summary.md, bench.md,
# ablation.png, ablation.txt, full.json, steps.log.
#   full     fixed.py --fast, 2 whole epochs (last training batch left out, last test batch
#            padded), then --resume to 3: the second compile, from inductor's caches
#   bench    python bench.py --only all: the speed table
#   ladder   ./ablation.sh on --dummy data, random weights: the figure
#   check    docs/gpu_check.py: augmentation against PIL, TF32 off and on; the data path
#   modes    model-only img/s: reduce-overhead, fused Adam, max-autotune
# DEVICE=cpu SMALL=1 runs the same steps on a CPU, tiny, to try the script itself.
set -u
OUT=${OUT:-$PWD/gpu_verify_out}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
[ -d vendor ] && export PYTHONPATH="$PWD/vendor${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCH_LOGS=${TORCH_LOGS:-recompiles,cudagraphs}
LOG="$OUT/steps.log"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
ROWS=()
COMMON=(--dummy --no-pretrained --device "$DEVICE")
if [ "${SMALL:-0}" = 1 ]; then  # the plumbing only
  COMMON+=(--image-size 32 --batch-size 48 --workers 0 --limit-train-batches 3
           --limit-eval-batches 2)
fi

step() {  # step NAME TIMEOUT COMMAND...: run it, log its tail, note how it ended
  local name=$1 limit=$(( $2 < BUDGET - SECONDS ? $2 : BUDGET - SECONDS )) start=$SECONDS rc
  shift 2
  if (( limit < 30 )); then
    ROWS+=("| $name | skipped: the budget is spent | 0 |")
    return
  fi
  echo "== $name (timeout ${limit} s): $*" | tee -a "$LOG"
  timeout -k 20 "$limit" "$@" > "$SCRATCH/$name.log" 2>&1
  rc=$?
  tr '\r' '\n' < "$SCRATCH/$name.log" | grep -v 'batch/s\|^\s*$' | tail -n 25 >> "$LOG"
  ROWS+=("| $name | $rc$([ $rc = 124 ] && echo ' (timed out)') | $((SECONDS - start)) |")
}

step full 240 python fixed.py "${COMMON[@]}" --fast --epochs 2 --output-dir "$SCRATCH/full"
step resume 120 python fixed.py "${COMMON[@]}" --fast --epochs 3 --output-dir "$SCRATCH/full" \
  --resume
cp "$SCRATCH/full/fixed.json" "$OUT/full.json" 2>/dev/null
step bench 200 python bench.py --device "$DEVICE" --only all $([ "${SMALL:-0}" = 1 ] && echo --tiny)
grep -E '^\||^bench.py on' "$SCRATCH/bench.log" > "$OUT/bench.md"
cat > "$SCRATCH/modes.py" <<'EOF'
"""Model-only images/s of fixed.py --fast's step, per compile mode, and with fused Adam."""
import sys
import time

import torch

import fixed
import training
from training.fast import FastModel
from training.loop import Progress, prepare

for mode, fused in (("reduce-overhead", False), ("reduce-overhead", True),
                    ("max-autotune", False)):
    torch._dynamo.reset()
    args = training.parse_args(fixed.__file__, "", epochs=1, batch_size=64, lr=fixed.LR,
                               image_size=224, argv=sys.argv[1:] + ["--fast"])
    model, criterion, optimizer, train_data, test_data = fixed.build(args)
    if fused:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, fused=True)
    network, batches, _ = prepare(model, train_data, test_data, args)
    if isinstance(network, FastModel) and network.cuda_graphs:
        model.module.compile(mode=mode, dynamic=False)
    batches.set_epoch(1)
    batch = next(iter(batches))
    start = time.perf_counter()
    fixed.train(network, Progress("warm-up", [batch] * 3, args), criterion, optimizer)
    warmup = time.perf_counter() - start
    progress = Progress("model", [batch] * 100, args)
    fixed.train(network, progress, criterion, optimizer)
    print(f"MODE {mode}, fused Adam {fused}: compile and warm-up {warmup:.0f} s, "
          f"model-only {progress.images_per_second:,.0f} img/s", flush=True)
EOF
LADDER=(--epochs 5 --limit-train-batches 100 --limit-eval-batches 25)
[ "${SMALL:-0}" = 1 ] && LADDER=(--epochs 2 --limit-train-batches 2 --limit-eval-batches 1)
step ladder 150 ./ablation.sh --dummy --no-pretrained --device "$DEVICE" "${LADDER[@]}" \
  --output-dir "$SCRATCH/ladder"
cp "$SCRATCH/ladder/ablation.png" "$OUT/ablation.png" 2>/dev/null
tr '\r' '\n' < "$SCRATCH/ladder.log" | grep -v 'batch/s' | tail -n 20 > "$OUT/ablation.txt"
step check 60 python docs/gpu_check.py
step modes 300 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" python "$SCRATCH/modes.py" \
  "${COMMON[@]}" --output-dir "$SCRATCH/modes"

{
  echo "gpu_verify.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git log -1 --format=%h 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  echo; cat "$SCRATCH"/{full,resume,check,modes}.log 2>/dev/null | tr '\r' '\n' \
    | grep '^epoch \|already holds\|^MODE\|fidelity\|within1\|host_syncs\|replay\|data_path' \
    | grep -v 'batch/s' 
  echo; cat "$OUT/bench.md"
  echo; echo "| step | exit | seconds |"; echo "|---|---|---|"; printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.md"
