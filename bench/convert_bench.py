"""Conversion benchmark: merge and split of a Qwen3-30B-A3B-shaped per-expert checkpoint against `cp -r` and
transformers v5 (`from_pretrained` + `safetensors.save_file` of the fused state dict), each a separate process.

    .venv/bin/python bench/convert_bench.py --layers 2 6 [--work /tmp/convert-bench] [--skip-transformers]

Shapes: H 2048, 128 experts, I 768, 32 heads x 128, 4 KV heads, vocab 151936, bf16; the hub's per-expert layout
with ~2 GB shards. `--floor` adds a durable copy of the same bytes (`dd oflag=direct` per file, then `sync -f`),
the least any fsynced write of this checkpoint can take on the disk; `--no-fsync` adds merge and split writing
through the page cache with no fsync (`AUTOMODEL_CONVERT_FSYNC=0 AUTOMODEL_CONVERT_DIRECT=0`), as `cp -r` writes. Prints wall time and peak RSS (from wait4) of every step, the ratio of merge and split to
`cp -r` in the same run (target <= 1.3x) and peak RSS (target <= 300 MB, flat in the number of layers), and
writes the rows as JSON lines to --out.

Every step starts from the same state: its previous output deleted, the other checkpoint folder evicted from the
page cache (the source while split runs, as for a user who splits a fused checkpoint), an untimed `cp -r` of the
step's own input written and deleted (the input is then the most recently read data in the page cache, and as much
memory as the step will write was just freed), then `sync`. Without that the order of steps decides the figures on a VM: writing into
page-cache memory the guest has not touched recently costs up to ~2x (split run right after merge, whose output it
reads, took 2.9-3.6 s; the same split right after a source-sized folder was written and deleted took 1.1-1.9 s), and
at 6 layers three 8.7 GB folders (source, fused, split) do not fit in this machine's page cache, so a split that
also had to keep the source cached paid for reclaiming memory that cp and merge (two folders each) never did. Repeats are interleaved (cp, merge, split, cp, ...) and the median is reported with every run listed.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))

H, E, I, VOCAB, HEADS, KV, HD = 2048, 128, 768, 151936, 32, 4, 128


def qwen3_30b_config(layers: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": VOCAB,
        "hidden_size": H,
        "intermediate_size": 6144,
        "moe_intermediate_size": I,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "num_experts": E,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def tensor_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,), "lm_head.weight": (VOCAB, H)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (HEADS * HD, H),
                p + "self_attn.k_proj.weight": (KV * HD, H),
                p + "self_attn.v_proj.weight": (KV * HD, H),
                p + "self_attn.o_proj.weight": (H, HEADS * HD),
                p + "self_attn.q_norm.weight": (HD,),
                p + "self_attn.k_norm.weight": (HD,),
                p + "mlp.gate.weight": (E, H),
            }
        )
        for e in range(E):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
    return shapes


def build_checkpoint(folder: Path, layers: int, shard_bytes: int = 2_000_000_000) -> None:
    """Write the checkpoint tensor by tensor (random bytes, small memory), hub-style shards + index."""
    from automodel_convert.convert.safetensors_io import encode_header

    if (folder / "model.safetensors.index.json").exists():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(layers)
    names = list(shapes)  # hub order: embeddings, then layer by layer
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = 2 * _numel(shapes[n])
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    weight_map = {}
    block = os.urandom(64 << 20)
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        keys = sorted(keys)  # safetensors' writer orders a shard's tensors by name
        header, _ = encode_header([(k, "BF16", shapes[k]) for k in keys], {"format": "pt"})
        with open(tmp / fname, "wb") as f:
            f.write(header)
            pos = 0
            for k in keys:
                nb = 2 * _numel(shapes[k])
                while nb:
                    n = min(nb, len(block) - pos % len(block))
                    f.write(block[pos % len(block) : pos % len(block) + n])
                    pos += n
                    nb -= n
                weight_map[k] = fname
    total = sum(2 * _numel(s) for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (tmp / "config.json").write_text(json.dumps(qwen3_30b_config(layers), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    os.rename(tmp, folder)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(cmd: list[str], label: str, env: dict | None = None) -> dict:
    """Run `cmd` as a child; wall time and its own peak RSS.

    Peak RSS comes from GNU time's `%M` (wait4 of a process that starts small): wait4 straight on a child forked
    from this Python process would count the parent's pages copied at fork.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"step": label, "wall_s": round(wall, 2), "peak_rss_mb": round(peak_kb / 1024, 1)}


TRANSFORMERS_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
import os
os.makedirs(sys.argv[2], exist_ok=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
sd = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(sd, sys.argv[2] + "/model.safetensors", metadata={"format": "pt"})
"""


def drop_page_cache_for(folder: Path) -> None:
    """Evict a folder's pages (posix_fadvise DONTNEED) so every step starts from the same cache state."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# the page-cache path, as `cp -r` writes: no fsync before the rename, no O_DIRECT (measurements only)
NO_FSYNC = {"AUTOMODEL_CONVERT_FSYNC": "0", "AUTOMODEL_CONVERT_DIRECT": "0"}


def run_depth(work: Path, layers: int, skip_transformers: bool, cold: bool, repeat: int = 1, precondition: bool = True, floor: bool = False,
              no_fsync: bool = False) -> list[dict]:
    py = sys.executable
    cli = [py, "-m", "automodel_convert.cli"]
    src = work / f"qwen3-30b-a3b-{layers}L"
    t0 = time.perf_counter()
    build_checkpoint(src, layers)
    print(f"# checkpoint {src} ({folder_size(src) / 1e9:.2f} GB, built/found in {time.perf_counter() - t0:.1f} s)", flush=True)
    rows = []

    def step(label: str, cmd: list[str], out: Path, clean: bool = True, inp: Path = src, env: dict | None = None) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        if precondition:  # the same memory state before every step (see the module docstring)
            for other in (src, work / "fused"):
                if other != inp and other.exists():
                    drop_page_cache_for(other)
            scratch = work / "scratch"
            subprocess.run(["cp", "-r", str(inp), str(scratch)], check=True)
            shutil.rmtree(scratch)
        if cold:
            drop_page_cache_for(src)
        subprocess.run(["sync"])
        r = measure(cmd, label, env)
        r.update(layers=layers, gb=round(folder_size(src) / 1e9, 2))
        rows.append(r)
        print(json.dumps(r), flush=True)
        if clean:
            shutil.rmtree(out, ignore_errors=True)
        return r

    # interleaved repeats, so background load and writeback hit every step alike; the median is reported
    for _ in range(repeat):
        step("cp -r", ["cp", "-r", str(src), str(work / "cp")], work / "cp")
        if floor:  # the same bytes written durably, no conversion: what any fsynced copy waits for on this disk
            out = work / "dd"
            script = f'mkdir "{out}" && for f in "{src}"/*; do dd if="$f" of="{out}/$(basename "$f")" bs=4M oflag=direct status=none || exit 1; done && sync -f "{out}"'
            step("dd oflag=direct (durable copy)", ["sh", "-c", script], out)
        for tag, env in [("", None)] + ([(" (no fsync, page cache as cp -r)", NO_FSYNC)] if no_fsync else []):
            step("merge" + tag, cli + ["merge", str(src), str(work / "fused"), "-q"], work / "fused", clean=False, env=env)
            step("split" + tag, cli + ["split", str(work / "fused"), str(work / "split"), "-q"], work / "split", clean=False, inp=work / "fused", env=env)
            same = all(filecmp.cmp(work / "split" / p.name, p, shallow=False) for p in src.iterdir())
            rows[-1]["split_identical_to_source"] = same
            if not same:
                raise SystemExit("split output differs from the source checkpoint")
            shutil.rmtree(work / "split", ignore_errors=True)
            shutil.rmtree(work / "fused", ignore_errors=True)
    if not skip_transformers:
        step("transformers from_pretrained+save_file", [py, "-c", TRANSFORMERS_SCRIPT, str(src), str(work / "hf")], work / "hf")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--transformers-layers", type=int, nargs="*", default=None, help="depths at which to run transformers (default: all)")
    ap.add_argument("--cold", action="store_true", help="evict the source from the page cache before each step")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "convert_bench.jsonl")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repeats of cp/merge/split (median reported)")
    ap.add_argument("--floor", action="store_true", help="also time a durable copy of the same bytes (dd oflag=direct): the floor of any fsynced write")
    ap.add_argument("--no-fsync", action="store_true", help="also time merge and split writing through the page cache with no fsync, as cp -r does")
    ap.add_argument("--no-precondition", action="store_true", help="skip the untimed write+delete of a source-sized copy before each step")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in a.layers:
        skip = a.skip_transformers or (a.transformers_layers is not None and layers not in a.transformers_layers)
        rows += run_depth(a.work, layers, skip, a.cold, a.repeat, not a.no_precondition, a.floor, a.no_fsync)
        if not a.keep:
            shutil.rmtree(a.work / f"qwen3-30b-a3b-{layers}L", ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n{'layers':>6} {'GB':>6} {'step':<40} {'median s':>9} {'runs':>18} {'x cp -r':>8} {'peak RSS MB':>12}")
    summary = []
    for layers in a.layers:
        steps = dict.fromkeys(r["step"] for r in rows if r["layers"] == layers)
        med = {st: statistics.median(r["wall_s"] for r in rows if r["layers"] == layers and r["step"] == st) for st in steps}
        for st in steps:
            rs = [r for r in rows if r["layers"] == layers and r["step"] == st]
            rss = max(r["peak_rss_mb"] for r in rs)
            runs = ",".join(f"{r['wall_s']:.1f}" for r in rs)
            ratio = med[st] / med["cp -r"]
            summary.append({"layers": layers, "step": st, "median_s": med[st], "x_cp": round(ratio, 2), "peak_rss_mb": rss})
            print(f"{layers:>6} {rs[0]['gb']:>6} {st:<40} {med[st]:>9.2f} {runs:>18} {ratio:>8.2f} {rss:>12.1f}")
    merge_ok = all(r["x_cp"] <= 1.3 for r in summary if r["step"] in ("merge", "split"))
    rss_ok = all(r["peak_rss_mb"] <= 300 for r in summary if r["step"].startswith(("merge", "split")))
    print(f"\ntargets: merge/split <= 1.3x cp -r: {'met' if merge_ok else 'NOT met'}; peak RSS <= 300 MB: {'met' if rss_ok else 'NOT met'}")
    if a.no_fsync:
        cache_ok = all(r["x_cp"] <= 1.3 for r in summary if r["step"].startswith(("merge (", "split (")))
        print(f"         the same without fsync (page cache, as cp -r; checksums included): {'met' if cache_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
