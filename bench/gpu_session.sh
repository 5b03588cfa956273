#!/usr/bin/env bash
# One device-tool call on an H200 (`run` with carry [".whl"]): install the carried wheels, check the machine, run the
# GPU tests and the 1-GPU training benchmarks. Results go to $OUT (or ./gpu_out).
#   bash bench/gpu_session.sh            # everything below, ~6 min on one H200
set -uo pipefail
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
# 1) GPU-marked tests (kernels, bf16 paths) and the rest of the models' tests on CUDA
timeout ${GPU_TEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_models_kernels.py tests/test_models_experts.py tests/test_models_parity.py 2>&1 | tail -25 >"$OUT/gpu_tests.txt"
# 2) issue 5 + 6: transformers v5 vs the zoo vs the trainer (ep=1), 8 layers, seq 4096, native and balanced gates
timeout ${BENCH_TIMEOUT:-330} python3 bench/train_bench.py --layers ${LAYERS:-8} --seq 4096 --runs transformers,ours,trainer --gate balanced \
    --steps ${STEPS:-6} --warmup 3 2>&1 | grep -v Warning | tee "$OUT/train_bench_1gpu.txt" | tail -20
