#!/usr/bin/env bash
# One nvidia-h200-x2 call (carry [".whl", ".carry"]): transformers FSDP2 dp=2 (the anchor) and ours at EP=2 under
# each '|'-separated variant in VARIANTS, in that order, at $LAYERS layers. A variant is `TORCHRUN ARGS ;; TRAINER
# ARGS` (either side may be empty), e.g. `--numa-binding node ;; --backend expert_recompute=1`: launcher and trainer
# options measured in the same call, A/B/A where a variant is repeated. Results: $OUT/ep2_variants.txt (JSON lines,
# each with its variant), $OUT/topo.txt (GPU/CPU topology), a table on stdout.
set -uo pipefail
source bench/device_env.sh
source bench/deepep_build.sh
export PYTHONUNBUFFERED=1
L=${LAYERS:-16}
BASE=${BASE_ARGS:---dispatcher auto --no-reshard}
{ nvidia-smi topo -m; lscpu | grep -iE 'numa|^cpu\(s\)|model name'; } > "$OUT/topo.txt" 2>&1
timeout 200 torchrun --nproc_per_node 2 bench/anchors/hf_v5_fsdp_baseline.py --layers "$L" --seq 4096 --fused-adam 2>&1 | grep '^{' | tee "$OUT/hf_fsdp_${L}l.txt"
IFS='|' read -ra variants <<< "${VARIANTS:-;;}"
for v in "${variants[@]}"; do
  launcher=${v%%;;*}; opts=${v#*;;}
  timeout 200 torchrun --nproc_per_node 2 $launcher bench/train_bench.py --runs trainer --ep 2 --layers "$L" --seq 4096 --gate balanced --steps 8 --warmup 3 \
    $BASE $opts 2>&1 | grep '^{"impl' | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line); r["variant"] = sys.argv[1]; print(json.dumps(r))' "$v" | tee -a "$OUT/ep2_variants.txt" | python3 -c '
import json, sys
for r in map(json.loads, sys.stdin):
    print("{variant:60s} {gate:9s} step {step_ms:7.1f} ms  fwd {fwd_ms:6.1f}  bwd {bwd_ms:6.1f}  opt {opt_ms:5.1f}  peak {peak_gib:6.2f} GiB".format(**r))'
done
