# Sourced by the device-tool scripts (bench/gpu_session.sh, overlap_gpu.sh, ep2_compare.sh; `run` with carry
# [".whl"]): $OUT, the NCCL/transformers settings, the carried wheels installed into /tmp/site, this checkout
# importable as `automodel_convert`, and the machine written to $OUT/env.txt.
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/automodel_convert
export PYTHONPATH=/tmp/site:/tmp/pkg
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name())' | tee "$OUT/env.txt"
