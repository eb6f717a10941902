#!/usr/bin/env bash
# GPU check of the scale-out path, in bf16, one GPU_CHECK line of JSON per case (docs/distributed.md, "GPU check"):
# 1. tiny LLaVA-KD (debug recipe's distillation stage, LM + MDist + RDist) under DeepSpeed ZeRO-2 and ZeRO-3 on every
#    visible GPU;
# 2. real size: a stage of recipes/llava_kd_onevision.yaml (default DFT) with the real SigLIP-so400m + Qwen2.5-0.5B
#    student and a LLaVA-OneVision-Qwen2-0.5B-shaped teacher (random weights, written by bench/real_size.py on the
#    CPU first: ~4 GB of folders), ~2,048-token samples, under ZeRO-2 and ZeRO-3 on 1 GPU and on all of them.
# Each line: tokens/s (student tokens, all ranks, after warm-up), step time, peak allocated / reserved memory per GPU.
# Not run on a GPU yet (docs/performance.md, "Distributed").
#
#   bash bench/gpu_check.sh [OUT_DIR]
#   (PYTHON=..., GPUS=..., STEPS=... for the tiny cases; REAL=0 skips the real size; REAL_STAGE=dpt|sft|dft,
#    REAL_STEPS=12, REAL_WARMUP=2, REAL_MICRO=1 samples per GPU per micro-batch, REAL_TOKENS=2048)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-/tmp/mmkd-gpu-check}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
STEPS=${STEPS:-40}
REAL=${REAL:-1}
REAL_STAGE=${REAL_STAGE:-dft}
REAL_STEPS=${REAL_STEPS:-12}
REAL_WARMUP=${REAL_WARMUP:-2}
REAL_MICRO=${REAL_MICRO:-1}
REAL_TOKENS=${REAL_TOKENS:-2048}
export HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -m mmkd data tiny-assets --out "$OUT/assets" > /dev/null
for strategy in deepspeed_stage_2 deepspeed_stage_3; do
  rm -rf "$OUT/$strategy"
  "$PY" bench/gpu_check.py --root "$OUT/assets" --run-dir "$OUT/$strategy" --strategy "$strategy" \
      --devices "$GPUS" --steps "$STEPS" --batch-size $((8 * GPUS)) 2>&1 | grep -E "^GPU_CHECK|Error|error" || true
done
[ "$REAL" = 1 ] || exit 0
# The folders are written once (kept in OUT/real; world.json marks them done) with the CPU's torch threads.
"$PY" bench/real_size.py --build-only --tokens "$REAL_TOKENS" --out "$OUT/real" > /dev/null
worlds=$( [ "$GPUS" -gt 1 ] && echo "1 $GPUS" || echo 1 )
for strategy in deepspeed_stage_2 deepspeed_stage_3; do
  for n in $worlds; do
    run="$OUT/real-$REAL_STAGE-$strategy-$n"
    rm -rf "$run"
    "$PY" bench/gpu_check.py --real-size "$OUT/real" --stage "$REAL_STAGE" --run-dir "$run" \
        --strategy "$strategy" --devices "$n" --steps "$REAL_STEPS" --warmup "$REAL_WARMUP" \
        --micro-batch "$REAL_MICRO" 2>&1 | grep -E "^GPU_CHECK|Error|error" || true
  done
done
