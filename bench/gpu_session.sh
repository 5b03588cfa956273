#!/usr/bin/env bash
# One device-tool call on an H200 (`run` with carry [".whl"]): install the carried wheels, check the machine, run the
# GPU tests and the 1-GPU training benchmarks. Results go to $OUT (or ./gpu_out).
#   bash bench/gpu_session.sh            # everything below, ~6 min on one H200
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/automodel_convert
export PYTHONPATH=/tmp/site:/tmp/pkg
python3 -c 'import torch, transformers, typer; print("torch", torch.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name())' | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >>"$OUT/env.txt" 2>&1
# 1) GPU-marked tests (kernels, bf16 paths) and the rest of the models' tests on CUDA
timeout ${GPU_TEST_TIMEOUT:-150} python3 -m pytest -q -x -p no:cacheprovider tests/test_models_kernels.py tests/test_models_experts.py tests/test_models_parity.py 2>&1 | tail -25 >"$OUT/gpu_tests.txt"
# 2) issue 5 + 6: transformers v5 vs the zoo vs the trainer (ep=1), 8 layers, seq 4096, native and balanced gates
timeout ${BENCH_TIMEOUT:-330} python3 bench/train_bench.py --layers ${LAYERS:-8} --seq 4096 --runs transformers,ours,trainer --gate balanced \
    --steps ${STEPS:-6} --warmup 3 2>&1 | grep -v Warning | tee "$OUT/train_bench_1gpu.txt" | tail -20
