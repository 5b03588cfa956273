#!/usr/bin/env bash
# One nvidia-h200-x2 call (carry [".whl", ".carry"]): the multi-GPU tests, then ours at EP=2 under each '|'-separated
# argument set in OPTIONS (both gates, 8 measured steps), then one profiled run (native gate) per set in PROFILE_OPTS:
# the before/after figures of one change, measured in the same call. Results: $OUT/options.txt, $OUT/profiles.txt.
#   LAYERS=8 OPTIONS='--reduce-dtype float32 --fsdp-before|default' bash bench/ep2_options.sh   ('default': no extra arguments)
set -uo pipefail
source bench/device_env.sh
source bench/deepep_build.sh
export PYTHONUNBUFFERED=1
L=${LAYERS:-8}
BASE=${BASE_ARGS:---dispatcher deepep --no-reshard}
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_ep_multi_gpu.py ${TEST_K:+-k "$TEST_K"} > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.txt" | tail -8
fi
IFS='|' read -ra sets <<< "${OPTIONS:-}"
for opts in "${sets[@]}"; do
  [ "$opts" = default ] && opts=""
  timeout 200 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --gate balanced --steps 8 --warmup 3 \
    $BASE $opts 2>&1 | grep '^{"impl' | tee -a "$OUT/options.txt" | python3 -c 'import json,sys; [print({k: r.get(k) for k in ("impl","step_ms","tps","tflops","peak_gib","fwd_ms","bwd_ms","opt_ms","grad_reduce")}) for r in map(json.loads, sys.stdin)]'
done
IFS='|' read -ra psets <<< "${PROFILE_OPTS:-}"
for opts in "${psets[@]}"; do
  [ "$opts" = default ] && opts=""
  timeout 150 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --steps 4 --warmup 2 \
    --profile "$OUT/prof_$(echo "$opts" | tr -c 'a-z0-9' '_').txt" $BASE $opts 2>&1 | grep '^{"impl' | tee -a "$OUT/profiles.txt" | python3 -c 'import json,sys; [print({k: v for k, v in r.items() if k in ("impl","step_ms","peak_gib") or "comm" in k}) for r in map(json.loads, sys.stdin)]'
done
