#!/usr/bin/env bash
# One device call on nvidia-h200-x2 (carry [".whl", ".carry"]): build DeepEP, run the multi-GPU and GPU tests, then
# the EP=2 trainer at 8 layers with each dispatcher and FSDP option, profiled for exposed communication.
#   bash bench/ep_gpu_check.sh          # results in $OUT: gpu_tests.txt, ep2_options.txt, profile.txt
set -uo pipefail
source bench/device_env.sh
source bench/deepep_build.sh
export PYTHONUNBUFFERED=1
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_ep_multi_gpu.py tests/test_ep_gpu.py 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
L=${LAYERS:-8}
run() { timeout 150 torchrun --nproc_per_node 2 bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --steps 6 --warmup 3 --profile "$OUT/profile.txt" "$@" 2>&1 | grep '^{' | head -1 | tee -a "$OUT/ep2_options.txt"; }
run --dispatcher alltoall
run --dispatcher deepep
run --dispatcher deepep --no-reshard
