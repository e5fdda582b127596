#!/usr/bin/env bash
# The GPU check of the trainer, one prepared script for one CUDA device (< 8 minutes):
#   1. the gpu-marked tests (device placement, bf16 autocast with fp32 master weights, device-tensor collectives,
#      temperature-scaled log-probs under autocast);
#   2. a short bf16 `ebpo train --device cuda` of builtin:medium (~41 M parameters, built in code, no download),
#      printing steps/s and peak GPU memory.
# Usage: bash scripts/gpu-check.sh      (PYTHON=... to choose the interpreter; OUT=dir to keep the run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-$(mktemp -d)}
export EBPO_CACHE_DIR="$OUT/cache"  # a fresh warm start, never the user's cache
export TRANSFORMERS_VERBOSITY=error

"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu-check: no CUDA device visible")'
"$PYTHON" -c 'import torch; print("gpu-check:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'

echo "== 1/2 gpu-marked tests"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_train_gpu.py

echo "== 2/2 bf16 training of builtin:medium on cuda"
timeout 300 "$PYTHON" -m ebpo train --model builtin:medium --device cuda --dtype bfloat16 \
    --steps 20 --prompts-per-step 64 --group-size 8 --max-new-tokens 16 --micro-batch-size 128 \
    --warmstart-steps 150 --warmstart-lr 1e-3 --warmstart-batch-size 128 --lr 1e-5 \
    --eval-samples 0 --max-eval-problems 128 --log-every 5 --no-progress --no-tensorboard --out "$OUT/run"

"$PYTHON" - "$OUT/run" <<'PY'
import json, math, os, sys

run = sys.argv[1]
rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
steps = [r for r in rows if "time/step_seconds" in r]
seconds = [r["time/step_seconds"] for r in steps[1:]] or [r["time/step_seconds"] for r in steps]  # first step warms up
peak = max(r.get("system/peak_gpu_memory_gb", float("nan")) for r in steps)
assert all(math.isfinite(v) for r in rows for v in r.values()), "non-finite metric"
summary = json.load(open(os.path.join(run, "summary.json")))
print(f"gpu-check: {len(steps)} steps | {len(seconds) / sum(seconds):.2f} steps/s | peak GPU memory {peak:.2f} GiB | "
      f"held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f} | wall {summary['wall_seconds']:.0f} s")
PY
echo "gpu-check: OK"
