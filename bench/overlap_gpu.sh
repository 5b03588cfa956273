#!/usr/bin/env bash
# One device-tool call on an H200 (`run` with carry [".whl"]): AdamW inside backward (train_optim.py) against the
# standard step, transformers v5 in the same process. Results go to $OUT (or ./gpu_out).
#   PART=bench bash bench/overlap_gpu.sh     # CUDA test of OverlappedAdamW + the 8-layer benchmark (~6 min)
#   PART=trainer bash bench/overlap_gpu.sh   # the trainer with --overlap-optimizer (+ --cuda-graphs) and a profile
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/automodel_convert
export PYTHONPATH=/tmp/site:/tmp/pkg
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
if [ "${PART:-bench}" = bench ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_optim.py 2>&1 | tail -5 | tee "$OUT/optim_tests.txt"
  timeout ${BENCH_TIMEOUT:-420} python3 bench/train_bench.py --layers 8 --seq 4096 \
      --runs transformers,ours,ours_overlap,ours_graphs_overlap,transformers_overlap --steps ${STEPS:-12} --warmup 3 \
      2>&1 | grep -v Warning | tee "$OUT/train_bench_overlap.txt" | tail -24
else
  timeout 200 python3 bench/train_bench.py --layers 8 --seq 4096 --runs transformers,trainer --overlap-optimizer \
      --steps 12 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/trainer_overlap.txt" | tail -8
  timeout 200 python3 bench/train_bench.py --layers 8 --seq 4096 --runs trainer --overlap-optimizer --cuda-graphs \
      --steps 12 --warmup 3 2>&1 | grep -v Warning | tee "$OUT/trainer_overlap_graphs.txt" | tail -4
  timeout 150 python3 bench/train_bench.py --layers 8 --seq 4096 --runs ours_graphs_overlap --steps 3 --warmup 3 \
      --profile "$OUT/profile_overlap.txt" 2>&1 | grep -v Warning | tail -3
fi
