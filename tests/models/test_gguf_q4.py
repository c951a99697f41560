"""GGUF Q4_0 / Q4_1 weights kept as they are: int4 layers holding the file's own blocks, what loads by default.

References: the `gguf` package's dequantization (`gguf.quants`, exact), nomoat's own float32 load of the same file
(which transformers' GGUF loader matches, tests/models/test_gguf_load.py), and `QuantizedLinear`'s reference.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_gguf_load import hf_gguf_logits, make
from torch import nn

from nomoat import kernels
from nomoat.kernels.reference import quantize_activations
from nomoat.models.checkpoint import load_model
from nomoat.models.gguf import open_gguf, read_q4
from nomoat.models.quantize import QuantizedLinear

QT = gguf.GGMLQuantizationType
CASES = [("llama_tied_mqa", QT.Q4_0), ("mistral", QT.Q4_1), ("phi3", QT.Q4_0)]


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_blocks_read_exactly(tmp_path: Path, qtype: QT) -> None:
    """`read_q4` + the 4-bit panels give back exactly what `gguf.quants.dequantize` makes of the file's blocks."""
    w = torch.randn(100, 96, generator=torch.Generator().manual_seed(0)).numpy() * 0.05  # 96: not a multiple of 256
    out = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    out.add_tensor("blk.0.attn_v.weight", gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    tensor = open_gguf(tmp_path / "t.gguf").tensors[0]
    layer = QuantizedLinear.from_q4(*read_q4(tensor))
    want = gguf.quants.dequantize(tensor.data, qtype).reshape(100, 96)
    assert layer.int4_format == qtype.name.lower()
    assert torch.equal(layer.dequantize(), torch.from_numpy(np.ascontiguousarray(want)))


def _int4_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.mode == "int4"}


@pytest.mark.parametrize(("case", "qtype"), CASES, ids=[f"{c}-{q.name}" for c, q in CASES])
def test_default_load_keeps_q4_blocks(tmp_path: Path, case: str, qtype: QT) -> None:
    """Loaded with default options, every Q4 linear layer is int4 with the file's exact weights; the logits follow
    the float32 load (and so transformers) within the int8 rounding of activations the 4-bit kernel applies."""
    path = make(case, tmp_path, qtype)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    fp32 = load_model(path, dtype="float32", device="cpu")
    assert not _int4_layers(fp32)  # a dtype asked for: every tensor dequantized
    kept = load_model(path, device="cpu")
    layers = _int4_layers(kept)
    projections = {n for n, m in fp32.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert projections <= set(layers), projections - set(layers)
    assert {m.int4_format for m in layers.values()} == {qtype.name.lower()}
    for name, layer in layers.items():
        assert torch.equal(layer.dequantize(), fp32.get_submodule(name).weight.detach()), name
        if layer.bias is not None:
            torch.testing.assert_close(layer.bias.float(), fp32.get_submodule(name).bias.detach())
    assert set(_int4_layers(load_model(path, device="cpu", quantize="int4"))) >= set(layers)
    with torch.no_grad():
        got, want = kept(ids).float(), fp32(ids)
        rel = ((got - want).abs().max() / want.abs().max()).item()
        cos = F.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).min().item()
    assert rel < 0.05 and cos > 0.995, (rel, cos)
    if qtype == QT.Q4_0 and case == "llama_tied_mqa":
        torch.testing.assert_close(want, hf_gguf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_int4_layer_output_is_the_dequantized_product(tmp_path: Path) -> None:
    """A kept layer computes `round_int8(x) @ W.T` with W the file's weights (the kernel's documented arithmetic)."""
    path = make("mistral", tmp_path, QT.Q4_1)
    layer = load_model(path, device="cpu").get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = layer(x)
    rounded = quantize_activations(x) if kernels.available() else x  # the kernel rounds activations to int8
    want = F.linear(rounded, layer.dequantize())
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
