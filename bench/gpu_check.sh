#!/usr/bin/env bash
# GPU check of the scale-out path: tiny LLaVA-KD (debug recipe's distillation stage, LM + MDist + RDist) under
# DeepSpeed ZeRO-2 and ZeRO-3 in bf16 on every visible GPU. Prints, per preset, one GPU_CHECK line of JSON:
# tokens/s (student tokens, all ranks, after warm-up) and peak allocated / reserved memory per GPU.
# Not run on a GPU yet (docs/performance.md, "Distributed").
#
#   bash bench/gpu_check.sh [OUT_DIR]        (PYTHON=..., GPUS=..., STEPS=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-/tmp/mmkd-gpu-check}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-40}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m mmkd data tiny-assets --out "$OUT/assets" > /dev/null
for strategy in deepspeed_stage_2 deepspeed_stage_3; do
  rm -rf "$OUT/$strategy"
  "$PY" bench/gpu_check.py --root "$OUT/assets" --run-dir "$OUT/$strategy" --strategy "$strategy" \
      --devices "$GPUS" --steps "$STEPS" --batch-size $((8 * GPUS)) 2>&1 | grep -E "^GPU_CHECK|Error|error" || true
done
