#!/usr/bin/env bash
# One nvidia-h200-x2 call (carry [".whl", ".carry"]): the multi-GPU tests (full log), then bench/ep2_compare.sh for
# $DEPTHS (results bundled into $OUT/results.tar beside $OUT/summary.md and $OUT/gpu_tests.txt), then, if
# PROFILE_LAYERS is set, one profiled EP=2 trainer run for the exposed-communication figures ($OUT/profile_ep2.txt).
set -uo pipefail
source bench/device_env.sh
source bench/deepep_build.sh
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_ep_multi_gpu.py tests/test_ep_gpu.py > "$OUT/gpu_tests.txt" 2>&1
  tail -4 "$OUT/gpu_tests.txt"
fi
DEPTHS=${DEPTHS:-8} bash bench/ep2_compare.sh
(cd "$OUT" && tar cf /tmp/results.tar --exclude results.tar . && mv /tmp/results.tar . && find . -mindepth 1 -maxdepth 1 ! -name results.tar ! -name summary.md ! -name gpu_tests.txt -exec rm -rf {} +)
if [ -n "${PROFILE_LAYERS:-}" ]; then  # PROFILE_OPTS: '|'-separated argument sets, one profiled run each
  IFS='|' read -ra popts <<< "${PROFILE_OPTS:---dispatcher deepep --no-reshard}"
  for opts in "${popts[@]}"; do
    [ "$opts" = default ] && opts=""
    timeout 150 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$PROFILE_LAYERS" --seq 4096 --steps 4 --warmup 2 \
      --gate balanced --profile /tmp/prof.txt $opts 2>&1 | grep '^{"impl' | tee -a "$OUT/profile_ep2.txt"
  done
fi
