#!/usr/bin/env bash
# The trainer's CLI on one H200 (random init, Qwen3-30B-A3B shapes, 8 layers, seq 4096, synthetic tokens): JSON-lines
# metrics for docs/ plots. Run after bench/gpu_session.sh's install step (PYTHONPATH with the carried wheels).
set -euo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from train_bench import qwen3_config
qwen3_config(8, False).save_pretrained("/tmp/qwen3_30b_a3b_8l")
PY
python3 -m automodel_convert.train --model /tmp/qwen3_30b_a3b_8l --init random --seq 4096 --steps ${STEPS:-40} --lr 3e-4 \
    --warmup 5 --metrics "$OUT/trainer_metrics.jsonl" 2>&1 | tail -${TAIL:-6}
