"""Our header writer equals the Rust safetensors writer byte for byte; the reader validates without reading data."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from automodel_convert.convert.safetensors_io import encode_header, read_header


def test_header_bytes_equal_safetensors_writer(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5).to(torch.bfloat16),
        "a.bias": torch.randn(7),
        "z.fp8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "m.idx": torch.arange(6, dtype=torch.int64),
        "ü.ünicode": torch.zeros(2, dtype=torch.float16),
    }
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    h = read_header(path)
    entries = [(t.name, t.dtype, t.shape) for t in h.tensors]
    header, offsets = encode_header(entries, h.metadata)
    raw = path.read_bytes()
    assert raw[: len(header)] == header
    assert [t.start - h.data_start for t in h.tensors] == offsets
    for t in h.tensors:
        assert t.nbytes == tensors[t.name].numel() * tensors[t.name].element_size()
