"""`automodel-convert`: thin typer commands over `automodel_convert.convert`.

    automodel-convert merge SRC DST      # hub id or folder -> fused checkpoint (transformers v5 layout)
    automodel-convert split SRC DST      # fused -> the original per-expert layout
    automodel-convert verify SRC         # there and back in a bounded-memory stream, compared bit for bit
    automodel-convert inspect SRC        # model type, layout, plan, bytes per EP rank (--ep N)
    automodel-convert list               # registered model types

Exit codes: 0 ok, 1 verification mismatch, 2 bad input or usage (one line on stderr; `--debug` adds the traceback).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Annotated

try:  # Ctrl-C while the heavy imports run: one line, not an 18-line traceback
    import typer
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Table

    from .convert import api
    from .convert.destination import COMMITTED, sigterm_interrupts
    from .convert.errors import ConvertError
except KeyboardInterrupt:
    sys.stderr.write("interrupted while starting: nothing was written\n")
    sys.exit(130)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Reversible conversion of MoE checkpoints between per-expert and fused layouts.",
)
out = Console()
err = Console(stderr=True)

Src = Annotated[str, typer.Argument(help="checkpoint folder or hub repo id (owner/name)")]
Dst = Annotated[str, typer.Argument(help="output folder (created atomically)")]
ModelType = Annotated[
    str | None,
    typer.Option(
        "--model-type", help="override config.json's model_type (e.g. a remote-code wrapper of a known model)"
    ),
]
Revision = Annotated[str | None, typer.Option("--revision", help="hub revision (branch, tag or commit)")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the plan, write nothing")]
MaxShard = Annotated[str, typer.Option("--max-shard-size", help="largest output shard, e.g. 5GB, 500MB, 2GiB")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="replace DST if it is a checkpoint folder (atomically)")]
Force = Annotated[
    bool, typer.Option("--force", help="with --overwrite: replace DST even if it is not a checkpoint folder")
]
SourceLayout = Annotated[
    str | None,
    typer.Option(
        "--source-layout",
        help="how an already-fused SRC is oriented: fused ([E, 2I, H]) or transposed ([E, H, 2I]); needed when 2I == H or I == H",
    ),
]
Workers = Annotated[int, typer.Option("--workers", min=1, max=64, help="parallel I/O threads")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or summary")]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks")]


def _progress_factory(quiet: bool, label: str):
    if quiet:
        return None, None
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )

    def factory(total_bytes: int, _n: int):
        task = prog.add_task(label, total=total_bytes)
        return lambda n: prog.update(task, advance=n)

    return prog, factory


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _plan_table(res: api.ConvertResult) -> Table:
    t = Table(title=f"plan: {res.command} {res.model_type} ({res.source_layout} -> {res.target_layout})")
    t.add_column("output tensor (per layer)", overflow="fold")
    t.add_column("from", overflow="fold")
    t.add_column("layers", justify="right")
    t.add_column("experts", justify="right")
    t.add_column("shape")
    seen: dict[str, list] = {}
    for gi in res.plan.instances:
        short = [p.replace("{prefix}", "") for p in (gi.group.fused, *gi.group.parts)]
        row = seen.setdefault(gi.group.fused, [short[0], " + ".join(short[1:]), 0, gi.num_experts, gi])
        row[2] += 1
    for fused, parts, n, e, _gi in seen.values():
        shape = next(
            (list(o.shape) for o in res.plan.outputs if o.group == fused or _gi.group.fused_template.match(o.name)), []
        )
        t.add_row(fused, parts, str(n), str(e), str(shape))
    t.add_row("(pass-through)", "keys no group matches", "", "", f"{len(res.plan.passthrough)} tensors")
    return t


def _summary(res: api.ConvertResult) -> Table:
    t = Table(title=f"{res.command}: {'plan only (dry run)' if res.dry_run else 'done'}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model type", res.model_type)
    t.add_row("layout", f"{res.source_layout} -> {res.target_layout}")
    t.add_row("source", res.src)
    t.add_row("destination", res.dst or "")
    t.add_row("tensors", f"{res.tensors_in} -> {res.tensors_out}")
    t.add_row(
        "shards",
        f"{len(res.files_out)} ({res.files_out[0] if res.files_out else ''}{' ...' if len(res.files_out) > 1 else ''})",
    )
    t.add_row("bytes", _human(res.bytes_out))
    if not res.dry_run:
        t.add_row("time", f"{res.seconds:.2f} s ({_human(res.bytes_out / max(res.seconds, 1e-9))}/s)")
    for note in res.notes:
        t.add_row("note", note)
    return t


def _convert(cmd: str, *, quiet: bool, dry_run: bool, debug: bool, **kwargs) -> None:
    """Run `api.merge` / `api.split` with a command's own arguments (`**locals()` of the command: its options are
    the api's keyword arguments, plus quiet, dry_run and debug, which `main` reads from argv)."""
    prog, factory = _progress_factory(quiet or dry_run, cmd)
    fn = api.merge if cmd == "merge" else api.split
    if prog is not None:
        with prog:
            res = fn(progress=factory, dry_run=dry_run, **kwargs)
    else:
        res = fn(dry_run=dry_run, **kwargs)
    if dry_run:
        out.print(_plan_table(res))
        files = Table(title="output shards")
        files.add_column("file")
        files.add_column("tensors", justify="right")
        files.add_column("bytes", justify="right")
        for f in res.file_layout.files:
            files.add_row(f.name, str(len(f.tensors)), _human(f.nbytes))
        out.print(files)
    if not quiet:
        out.print(_summary(res))


@app.command()
def merge(
    src: Src,
    dst: Dst,
    layout: Annotated[
        str,
        typer.Option(
            "--layout", help="fused layout: fused ([E, 2I, H], transformers v5; alias hf) or transposed ([E, H, 2I], x @ W)"
        ),
    ] = "fused",
    model_type: ModelType = None,
    revision: Revision = None,
    dry_run: DryRun = False,
    max_shard_size: MaxShard = "5GB",
    overwrite: Overwrite = False,
    workers: Workers = 4,
    dequantize: Annotated[
        str | None,
        typer.Option(
            "--dequantize",
            help="write block-FP8 / MXFP4 weights dequantized to this dtype (bf16); drops the scales and quantization_config",
        ),
    ] = None,
    force: Force = False,
    source_layout: SourceLayout = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fuse per-expert tensors into transformers v5's fused layout."""
    _convert("merge", **locals())


@app.command()
def split(
    src: Src,
    dst: Dst,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout",
            help="target: per_expert, fused (alias hf) or transposed (default: the recorded original, else the hub layout)",
        ),
    ] = None,
    model_type: ModelType = None,
    revision: Revision = None,
    dry_run: DryRun = False,
    max_shard_size: MaxShard = "5GB",
    overwrite: Overwrite = False,
    workers: Workers = 4,
    force: Force = False,
    source_layout: SourceLayout = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Split fused tensors back into the original (per-expert) layout."""
    _convert("split", **locals())


@app.command()
def verify(
    src: Src,
    model_type: ModelType = None,
    revision: Revision = None,
    source_layout: SourceLayout = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Convert there and back in a bounded-memory stream and compare with the source bit for bit; on a merged
    checkpoint also check every original tensor against the checksums merge recorded (exit 1 on mismatch)."""
    prog, factory = _progress_factory(quiet, "verify")
    if prog is not None:
        with prog:
            res = api.verify(
                src, model_type=model_type, revision=revision, progress=factory, source_layout=source_layout
            )
    else:
        res = api.verify(src, model_type=model_type, revision=revision, source_layout=source_layout)
    if not quiet:
        t = Table(title=f"verify: {'OK, bit-exact' if res.ok else 'MISMATCH'}", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        t.add_row("model type", res.model_type)
        t.add_row("round trip", f"{res.source_layout} -> {res.via_layout} -> {res.source_layout}")
        t.add_row("tensors", str(res.tensors))
        t.add_row("bytes compared", _human(res.bytes_compared))
        if res.checksums_checked:
            t.add_row(
                "checksums",
                f"{res.checksums_checked} original tensors rebuilt and checked against the {res.checksum_algorithm} checksums recorded at merge",
            )
        t.add_row("time", f"{res.seconds:.2f} s")
        for m in res.mismatches[:20]:
            t.add_row("mismatch", m)
        out.print(t)
    if not res.ok:
        if quiet:
            err.print(f"verify: {len(res.mismatches)} mismatch(es), first: {res.mismatches[0]}", highlight=False)
        raise typer.Exit(1)


@app.command()
def inspect(
    src: Src,
    model_type: ModelType = None,
    revision: Revision = None,
    ep: Annotated[
        int | None, typer.Option("--ep", min=1, help="show the experts and bytes each of N expert-parallel ranks reads")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="from config.json and model.safetensors.index.json alone (no weight files): list every key that would not map; exit 1 if any",
        ),
    ] = False,
    source_layout: SourceLayout = None,
    debug: Debug = False,
) -> None:
    """Model type, detected layout, conversion plan and (with --ep) bytes per EP rank."""
    if dry_run:
        _inspect_dry_run(src, model_type, revision, as_json)
        return
    info = api.inspect(src, model_type=model_type, revision=revision, ep=ep, source_layout=source_layout)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(_inspect_summary(info))
    out.print(_inspect_groups(info))
    if "ep" in info:
        out.print(_inspect_ep_ranks(info))


def _inspect_summary(info: dict) -> Table:
    """The checkpoint table: type, layout, files, tensors, bytes, plan notes."""
    t = Table(title=f"{info['model_type']} checkpoint", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k in ("source", "model_type", "family", "layout", "hub_layout", "quantization", "files", "tensors"):
        t.add_row(k, str(info[k]))
    t.add_row("bytes", f"{_human(info['total_bytes'])} ({_human(info['expert_bytes'])} experts)")
    t.add_row("pass-through tensors", str(info["passthrough"]))
    for note in info["plan"]["notes"]:
        t.add_row("note", note)
    return t


def _inspect_groups(info: dict) -> Table:
    """One row per expert group: fused key, its per-expert parts, layers, experts, part shape, dtype."""
    g = Table(title="expert groups")
    for c in ("fused key", "per-expert parts", "layers", "experts", "part shape", "dtype"):
        g.add_column(c, overflow="fold")
    for grp in info["groups"]:
        g.add_row(
            grp["fused"].replace("{prefix}", ""),
            "\n".join(p.replace("{prefix}", "") for p in grp["parts"]),
            str(grp["instances"]),
            str(grp["experts"]),
            str(grp["part_shapes"][0]),
            grp["dtype"],
        )
    return g


def _inspect_ep_ranks(info: dict) -> Table:
    """One row per expert-parallel rank (--ep): its experts and the bytes it reads."""
    r = Table(title=f"expert parallel, ep={info['ep']['size']} (Shard(0) rule: first ranks get ceil(E/ep))")
    for c in ("rank", "experts", "expert bytes", "non-expert bytes", "bytes read"):
        r.add_column(c, justify="right")
    for row in info["ep"]["ranks"]:
        ex = f"{row['experts'][0]}-{row['experts'][1]}" if row["experts"] else "none"
        r.add_row(
            str(row["rank"]),
            ex,
            _human(row["expert_bytes"]),
            _human(row["non_expert_bytes"]),
            _human(row["bytes_read"]),
        )
    return r


def _inspect_dry_run(src: str, model_type: str | None, revision: str | None, as_json: bool) -> None:
    info = api.inspect(src, model_type=model_type, revision=revision, dry_run=True)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        t = Table(title=f"{info['model_type']} checkpoint (dry run: config and index only)", show_header=False)
        t.add_column(style="bold")
        t.add_column()
        for k in ("source", "model_type", "family", "layout", "hub_layout", "quantization", "tensors"):
            t.add_row(k, str(info[k]))
        t.add_row("pass-through tensors", f"{info['passthrough']} ({info['renamed']} renamed)")
        t.add_row("other expert tensors", str(info["expert_tensors"]))
        t.add_row(
            "coverage",
            "complete: every key maps"
            if info["complete"]
            else f"{len(info['unmapped'])} unmapped keys, {len(info['problems'])} problems",
        )
        out.print(t)
        if info["groups"]:
            g = Table(title="expert groups (key coverage)")
            for c in ("fused key", "per-expert parts", "layers", "experts", "keys"):
                g.add_column(c, overflow="fold")
            for grp in info["groups"]:
                g.add_row(
                    grp["fused"].replace("{prefix}", ""),
                    "\n".join(p.replace("{prefix}", "") for p in grp["parts"]),
                    str(grp["instances"]),
                    str(grp["experts"]),
                    str(grp["keys"]),
                )
            out.print(g)
        for key in info["unmapped"]:
            out.print(f"unmapped: {key}", highlight=False, soft_wrap=True)
        for problem in info["problems"]:
            out.print(f"problem: {problem}", highlight=False, soft_wrap=True)
    if not info["complete"]:
        if as_json:
            err.print(
                f"inspect --dry-run: {len(info['unmapped'])} unmapped keys, {len(info['problems'])} problems",
                highlight=False,
            )
        raise typer.Exit(1)


@app.command("list")
def list_types(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Registered model types and their layouts."""
    from .convert.catalog import catalog_rows, render_table

    rows = catalog_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        out.print(render_table(rows, out.width))


def _interrupted() -> int:
    """The truthful message for Ctrl-C / SIGTERM: the final rename may already have happened."""
    if COMMITTED:
        err.print(
            f"interrupted after the final rename: {COMMITTED[-1]} is complete (the conversion finished)",
            highlight=False,
            soft_wrap=True,
        )
    else:
        err.print("interrupted: nothing was written (the destination is absent or unchanged)", highlight=False)
    return 130


def _usage_error(e: Exception) -> int:
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    err.print(f"error: {' '.join(message.split())} (see --help)", highlight=False, soft_wrap=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with sigterm_interrupts():  # SIGTERM anywhere: the same clean exit 130 as Ctrl-C
            rc = app(args=argv, prog_name="automodel-convert", standalone_mode=False)
        if rc == 130:  # typer turns KeyboardInterrupt / SIGTERM into exit code 130 in non-standalone mode
            return _interrupted()
        return rc if isinstance(rc, int) else 0
    except ConvertError as e:
        if debug:
            traceback.print_exc()
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:  # usage errors (typer's bundled click) and anything unexpected
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            return _usage_error(e)
        if type(e).__name__ == "Abort":
            return _interrupted()
        if debug:
            raise
        err.print(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and report it)",
            highlight=False,
            soft_wrap=True,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())


def console_main() -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # a second Ctrl-C while the first is being reported
        sys.exit(130)
