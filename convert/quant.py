"""Quantized checkpoints: kept bit for bit by default, or dequantized while merging (`merge --dequantize bf16`).

Keeping: quantized tensors are plain tensors to the planner. Block-FP8 `weight_scale_inv` grids fuse as companions of
their expert groups (each source grid kept exact, also when I is not a multiple of the block), MXFP4 `*_blocks` /
`*_scales` are already fused per layer and pass through, and config.json (with `quantization_config`) is copied.

Dequantizing: `dequantize_plan(plan, ckpt, "bf16")` rewrites a merge plan so that
- block FP8 (DeepSeek-V3 / Kimi style, `quant_method: fp8`, `weight_block_size [bo, bi]`, default 128x128):
  every `X.weight` in float8 (F8_E4M3 / F8_E5M2) with a `X.weight_scale_inv [ceil(out/bo), ceil(in/bi)]` becomes
  `X.weight` in the target dtype, `w[i, j] = q[i, j] * scale_inv[i // bo, j // bi]` computed in float64 and cast once;
  expert groups are dequantized one expert at a time, each source part (gate, up, ...) with its own grid, then fused
  into the group's layout (fused or transposed). Non-expert linears (attention, dense and shared MLPs) too. The
  scale tensors are dropped.
- MXFP4 (GPT-OSS, `quant_method: mxfp4`): `X_blocks [E, out, in/32, 16]` + `X_scales [E, out, in/32]` become
  `X [E, in, out]` in the target dtype, one expert at a time: FP4 e2m1 values (element 2j in the low nibble, 2j+1
  in the high one) times `2 ** (scale - 127)`, transposed to the layout the model holds (gpt_oss `gate_up_proj
  [E, H, 2I]`, gate/up interleaved as on disk; `down_proj [E, I, H]`), as `transformers.integrations.mxfp4` does.
Each new piece is a `Transform` whose chain reads raw bytes (viewed as `uint8`) and returns the dequantized tensor,
so the streaming engine writes it like any other piece. `dequantized_config(config)` is config.json without its
`quantization_config`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint
from .errors import ConvertError
from .mapping import Layout
from .ops import Chain, Shape
from .plan import Copy, GroupInstance, OutTensor, Plan, Transform
from .safetensors_io import DTYPE_SIZES, torch_dtype

if TYPE_CHECKING:
    import torch

FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
TARGET_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "f16": "F16", "float16": "F16", "fp32": "F32", "f32": "F32", "float32": "F32"}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"


def target_dtype(name: str) -> str:
    if name.lower() not in TARGET_DTYPES:
        raise ConvertError(f"--dequantize {name!r} is not supported; use bf16 (or fp16, fp32)")
    return TARGET_DTYPES[name.lower()]


def _as_int(x: torch.Tensor, dtype: str, shape: Shape) -> torch.Tensor:
    from .ops import int_view_dtype

    return x.reshape(-1).view(int_view_dtype(DTYPE_SIZES[dtype])).reshape(shape)


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """float64 `q * scale_inv` per `block` (partial edge blocks use their grid cell), any leading dims."""
    import torch

    bo, bi = block
    out, inn = q.shape[-2], q.shape[-1]
    if scale_inv.shape[-2:] != (math.ceil(out / bo), math.ceil(inn / bi)):
        raise ConvertError(
            f"scale grid {list(scale_inv.shape)} does not fit a {list(q.shape)} weight with {bo}x{bi} blocks; check quantization_config.weight_block_size"
        )
    s = scale_inv.to(torch.float64).repeat_interleave(bo, dim=-2)[..., :out, :].repeat_interleave(bi, dim=-1)[..., :inn]
    return q.to(torch.float64) * s


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`[..., out, G, 16]` uint8 blocks + `[..., out, G]` e8m0 scales -> float32 `[..., out, G * 32]` (exact)."""
    import torch

    lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # element 2j from the low nibble, 2j+1 from the high one
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2)


@dataclass(frozen=True)
class FP8Dequant:
    """Chain-like: one expert's FP8 weight parts and scale grids (raw bytes) -> its dequantized slice.

    Inputs: the weight then the scale sources, each either one byte range per part (`decode is None`) or one
    expert slice of a fused tensor that `decode` (a bound Chain on integer views) splits into the parts.
    """

    part_shapes: tuple[Shape, ...]
    scale_shapes: tuple[Shape, ...]
    weight_dtype: str
    scale_dtype: str
    block: tuple[int, int]
    out_dtype: str
    encode: Chain | None  # the group's chain into the target layout (None: a single non-expert tensor)
    w_inputs: tuple[Shape, ...]  # shapes of the weight inputs as read (parts, or one fused expert slice)
    s_inputs: tuple[Shape, ...]
    w_decode: Chain | None = None
    s_decode: Chain | None = None

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        nw = len(self.w_inputs)
        w = [_as_int(x, self.weight_dtype, s) for x, s in zip(xs[:nw], self.w_inputs)]
        sc = [_as_int(x, self.scale_dtype, s) for x, s in zip(xs[nw:], self.s_inputs)]
        if self.w_decode is not None:
            w = self.w_decode.apply(w)
        if self.s_decode is not None:
            sc = self.s_decode.apply(sc)
        out_dtype = torch_dtype(self.out_dtype)
        parts = [
            dequantize_fp8_block(
                q.view(torch_dtype(self.weight_dtype)), s.view(torch_dtype(self.scale_dtype)), self.block
            ).to(out_dtype)
            for q, s in zip(w, sc)
        ]
        return self.encode.apply(parts) if self.encode is not None else parts


@dataclass(frozen=True)
class MXFP4Dequant:
    """Chain-like: one expert's MXFP4 blocks + scales (raw bytes) -> its `[in, out]` slice in `out_dtype`."""

    blocks_shape: Shape  # [out, G, 16]
    scales_shape: Shape  # [out, G]
    out_dtype: str

    def apply(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        blocks = xs[0].reshape(self.blocks_shape)
        scales = xs[1].reshape(self.scales_shape)
        w = dequantize_mxfp4(blocks, scales)  # [out, in]
        return [w.transpose(-1, -2).contiguous().to(torch_dtype(self.out_dtype))]


def _nbytes(shape: Shape, dtype: str) -> int:
    return math.prod(shape) * DTYPE_SIZES[dtype]


def quant_method(config: dict) -> str | None:
    for src in (config, config.get("text_config") or {}):
        q = src.get("quantization_config")
        if isinstance(q, dict) and q.get("quant_method"):
            return str(q["quant_method"])
    return None


def fp8_block(config: dict) -> tuple[int, int]:
    for src in (config, config.get("text_config") or {}):
        q = src.get("quantization_config")
        if isinstance(q, dict) and q.get("weight_block_size"):
            bo, bi = q["weight_block_size"]
            return int(bo), int(bi)
    return 128, 128


def dequantized_config(config: dict) -> dict:
    out = dict(config)
    out.pop("quantization_config", None)
    if isinstance(out.get("text_config"), dict) and "quantization_config" in out["text_config"]:
        out["text_config"] = {k: v for k, v in out["text_config"].items() if k != "quantization_config"}
    return out


def is_quantized(ckpt: Checkpoint) -> bool:
    return quant_method(ckpt.config) is not None or any(t.dtype in FP8_DTYPES for t in ckpt.tensors.values())


def dequantize_plan(plan: Plan, ckpt: Checkpoint, dtype: str = "bf16") -> Plan:
    """`plan` (a merge: model naming, fused or transposed target) with every quantized weight dequantized."""
    out_dtype = target_dtype(dtype)
    block = fp8_block(ckpt.config)
    by_name = {t.name: t for t in plan.outputs}
    inst_by_name = {gi.group.fused_template.format(**gi.captures): gi for gi in plan.instances}
    replaced: dict[str, OutTensor] = {}
    dropped: set[str] = set()

    for t in plan.outputs:
        if t.dtype in FP8_DTYPES:
            scale = by_name.get(_scale_name(t.name))
            if scale is None:
                raise ConvertError(
                    f"{t.name!r} is {t.dtype} without a block scale grid {_scale_name(t.name)!r}; only block FP8 (weight_scale_inv) can be dequantized"
                )
            gi = inst_by_name.get(t.name) if t.group is not None else None
            if gi is not None:
                replaced[t.name] = _fp8_group(t, gi, inst_by_name[_scale_name(t.name)], plan, block, out_dtype)
            else:
                replaced[t.name] = _fp8_single(t, scale, block, out_dtype)
            dropped.add(scale.name)
        elif t.name.endswith("_blocks") and t.dtype == "U8" and t.name[: -len("_blocks")] + "_scales" in by_name:
            scales = by_name[t.name[: -len("_blocks")] + "_scales"]
            replaced[t.name] = _mxfp4(t, scales, out_dtype)
            dropped.add(scales.name)

    outputs = [replaced.get(t.name, t) for t in plan.outputs if t.name not in dropped]
    new = Plan(plan.model_type, plan.mapping, plan.source_layout, plan.target_layout, outputs, plan.instances, plan.passthrough, list(plan.notes))
    if replaced:
        new.notes.append(
            f"dequantized {len(replaced)} tensors to {out_dtype} (dropped {len(dropped)} scale tensors and the quantization_config)"
        )
    else:
        new.notes.append("nothing to dequantize: the checkpoint holds no block-FP8 or MXFP4 tensors")
    return new


def _scale_name(weight_name: str) -> str:
    # `X.weight` -> `X.weight_scale_inv`; fused `...gate_up_proj` -> `...gate_up_proj_scale_inv` (the companion rule)
    return weight_name + SCALE_SUFFIX


def _source_pieces(t: OutTensor) -> list[Copy]:
    pieces = sorted(t.pieces, key=lambda p: p.dst)
    if not all(isinstance(p, Copy) for p in pieces):
        raise ConvertError(f"internal error: {t.name!r} is not a plain copy of its source")
    return pieces  # type: ignore[return-value]


def _fp8_single(t: OutTensor, scale: OutTensor, block: tuple[int, int], out_dtype: str) -> OutTensor:
    (w,) = _source_pieces(t)
    (s,) = _source_pieces(scale)
    if len(t.shape) != 2:
        raise ConvertError(f"{t.name!r}: block FP8 weights are 2-D, got {list(t.shape)}")
    chain = FP8Dequant((t.shape,), (scale.shape,), t.dtype, scale.dtype, block, out_dtype, None, (t.shape,), (scale.shape,))
    n = _nbytes(t.shape, out_dtype)
    piece = Transform(((w.key, w.src, w.n, (w.n,)), (s.key, s.src, s.n, (s.n,))), chain, 0, 1, 0, n, None)  # type: ignore[arg-type]
    return OutTensor(t.name, out_dtype, t.shape, [piece], t.group, t.fused, t.sources + scale.sources)


def _expert_inputs(gi: GroupInstance, e: int, src: Layout) -> tuple[list[tuple[str, int, int]], tuple[Shape, ...], Chain | None]:
    """Byte ranges of expert e's parts (per-expert source) or of its fused slice plus the chain that splits it."""
    isz = DTYPE_SIZES[gi.dtype]
    part_nbytes = [math.prod(s) * isz for s in gi.part_shapes]
    if gi.fused_key is None:
        return [(k, 0, n) for k, n in zip(gi.parts[e], part_nbytes)], tuple(gi.part_shapes), None
    layout = src if gi.group.stacked else Layout.FUSED
    enc = gi.group.chain(layout, gi.part_shapes)
    expert_shape = enc.out_shapes(gi.part_shapes)[0]
    total = sum(part_nbytes)
    return [(gi.fused_key, e * total, total)], (expert_shape,), enc.inverse()


def _fp8_group(t: OutTensor, gi: GroupInstance, si: GroupInstance, plan: Plan, block: tuple[int, int], out_dtype: str) -> OutTensor:
    g = gi.group
    target = plan.target_layout if g.stacked else Layout.FUSED
    encode = g.chain(target, gi.part_shapes)
    expert_shape = encode.out_shapes(gi.part_shapes)[0]
    n = _nbytes(expert_shape, out_dtype)
    pieces = []
    for e in range(gi.num_experts):
        w_rng, w_shapes, w_dec = _expert_inputs(gi, e, plan.source_layout)
        s_rng, s_shapes, s_dec = _expert_inputs(si, e, plan.source_layout)
        chain = FP8Dequant(
            tuple(gi.part_shapes), tuple(si.part_shapes), gi.dtype, si.dtype, block, out_dtype, encode, w_shapes, s_shapes, w_dec, s_dec
        )
        inputs = tuple((k, off, nb, (nb,)) for k, off, nb in (*w_rng, *s_rng))
        pieces.append(Transform(inputs, chain, 0, 1, e * n, n, e if g.stacked else None))  # type: ignore[arg-type]
    shape = (gi.num_experts, *expert_shape) if g.stacked else tuple(expert_shape)
    return OutTensor(t.name, out_dtype, shape, pieces, t.group, t.fused, t.sources)


def _mxfp4(blocks: OutTensor, scales: OutTensor, out_dtype: str) -> OutTensor:
    (b,) = _source_pieces(blocks)
    (s,) = _source_pieces(scales)
    if len(blocks.shape) not in (3, 4) or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise ConvertError(f"{blocks.name!r} {list(blocks.shape)} / {scales.name!r} {list(scales.shape)} are not MXFP4 blocks [..., out, G, 16] and scales [..., out, G]")
    stacked = len(blocks.shape) == 4
    E = blocks.shape[0] if stacked else 1
    bshape, sshape = tuple(blocks.shape[-3:]), tuple(scales.shape[-2:])
    out, groups = bshape[0], bshape[1]
    expert_shape = (groups * 32, out)
    bn, sn = math.prod(bshape), math.prod(sshape)
    n = _nbytes(expert_shape, out_dtype)
    chain = MXFP4Dequant(bshape, sshape, out_dtype)
    pieces = [
        Transform(((b.key, b.src + e * bn, bn, (bn,)), (s.key, s.src + e * sn, sn, (sn,))), chain, 0, 1, e * n, n, e if stacked else None)  # type: ignore[arg-type]
        for e in range(E)
    ]
    shape = (E, *expert_shape) if stacked else expert_shape
    return OutTensor(blocks.name[: -len("_blocks")], out_dtype, shape, pieces, blocks.group, blocks.fused, blocks.sources + scales.sources)
