"""Expert-parallel load benchmark: `parallel.load_sharded` on 4 CPU ranks against transformers v5's EP loading
(`DistributedConfig(ep_size=4, fsdp_size=4)`) and a single-process full load, on a Qwen3-30B-A3B-shaped
per-expert checkpoint (H 2048, 128 experts, I 768, vocab 151936, bf16; `bench/convert_bench.py` builds it once).

    .venv/bin/python bench/ep_load_bench.py [--layers 4] [--ranks 4] [--work bench/out/ep_load] [--save]
    .venv/bin/python bench/ep_load_bench.py --layers 1          # quick smoke run

Every rank is its own spawned process (gloo), measured from inside: bytes read (the loader's counter and the
kernel's `rchar`), peak RSS (`VmHWM`), the local shard bytes it ends up holding, the time of the load call itself
(imports and process start excluded; the process wall time is printed too). Targets per rank: bytes read <=
1.05 x (expert bytes / ranks + non-expert bytes); peak RSS <= local shard bytes + 400 MB. transformers needs
`accelerate` for distributed loading; when it is missing (or anything else fails) the exact error is printed
and the run goes on. A memory guard kills a group of processes whose anonymous RSS together passes
`--mem-limit-gb` (default 85% of RAM) instead of letting the machine swap or OOM. Before each group the
checkpoint is read once to warm the page cache (it may not stay cached beside the loaders' memory at 4 layers on
a 24 GiB machine); `--cold` evicts its pages instead (then `read_bytes` counts storage reads). `--save` also times
`save_sharded(layout="original")` and checks the output equals the source files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT / "bench"))

from convert_bench import build_checkpoint, drop_page_cache_for  # noqa: E402  (same checkpoint as the convert bench)

MB = 1 << 20


# ---------------------------------------------------------------- measurements inside a child


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) * 1024
    return out


def proc_io() -> dict[str, int]:
    """rchar (bytes through read syscalls) and read_bytes (bytes fetched from storage) of this process."""
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (ln.split(": ") for ln in lines) if k in ("rchar", "read_bytes")}


def _finish(out: Path, res: dict) -> None:
    res.update({"peak_rss": proc_status()["VmHWM"], "status": proc_status()})
    out.write_text(json.dumps(res))


def ours_child(rank: int, world: int, init: str, ckpt: str, out: str, save_dst: str | None, dense: str) -> None:
    t_start = time.perf_counter()
    res: dict = {"rank": rank, "dense": dense}
    try:
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor  # noqa: F401  (import cost outside the timed load)

        from automodel_convert.parallel import build_mesh, load_sharded, save_sharded

        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        mesh = build_mesh(ep=world)
        dist.barrier()
        res["rss_before"] = proc_status()["VmRSS"]
        io0 = proc_io()
        t0 = time.perf_counter()
        state = load_sharded(ckpt, mesh, dense=dense)
        res["load_s"] = time.perf_counter() - t0
        io1 = proc_io()
        res["io"] = {k: io1[k] - io0.get(k, 0) for k in io1}
        st = state.stats
        res.update(bytes_read=st.bytes_read, expert_bytes_read=st.expert_bytes_read, dense_bytes_read=st.dense_bytes_read, local_bytes=st.local_bytes, experts=str(st.experts))
        res["peak_rss_load"] = proc_status()["VmHWM"]
        if save_dst:
            dist.barrier()
            t0 = time.perf_counter()
            r = save_sharded(state, save_dst, mesh, layout="original")
            res["save_s"] = time.perf_counter() - t0
            res["bytes_written"] = r.bytes_written
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported in the table
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()
    res["process_s"] = time.perf_counter() - t_start
    _finish(Path(out), res)


def hf_child(rank: int, world: int, port: int, ckpt: str, out: str, dc: dict) -> None:
    t_start = time.perf_counter()
    res: dict = {"rank": rank, "distributed_config": dc}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor
        from transformers import AutoModelForCausalLM
        from transformers.distributed import DistributedConfig

        dist.init_process_group("gloo")
        res["rss_before"] = proc_status()["VmRSS"]
        io0 = proc_io()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt, distributed_config=DistributedConfig(**dc), dtype=torch.bfloat16)
        res["load_s"] = time.perf_counter() - t0
        io1 = proc_io()
        res["io"] = {k: io1[k] - io0.get(k, 0) for k in io1}
        local = 0
        for v in model.state_dict().values():
            t = v.to_local() if isinstance(v, DTensor) else v
            local += t.numel() * t.element_size()
        res["local_bytes"] = local
        k = next(k for k in model.state_dict() if "experts.gate_up_proj" in k)
        v = model.state_dict()[k]
        res["expert_placement"] = f"{k}: {tuple(v.shape)} {getattr(v, 'placements', 'not a DTensor')}"
        res["peak_rss_load"] = proc_status()["VmHWM"]
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        res["traceback"] = traceback.format_exc()[-3000:]
    res["process_s"] = time.perf_counter() - t_start
    _finish(Path(out), res)


def full_child(ckpt: str, out: str) -> None:
    t_start = time.perf_counter()
    res: dict = {"rank": 0}
    try:
        from safetensors.torch import load_file

        res["rss_before"] = proc_status()["VmRSS"]
        io0 = proc_io()
        t0 = time.perf_counter()
        sd: dict = {}
        for f in sorted(Path(ckpt).glob("*.safetensors")):
            mapped = load_file(str(f))  # tensors on the file's mmap: copy them into memory, as a load must
            sd.update({k: v.clone() for k, v in mapped.items()})
            del mapped
        res["load_s"] = time.perf_counter() - t0
        io1 = proc_io()
        res["io"] = {k: io1[k] - io0.get(k, 0) for k in io1}
        res["local_bytes"] = sum(t.numel() * t.element_size() for t in sd.values())
        res["peak_rss_load"] = proc_status()["VmHWM"]
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {e}"
    res["process_s"] = time.perf_counter() - t_start
    _finish(Path(out), res)


# ---------------------------------------------------------------- the parent


def _anon_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_group(label: str, targets: list[tuple], work: Path, mem_limit: int, timeout: float) -> tuple[list[dict], float, str | None]:
    """Start one process per (fn, args, out) and wait, killing them all past `mem_limit` anonymous RSS."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=args) for fn, args, _ in targets]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    guard = None
    peak_total = 0
    while any(p.is_alive() for p in procs):
        total = sum(_anon_rss(p.pid) for p in procs if p.is_alive())
        peak_total = max(peak_total, total)
        if total > mem_limit:
            guard = f"killed by the memory guard: {total / MB:.0f} MB anonymous RSS in {len(procs)} processes > {mem_limit / MB:.0f} MB"
        elif time.perf_counter() - t0 > timeout:
            guard = f"killed after {timeout:.0f} s"
        if guard:
            for p in procs:
                p.kill()
            break
        time.sleep(0.1)
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    results = []
    for (_, _, out), p in zip(targets, procs):
        f = Path(out)
        r = json.loads(f.read_text()) if f.exists() else {"error": guard or f"process exited with {p.exitcode} and no report"}
        results.append(r)
    print(f"  {label}: {wall:.1f} s wall, peak anonymous RSS of the group {peak_total / MB:.0f} MB" + (f" ({guard})" if guard else ""), flush=True)
    return results, wall, guard


def _same_file(a: Path, b: Path, chunk: int = 64 * MB) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def warm_page_cache(folder: Path) -> int:
    """Read every file once so that each group starts from the same (warm) page cache."""
    total = 0
    for p in sorted(folder.iterdir()):
        if p.is_file():
            with p.open("rb", buffering=0) as f:
                while chunk := f.read(64 * MB):
                    total += len(chunk)
    return total


def fmt_mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:,.0f}"


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "ep_load")
    ap.add_argument("--save", action="store_true", help="also time save_sharded(layout='original') and compare with the source")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint's pages before each group")
    ap.add_argument("--mem-limit-gb", type=float, default=None)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=None, help="append the results as one JSON line")
    return ap.parse_args()


def main() -> None:
    args = _parse_args()
    from automodel_convert.convert import api
    from automodel_convert.parallel.load import predict_read_bytes

    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mem_limit = int(args.mem_limit_gb * (1 << 30)) if args.mem_limit_gb else int(0.85 * mem_total)
    ckpt = args.work / f"qwen3-30b-a3b-shaped-{args.layers}l"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = not (ckpt / "model.safetensors.index.json").exists()
    build_checkpoint(ckpt, args.layers)
    if built:
        print(f"built {ckpt} in {time.perf_counter() - t0:.1f} s")
    os.sync()  # no write-back of a fresh build competing with the measured reads
    info = api.inspect(ckpt, ep=args.ranks)
    n = args.ranks
    predicted = predict_read_bytes(ckpt, n)
    target = info["expert_bytes"] / n + info["non_expert_bytes"]
    print(f"checkpoint: {ckpt} ({info['total_bytes'] / 1e9:.2f} GB, {info['tensors']} tensors, {info['files']} files), "
          f"experts {info['expert_bytes'] / 1e9:.2f} GB, non-expert {info['non_expert_bytes'] / 1e9:.2f} GB; {n} ranks; RAM {mem_total / 2**30:.1f} GiB")
    print(f"target bytes per rank = experts / {n} + non-expert = {fmt_mb(target)} MB; predicted (inspect --ep {n}): "
          + ", ".join(fmt_mb(r["bytes_read"]) for r in info["ep"]["ranks"]))
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    save_dst = runs / "saved" if args.save else None
    rows = _run_groups(args, ckpt, runs, mem_limit, save_dst)
    print()
    ok_bytes, ok_rss = _print_table(rows, info, target, predicted, n)
    print()
    print(f"bytes read per rank <= 1.05 x target and == inspect's prediction: {'PASS' if ok_bytes else 'FAIL'}")
    print(f"peak RSS per rank <= local shard bytes + 400 MB: {'PASS' if ok_rss else 'FAIL'}")
    _print_comparisons(rows, n)
    if args.save and all("save_s" in r for r in rows["ours_replicate"]["ranks"]):
        _print_save_check(rows["ours_replicate"]["ranks"], ckpt, save_dst)
    if args.out:
        with args.out.open("a") as fh:
            fh.write(json.dumps({"layers": args.layers, "ranks": n, "target_bytes": target, "predicted": predicted, "cold": args.cold, **rows}) + "\n")


def _run_groups(args: argparse.Namespace, ckpt: Path, runs: Path, mem_limit: int, save_dst: Path | None) -> dict[str, dict]:
    """Every loader as a group of processes, each from the same page-cache state (all evicted with --cold, else all
    re-read): ours with dense tensors replicated (the issue's target) and Shard(0) over dp (like transformers'
    FSDP), transformers v5 EP, and one process loading everything."""
    n, rows = args.ranks, {}

    def prepare_cache() -> None:
        if args.cold:
            drop_page_cache_for(ckpt)
        else:
            warm_page_cache(ckpt)

    for dense in ("replicate", "shard"):
        prepare_cache()
        init = f"file://{runs / f'store-{dense}'}"
        dst = str(save_dst) if save_dst and dense == "replicate" else None
        targets = [(ours_child, (r, n, init, str(ckpt), str(runs / f"ours-{dense}-{r}.json"), dst, dense), runs / f"ours-{dense}-{r}.json") for r in range(n)]
        res, wall, _ = run_group(f"load_sharded(dense={dense!r}), {n} ranks", targets, runs, mem_limit, args.timeout)
        rows[f"ours_{dense}"] = {"wall_s": wall, "ranks": res}
    if not args.skip_transformers:
        dc = {"ep_size": n, "fsdp_size": n}
        prepare_cache()
        port = 29500 + os.getpid() % 1000
        targets = [(hf_child, (r, n, port, str(ckpt), str(runs / f"hf-{r}.json"), dc), runs / f"hf-{r}.json") for r in range(n)]
        hf, hf_wall, _ = run_group(f"transformers from_pretrained(distributed_config=DistributedConfig({dc})), {n} ranks", targets, runs, mem_limit, args.timeout)
        rows["transformers_ep"] = {"wall_s": hf_wall, "ranks": hf}
    if not args.skip_full:
        prepare_cache()
        full, full_wall, _ = run_group("single process safetensors.torch.load_file of every shard", [(full_child, (str(ckpt), str(runs / "full.json")), runs / "full.json")], runs, mem_limit, args.timeout)
        rows["full"] = {"wall_s": full_wall, "ranks": full}
    return rows


def _print_table(rows: dict[str, dict], info: dict, target: float, predicted: list[int], n: int) -> tuple[bool, bool]:
    """The per-rank table; returns (bytes within 1.05x of the target and equal to the prediction, RSS within budget)."""
    hdr = f"{'loader':<16}{'rank':>5}{'read MB':>10}{'target MB':>11}{'ratio':>7}{'rchar MB':>10}{'local MB':>10}{'peak RSS MB':>13}{'budget MB':>11}{'load s':>8}{'proc s':>8}"
    print(hdr)
    print("-" * len(hdr))
    ok_bytes = ok_rss = True
    for key, label in (("ours_replicate", "load_sharded"), ("ours_shard", "ls dense=shard")):
        for r in rows[key]["ranks"]:
            if "error" in r:
                print(f"{label:<16}{r.get('rank', '?'):>5}  ERROR {r['error']}")
                ok_bytes = ok_rss = False
                continue
            # the dense=shard target: experts / n + this rank's Shard(0) rows of every dense tensor (about 1/n)
            tgt = target if key == "ours_replicate" else r["expert_bytes_read"] + info["non_expert_bytes"] / n
            ratio = r["bytes_read"] / tgt
            budget = r["local_bytes"] + 400 * MB
            if key == "ours_replicate":
                ok_bytes &= ratio <= 1.05 and r["bytes_read"] == predicted[r["rank"]]
            ok_rss &= r["peak_rss_load"] <= budget
            print(f"{label:<16}{r['rank']:>5}{fmt_mb(r['bytes_read']):>10}{fmt_mb(tgt):>11}{ratio:>7.3f}{fmt_mb(r['io'].get('rchar')):>10}"
                  f"{fmt_mb(r['local_bytes']):>10}{fmt_mb(r['peak_rss_load']):>13}{fmt_mb(budget):>11}{r['load_s']:>8.2f}{r['process_s']:>8.1f}")
    for key, label in (("transformers_ep", "transformers EP"), ("full", "full 1-process")):
        for r in rows.get(key, {}).get("ranks", []):
            if "error" in r:
                print(f"{label:<16}{r.get('rank', '?'):>5}  ERROR {r['error']}")
                continue
            print(f"{label:<16}{r['rank']:>5}{'(mmap)':>10}{'':>11}{'':>7}{fmt_mb(r['io'].get('rchar')):>10}"
                  f"{fmt_mb(r['local_bytes']):>10}{fmt_mb(r['peak_rss_load']):>13}{'':>11}{r['load_s']:>8.2f}{r['process_s']:>8.1f}")
    return ok_bytes, ok_rss


def _print_comparisons(rows: dict[str, dict], n: int) -> None:
    """Load time and peak RSS against transformers' EP loader and a single-process full load, where they ran."""
    ours = rows["ours_replicate"]["ranks"]
    ours_load = max((r.get("load_s", float("nan")) for r in ours), default=float("nan"))
    shard_load = max((r.get("load_s", float("nan")) for r in rows["ours_shard"]["ranks"]), default=float("nan"))
    hf_ranks = rows.get("transformers_ep", {}).get("ranks", [])
    if hf_ranks and all("error" not in r for r in hf_ranks):
        hf_load = max(r["load_s"] for r in hf_ranks)
        shard_rss = max(r.get("peak_rss_load", 0) for r in rows["ours_shard"]["ranks"])
        print(f"load time (slowest rank): transformers EP {hf_load:.2f} s; load_sharded dense=replicate {ours_load:.2f} s "
              f"(transformers / ours = {hf_load / ours_load:.2f}), dense=shard (the holdings of transformers' ep {n} x fsdp {n}) {shard_load:.2f} s "
              f"(transformers / ours = {hf_load / shard_load:.2f})")
        print(f"peak RSS (max rank): transformers EP {fmt_mb(max(r['peak_rss_load'] for r in hf_ranks))} MB; load_sharded "
              f"{fmt_mb(max(r['peak_rss_load'] for r in ours))} MB (dense=replicate), {fmt_mb(shard_rss)} MB (dense=shard)")
        print(f"transformers expert placement: {hf_ranks[0].get('expert_placement')}")
    elif hf_ranks:
        print(f"transformers EP load failed: {next(r['error'] for r in hf_ranks if 'error' in r)}")
    if "full" in rows and "error" not in rows["full"]["ranks"][0]:
        f = rows["full"]["ranks"][0]
        print(f"single-process full load: {f['load_s']:.2f} s, peak RSS {fmt_mb(f['peak_rss_load'])} MB")


def _print_save_check(ours: list[dict], ckpt: Path, save_dst: Path) -> None:
    """save_sharded(layout='original')'s output against the source checkpoint, file by file (then removed)."""
    names_same = sorted(p.name for p in save_dst.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    shards_same = all(_same_file(ckpt / p.name, p) for p in sorted(save_dst.glob("*.safetensors")))
    index = "model.safetensors.index.json"  # the bench's own builder writes it without a final newline
    index_same = json.loads((ckpt / index).read_text()) == json.loads((save_dst / index).read_text())
    print(f"save_sharded(layout='original'): {max(r['save_s'] for r in ours):.2f} s (slowest rank); same files {names_same}, "
          f"shards equal byte for byte {shards_same}, index equal {index_same}")
    shutil.rmtree(save_dst, ignore_errors=True)


if __name__ == "__main__":
    main()
