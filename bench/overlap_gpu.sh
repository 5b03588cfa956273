#!/usr/bin/env bash
# One device-tool call on an H200 (`run` with carry [".whl"]): AdamW inside backward (train_optim.py) against the
# standard step, transformers v5 in the same process; ~5 min. Results go to $OUT (or ./gpu_out).
#   bash bench/overlap_gpu.sh
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/automodel_convert
export PYTHONPATH=/tmp/site:/tmp/pkg
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())' | tee "$OUT/env.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_train_optim.py 2>&1 | tail -3 | tee "$OUT/optim_tests.txt"
B="python3 bench/train_bench.py --layers 8 --seq 4096 --warmup 3"
# 1) the record: transformers, ours, each with the standard step and AdamW inside backward, ours with CUDA graphs
timeout 240 $B --runs transformers,ours,ours_overlap,ours_graphs_overlap --steps 15 2>&1 | grep -v Warning | tee "$OUT/train_bench_overlap.txt" | tail -14
# 2) the optimizer's side stream at high priority
timeout 150 $B --runs transformers,ours_overlap,ours_graphs_overlap --overlap-priority -1 --steps 15 2>&1 | grep -v Warning | tee "$OUT/train_bench_overlap_prio.txt" | tail -10
# 3) the trainer (ep=1) with --overlap-optimizer, then also --cuda-graphs
timeout 150 $B --runs transformers,trainer --overlap-optimizer --steps 15 2>&1 | grep -v Warning | tee "$OUT/trainer_overlap.txt" | tail -4
timeout 120 $B --runs trainer --overlap-optimizer --cuda-graphs --steps 15 2>&1 | grep -v Warning | tee "$OUT/trainer_overlap_graphs.txt" | tail -3
# 4) a profile of AdamW inside backward (2 steps)
timeout 120 $B --runs ours_overlap --steps 3 --profile "$OUT/profile_overlap.txt" 2>&1 | grep -v Warning | tail -2
