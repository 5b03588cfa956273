#!/usr/bin/env bash
# Issue 16's throughput check on one H200 (`run` with carry [".whl"]), one call:
#   STEPS=8 bash bench/sft_gpu.sh          # WITH_MASK=1 adds the explicit-mask run; GPU_TESTS=0 skips the tests
# 1. the varlen GPU tests (tests/test_train_varlen_gpu.py: varlen_attn against the explicit block-causal mask, values
#    and gradients in bf16) -> $OUT/sft_gpu_tests.txt;
# 2. the trainer at Qwen3-30B-A3B shapes, 8 layers, random init, seq 4096, bf16, the same flags except the data:
#    synthetic tokens; SFT on the bundled chat data (fixtures/chat, packed, loss on assistant tokens) with per-document
#    attention (--packing-mask document, --doc-attention auto: varlen_attn on CUDA); the same packed data with
#    --packing-mask causal (documents share causal attention, positions still restart); with WITH_MASK=1 also
#    --doc-attention mask (sdpa with an explicit block-causal mask, the path varlen replaces).
# Metrics per run in $OUT/sft_*.jsonl; the summary (median tokens/s after the fourth step, % of synthetic, and the
# kernel the document runs used, from the metrics' doc_attention) in $OUT/sft_summary.txt.
set -euo pipefail
source bench/device_env.sh
export PYTHONUNBUFFERED=1
if [ "${GPU_TESTS:-1}" = 1 ]; then
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_train_varlen_gpu.py 2>&1 | tail -30 | tee "$OUT/sft_gpu_tests.txt" || true
fi
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from train_bench import qwen3_config
qwen3_config(8, False).save_pretrained("/tmp/qwen3_30b_a3b_8l")
PY
COMMON="--model /tmp/qwen3_30b_a3b_8l --init random --seq 4096 --steps ${STEPS:-14} --lr 3e-4 --warmup 2 --quiet"
CHAT="--tokenizer fixtures/chat --data fixtures/chat/chat.jsonl"
RUNS="synthetic packed_document packed_causal"
python3 -m automodel_convert.train $COMMON --metrics "$OUT/sft_synthetic.jsonl"
python3 -m automodel_convert.train $COMMON $CHAT --metrics "$OUT/sft_packed_document.jsonl"
python3 -m automodel_convert.train $COMMON $CHAT --packing-mask causal --metrics "$OUT/sft_packed_causal.jsonl"
if [ "${WITH_MASK:-0}" = 1 ]; then
    python3 -m automodel_convert.train $COMMON $CHAT --doc-attention mask --metrics "$OUT/sft_packed_document_mask.jsonl"
    RUNS="$RUNS packed_document_mask"
fi
RUNS="$RUNS" python3 - <<'PY' | tee "$OUT/sft_summary.txt"
import json, os, statistics
out = os.environ.get("OUT", "./gpu_out")
base = None
for name in os.environ["RUNS"].split():
    rows = [json.loads(l) for l in open(f"{out}/sft_{name}.jsonl")][4:]
    tps = statistics.median(r["tokens_per_s_per_gpu"] for r in rows)
    base = base or tps
    kernel = rows[-1].get("doc_attention", "-")
    print(f"{name:21s} median tok/s/GPU {tps:9.0f}  ({100 * tps / base:.1f}% of synthetic)  step {statistics.median(r['step_ms'] for r in rows):.0f} ms"
          f"  loss {rows[-1]['loss']:.3f}  document attention: {kernel}")
PY
