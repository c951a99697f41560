"""GGUF Q8_0 weights kept as they are: int8 layers holding the file's own codes and fp16 block scales (nomoat's int8
format is Q8_0's), what loads by default on the CPU and with `quantize="int8"`.

References: the raw bytes of the file's blocks, the `gguf` package's (de)quantization (`gguf.quants`, llama.cpp's
own arithmetic), and nomoat's own float32 load of the same file (which transformers' GGUF loader matches,
tests/models/test_gguf_load.py).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_gguf_load import make
from torch import nn

from nomoat.models.checkpoint import load_model
from nomoat.models.gguf import open_gguf, read_q8
from nomoat.models.quantize import QuantizedLinear, quantize_int8

QT = gguf.GGMLQuantizationType


def _write(path: Path, w: np.ndarray) -> gguf.ReaderTensor:
    out = gguf.GGUFWriter(str(path), "llama")
    out.add_tensor("blk.0.attn_v.weight", gguf.quants.quantize(w, QT.Q8_0), raw_dtype=QT.Q8_0)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return open_gguf(path).tensors[0]


def test_q8_0_blocks_are_kept_bit_exact(tmp_path: Path) -> None:
    """`read_q8` + the int8 panels hold exactly the file's codes and fp16 scales (compared as raw bytes), and
    dequantize to what `gguf.quants.dequantize` makes of them; quantizing the same weight gives the same blocks, and
    so does quantizing the dequantized weight again (an export of the layer to Q8_0 reproduces the file)."""
    w = (torch.randn(100, 96, generator=torch.Generator().manual_seed(0)) * 0.05).numpy()  # 100: not whole panels
    tensor = _write(tmp_path / "t.gguf", w)
    raw = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(100, 3, 34))  # fp16 d, then 32 codes
    layer = QuantizedLinear.from_q8(*read_q8(tensor))
    assert layer.mode == "int8" and layer.int8_codes().shape == (100, 96)
    assert torch.equal(layer.int8_codes().view(torch.uint8), raw[:, :, 2:].reshape(100, 96))
    assert torch.equal(layer.int8_scales().view(torch.uint8).reshape(100, 3, 2), raw[:, :, :2])
    want = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, QT.Q8_0).reshape(100, 96)))
    assert torch.equal(layer.dequantize(), want)
    q, d = quantize_int8(torch.from_numpy(w))
    assert torch.equal(q, layer.int8_codes()) and torch.equal(
        d.view(torch.int16), layer.int8_scales().view(torch.int16)
    )
    again = gguf.quants.quantize(layer.dequantize().numpy(), QT.Q8_0)
    assert np.array_equal(
        np.asarray(again).view(np.uint8).reshape(-1), np.array(tensor.data).view(np.uint8).reshape(-1)
    )


def _int8_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.mode == "int8"}


@pytest.mark.parametrize("case", ["llama3", "gemma2"])
def test_default_and_int8_loads_keep_q8_0_blocks(tmp_path: Path, case: str) -> None:
    """Loaded with default options or `quantize="int8"`, every Q8_0 linear layer is int8 with the file's exact
    weights (no re-quantization); the logits follow the float32 load within the int8 rounding of activations the
    dot-product kernel applies (as the 4-bit test's bounds, cosine tighter)."""
    path = make(case, tmp_path, QT.Q8_0)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    fp32 = load_model(path, dtype="float32", device="cpu")
    assert not _int8_layers(fp32)  # a dtype asked for: every tensor dequantized
    reader = open_gguf(path)
    blocks = {t.name: t for t in reader.tensors if t.tensor_type == QT.Q8_0}
    assert blocks
    for kept in (load_model(path, device="cpu"), load_model(path, device="cpu", quantize="int8")):
        layers = _int8_layers(kept)
        projections = {n for n, m in fp32.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
        assert projections <= set(layers), projections - set(layers)
        for name, layer in layers.items():
            assert torch.equal(layer.dequantize(), fp32.get_submodule(name).weight.detach()), name
        v = layers["model.layers.0.self_attn.v_proj"]  # not permuted by llama.cpp's converter: its blocks as stored
        codes, d = read_q8(blocks["blk.0.attn_v.weight"])
        assert torch.equal(v.int8_codes(), codes) and torch.equal(
            v.int8_scales().view(torch.int16), d.view(torch.int16)
        )
        with torch.no_grad():
            got, want = kept(ids).float(), fp32(ids)
            rel = ((got - want).abs().max() / want.abs().max()).item()
            cos = F.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).min().item()
        assert rel < 0.05 and cos > 0.999, (rel, cos)  # measured: gemma2 0.023 and 0.99968, llama3 less
