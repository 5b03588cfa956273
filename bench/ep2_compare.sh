#!/usr/bin/env bash
# The 2-GPU comparison, one device call on nvidia-h200-x2 per depth (carry [".whl", ".carry"]; .carry/nemo holds
# ../shared/bench/nemo/* and ../shared/deps/DeepEP-1.2.1.tar.gz). In the same call: transformers v5 FSDP2 dp=2 (the
# anchor script), ours (trainer, EP=2, native router and a labelled balanced gate; the ep=1 one-GPU step beside it)
# and NeMo AutoModel 0.7.0's own Qwen3-MoE (torch and DeepEP dispatchers, native and balanced gates).
# Qwen3-30B-A3B shapes, seq 4096, batch 1 per GPU, random tokens.
#   DEPTHS=8 bash bench/ep2_compare.sh        # results and the side-by-side table (bench/ep2_summary.py) in $OUT
# Env: DEPTHS (8 16), OURS_ARGS (default: --dispatcher auto --no-reshard), EXTRA_OURS ('|'-separated extra argument
# sets for labelled runs of ours, e.g. the configuration before a change), NEMO_STAGES (deepep deepep_bal; add torch
# torch_bal for its own dispatcher), SKIP_NEMO=1 (no NeMo rows)
set -uo pipefail
source bench/device_env.sh
source bench/deepep_build.sh
export PYTHONUNBUFFERED=1
OURS_ARGS=${OURS_ARGS:---dispatcher auto --no-reshard}
for L in ${DEPTHS:-8 16}; do
  timeout 200 torchrun --nproc_per_node 2 bench/anchors/hf_v5_fsdp_baseline.py --layers "$L" --seq 4096 --fused-adam 2>&1 | grep '^{' | tee "$OUT/hf_fsdp_${L}l.txt"
  timeout 240 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --gate balanced --steps 8 --warmup 3 $OURS_ARGS 2>&1 | grep '^{"impl' | tee "$OUT/ep2_${L}l.txt"
  IFS='|' read -ra extras <<< "${EXTRA_OURS:-}"
  for extra in "${extras[@]}"; do
    [ "$extra" = default ] && extra=""
    timeout 240 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --gate balanced --steps 8 --warmup 3 $OURS_ARGS $extra 2>&1 | grep '^{"impl' | tee -a "$OUT/ep2_${L}l.txt"
  done
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/train_bench.py --runs trainer --ep 1 --layers "$L" --seq 4096 --steps 8 --warmup 3 2>&1 | grep '^{"impl' | tee "$OUT/ep1_${L}l.txt"
  [ -n "${SKIP_NEMO:-}" ] || OUT="$OUT/nemo_${L}l" LAYERS="$L" bash .carry/nemo/run.sh setup ${NEMO_STAGES:-deepep deepep_bal} 2>&1 | grep -E '^(===|rc=|\{)' | cut -c1-300
done
python3 bench/ep2_summary.py "$OUT" | tee "$OUT/summary.md"
