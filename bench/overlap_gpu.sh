#!/usr/bin/env bash
# One device-tool call on an H200 (`run` with carry [".whl"]): AdamW inside backward (train/optim.py) against the
# standard step, transformers v5 in the same process; ~6 min. Results go to $OUT (or ./gpu_out).
#   bash bench/overlap_gpu.sh
set -uo pipefail
source bench/device_env.sh
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_optim.py 2>&1 | tail -3 | tee "$OUT/optim_tests.txt"
B="python3 bench/train_bench.py --layers 8 --seq 4096 --warmup 3"
RUNS=transformers,ours,trainer,ours_overlap,trainer_overlap,ours_graphs,ours_graphs_overlap,trainer_graphs_overlap
# the record: two independent runs of every variant, transformers in the same process
for r in ${REPEATS:-1 2}; do
  timeout 330 $B --runs $RUNS --steps 15 2>&1 | grep -v Warning | tee "$OUT/train_bench_overlap_run$r.txt" | grep -E "^speed-up|^impl|^(transformers|ours|trainer)|gib_left" | sed -E 's/.*"impl": "([^"]+)".*"gib_left_by_earlier_runs": ([0-9.]+).*/\1 left \2/'
done
