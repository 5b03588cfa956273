#!/usr/bin/env bash
# The 2-GPU comparison (issue 7), ready for the device tool's `nvidia-h200-x2` kind (run with carry [".whl"]):
# ours (trainer, EP=2 over dp=2, all-to-all dispatcher) against transformers v5 FSDP2 dp=2 (the anchor script,
# bench/anchors/hf_v5_fsdp_baseline.py = shared/bench/hf_v5_fsdp_baseline.py), Qwen3-30B-A3B shapes at 8 and 16
# layers, seq 4096, batch 1 per GPU, random tokens, native router plus a labelled balanced-gate run.
#   bash bench/ep2_compare.sh        # results in $OUT: ep2_<layers>l.txt, hf_fsdp_<layers>l.txt
set -uo pipefail
source bench/device_env.sh
for L in ${DEPTHS:-8 16}; do
  timeout 240 torchrun --nproc_per_node 2 bench/anchors/hf_v5_fsdp_baseline.py --layers "$L" --seq 4096 --fused-adam 2>&1 | grep -v Warn | tail -3 | tee "$OUT/hf_fsdp_${L}l.txt"
  timeout 300 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --gate balanced --steps 8 --warmup 3 2>&1 | grep -v Warn | tail -8 | tee "$OUT/ep2_${L}l.txt"
done
