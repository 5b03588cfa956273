#!/usr/bin/env bash
# Issue 16's throughput check on one H200 (`run` with carry [".whl"]): the trainer at Qwen3-30B-A3B shapes, 8 layers,
# random init, seq 4096, bf16, the same flags except the data: synthetic tokens, then SFT on the bundled chat data
# (fixtures/chat, packed, loss on assistant tokens) with block-causal document masks (sdpa with an explicit mask), and
# the same packed data with --packing-mask causal (flash-attn where installed). Metrics per run in $OUT/sft_*.jsonl.
# Not run yet: the device tool ran this session's main checkout, not the finetune worktree (issue 16 report).
set -euo pipefail
source bench/device_env.sh
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from train_bench import qwen3_config
qwen3_config(8, False).save_pretrained("/tmp/qwen3_30b_a3b_8l")
PY
COMMON="--model /tmp/qwen3_30b_a3b_8l --init random --seq 4096 --steps ${STEPS:-14} --lr 3e-4 --warmup 2 --quiet"
CHAT="--tokenizer fixtures/chat --data fixtures/chat/chat.jsonl"
python3 -m automodel_convert.train $COMMON --metrics "$OUT/sft_synthetic.jsonl"
python3 -m automodel_convert.train $COMMON $CHAT --metrics "$OUT/sft_packed_document.jsonl"
python3 -m automodel_convert.train $COMMON $CHAT --packing-mask causal --metrics "$OUT/sft_packed_causal.jsonl"
python3 - <<'PY'
import json, os, statistics
out = os.environ.get("OUT", "./gpu_out")
base = None
for name in ("synthetic", "packed_document", "packed_causal"):
    rows = [json.loads(l) for l in open(f"{out}/sft_{name}.jsonl")][4:]
    tps = statistics.median(r["tokens_per_s_per_gpu"] for r in rows)
    base = base or tps
    print(f"{name:16s} median tok/s/GPU {tps:9.0f}  ({100 * tps / base:.1f}% of synthetic)  step {statistics.median(r['step_ms'] for r in rows):.0f} ms  loss {rows[-1]['loss']:.3f}")
PY
