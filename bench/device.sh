#!/usr/bin/env bash
# The GPU issue's device run, prepared and tried on CPU first. On a fresh H200 (torch 2.11, transformers 5.17,
# lightning, peft there; omegaconf carried from .whl/, see bench/prepare-wheels.sh), from the repository root:
#   bash bench/device.sh            (the session's device tool: command "bash bench/device.sh", carry [".whl"])
# in <= 8 minutes: (1) the gpu-marked tests, (2) the LLaDA-8B-shape bench: batch 1, 8, 32 x caches none/prefix/dual
# after a 1,024-token prompt, one 32-token block, against the copy-bandwidth floor and LLaDA's reference loop at
# equal NFE, (3) one bf16 LoRA certainty-forcing step at LLaDA-8B shapes (recipes/llada-8b/distill.yaml's LoRA:
# tokens/s, peak memory, MFU). Everything lands in $OUT (bench.json, logs); commit bench.json as
# bench/results/h200.json with this command line.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/* \
  && python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/site . \
  || { echo "install failed"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -5
timeout 420 python3 -m dparallel bench recipes/llada-8b/bench.yaml run_dir="$OUT/bench" bench.train_step=true \
  2>&1 | tee "$OUT/bench.log"
cp "$OUT/bench/bench.json" "$OUT/bench.json" 2>/dev/null || echo "no bench.json"
