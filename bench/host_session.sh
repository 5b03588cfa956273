#!/usr/bin/env bash
# One 1-GPU call (`run` with carry [".whl"]): where the host's time goes in a training step.
# 1) bench/host_overhead.py: host µs of single launches (--micro, first back-end only), then host µs and kernels per
#    decoder-layer component, for each back-end in HOST_BACKENDS ("default" = no --backend);
# 2) the trainer's ep=1 step at $LAYERS layers ($RUNS) under each '|'-separated option set in TRAIN_VARIANTS, with a
#    torch profile (gpu_idle_ms: time with no kernel running; tables by device and by host time) and a cProfile.
# HOST_ARGS go to host_overhead.py (e.g. --ab-qk), PROFILE=0 skips the profiles, STEPS timed steps per run (6).
# Results in $OUT: host_<backend>.txt, trainer_profile.txt (JSON lines), trainer_prof_table.txt, cprofile.txt.
set -uo pipefail
source bench/device_env.sh
export PYTHONUNBUFFERED=1
L=${LAYERS:-8}
micro=(--micro)
for b in ${HOST_BACKENDS:-default expert_recompute=1}; do
  arg=(); [ "$b" != default ] && arg=(--backend "$b")
  timeout 200 python3 bench/host_overhead.py "${micro[@]}" "${arg[@]}" ${HOST_ARGS:-} 2>&1 | grep -v Warning | tee "$OUT/host_${b//[^a-z0-9_]/_}.txt" | tail -8
  micro=()
done
IFS='|' read -ra variants <<< "${TRAIN_VARIANTS:-}"
[ ${#variants[@]} -eq 0 ] && variants=("")
prof=(--profile "$OUT/trainer_prof_table.txt" --cprofile "$OUT/cprofile.txt"); [ "${PROFILE:-1}" = 0 ] && prof=()
for v in "${variants[@]}"; do
  timeout 300 python3 bench/train_bench.py --runs "${RUNS:-trainer}" --layers "$L" --seq 4096 --steps ${STEPS:-6} --warmup 3 $v \
    "${prof[@]}" 2>&1 | grep -E '^\{"impl' | tee -a "$OUT/trainer_profile.txt"
done
