#!/usr/bin/env bash
# Sourced by the device scripts: build DeepEP 1.2.1's extension from its upstream tarball (carried in .carry/, never
# vendored: ../shared/deps/DeepEP-1.2.1.tar.gz) into /tmp/DeepEP-1.2.1 and put it on PYTHONPATH. ~41 s on an H200
# host; once per machine (a warm machine keeps /tmp). The recipe and its checks: docs/DEEPEP.md.
DEEPEP_TARBALL=${DEEPEP_TARBALL:-$(ls .carry/DeepEP-*.tar.gz .carry/nemo/DeepEP-*.tar.gz 2>/dev/null | head -1)}
if ! PYTHONPATH=/tmp/DeepEP-1.2.1 python3 -c "import deep_ep" 2>/dev/null; then
  if [ -z "$DEEPEP_TARBALL" ]; then
    echo "deepep_build: no DeepEP tarball under .carry/ (copy ../shared/deps/DeepEP-1.2.1.tar.gz there and carry it)"
  else
    rm -rf /tmp/DeepEP-1.2.1 && tar -xzf "$DEEPEP_TARBALL" -C /tmp
    start=$(date +%s)
    (cd /tmp/DeepEP-1.2.1 && NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      CPLUS_INCLUDE_PATH=/usr/local/cuda/include/cccl MAX_JOBS=32 python3 setup.py build_ext --inplace) > "${OUT:-.}/deepep_build.log" 2>&1
    echo "deepep_build: rc=$? in $(( $(date +%s) - start )) s"
  fi
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/DeepEP-1.2.1
python3 -c "import deep_ep; print('deep_ep importable, sm90:', deep_ep.Buffer.is_sm90_compiled())" 2>&1 | tail -1
