"""What a model load produces and whether it fits: per-layer quantizers and the memory check.

`LinearQuantizer` is the interface `checkpoint.load_model(quantize=...)` calls once per linear layer with the
memory-mapped weight (`for_layer(name)` first: a format may treat a layer apart, as int4 does the output head);
`IntQuantizer` builds `models.quantize`'s int8/int4 layers a piece of rows at a time (codes identical to quantizing
the whole matrix, each piece packed straight into its panels with vectorized torch ops), so no full-precision copy of
a layer, let alone of the model, exists.
`estimate_bytes` / `check_memory` compute, from the checkpoint's tensor shapes alone, the bytes the loaded model
(plus its KV cache) will hold and refuse with a remedy when that exceeds the free memory (`nomoat.util.memory`).
The check runs before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from nomoat.config.model import ModelConfig
from nomoat.kernels import hugepages
from nomoat.models.quantize import (
    DEFAULT_GROUP_SIZE,
    PANEL,
    Q4_BLOCK,
    Q4_CODE_BYTES,
    QuantizationError,
    QuantizedLinear,
    int8_panels,
    is_head,
    layer_mode,
    q4_panels,
    quantize_int8,
    quantize_q4_0,
)
from nomoat.models.quantize import MODES as INT_MODES
from nomoat.util.memory import available_bytes, check_fits

# Rows of a weight quantized at a time: a multiple of every block and group size used (64 NF4, 32 int4), so the
# pieces concatenate into exactly what the whole-matrix quantizer gives.
ROW_ALIGN = 64
# About this many bytes of fp32 per piece (the quantizers' temporaries are a few times that).
PIECE_BYTES = 4 * 2**20
# The loading peak above the loaded size that the memory check allows for.
LOAD_MARGIN = 1.1

Release = Callable[[torch.Tensor], None]
Shapes = Iterable[tuple[str, list[int]]]


def row_chunks(weight: torch.Tensor, release: Release | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """`(start_row, rows)` pieces of a (out, in) matrix, about `PIECE_BYTES` in fp32 each, released after use.

    `release` (a reader's page release) runs on each piece once the consumer is done with it, so quantizing a
    memory-mapped tensor never holds more than a piece of it, or of its fp32 temporaries, in memory.
    """
    out, k = weight.shape
    step = max(ROW_ALIGN, PIECE_BYTES // (4 * max(k, 1)) // ROW_ALIGN * ROW_ALIGN)
    for a in range(0, out, step):
        piece = weight[a : a + step]
        yield a, piece
        if release is not None:
            release(piece)


class LinearQuantizer:
    """Quantizes one linear layer's weight as it is read; `load_model(quantize=...)` calls it per layer.

    Subclasses set `mode` and implement `bytes_for(out, in)` (the layer's bytes in this format, for the memory
    check) and `quantize(weight, bias, dtype, release)` (the frozen layer; its bias, when `bias`, is left on the meta
    device in `dtype` for the loader to fill). `wants(name)` picks the layers: all, or all but the output head;
    `for_layer(name)` is the quantizer a wanted layer gets (this one, unless a subclass picks another).
    """

    mode = "none"

    def __init__(self, include_lm_head: bool = True) -> None:
        self.include_lm_head = include_lm_head

    def wants(self, name: str) -> bool:
        """Whether the linear layer at module path `name` is quantized."""
        return self.include_lm_head or not is_head(name)

    def for_layer(self, name: str) -> LinearQuantizer:
        """The quantizer of the linear layer at module path `name`: this one."""
        return self

    def bytes_for(self, out_features: int, in_features: int) -> int:
        """Bytes of one (out, in) layer in this format."""
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, bias: bool, dtype: torch.dtype, release: Release | None) -> nn.Module:
        """The frozen layer for `weight` (out, in), built on the CPU."""
        raise NotImplementedError


class IntQuantizer(LinearQuantizer):
    """`models.quantize`'s int8 (GGUF Q8_0 blocks) or int4 (GGUF Q4_0 blocks) layers, piece by piece.

    Layers get `quantize.layer_mode`'s format: under int4 the output head is int8 (`for_layer`), and so is a layer
    whose `in_features` is not a multiple of 32 (`layer_mode`).
    """

    def __init__(self, mode: str, group_size: int = DEFAULT_GROUP_SIZE, include_lm_head: bool = True) -> None:
        super().__init__(include_lm_head)
        if mode not in INT_MODES:
            raise QuantizationError(f"unknown quantization mode {mode!r}: expected int8 or int4 (nf4 for QLoRA)")
        self.mode, self.group_size = mode, group_size

    def for_layer(self, name: str) -> IntQuantizer:
        """This quantizer, or an int8 one for the layer at `name` where `quantize.layer_mode` says so (an int4 head)."""
        if layer_mode(name, self.mode) == self.mode:
            return self
        return IntQuantizer(layer_mode(name, self.mode), self.group_size, self.include_lm_head)

    def layer_mode(self, in_features: int) -> str:
        """int4 needs `in_features % 32 == 0`; other layers fall back to int8 (as `quantize_model`)."""
        return layer_mode("", self.mode, in_features, Q4_BLOCK)

    def bytes_for(self, out_features: int, in_features: int) -> int:
        """int8: 34 bytes per block of 32 (a last block may be shorter); int4: 18 (outputs padded to 64 in both)."""
        panels = -(-out_features // PANEL)
        if self.layer_mode(in_features) == "int8":  # panels of 64 outputs, fp16 block scales
            return panels * PANEL * (in_features + 2 * -(-in_features // Q4_BLOCK))
        return panels * in_features // Q4_BLOCK * (Q4_CODE_BYTES + 2 * PANEL)

    def quantize(self, weight: torch.Tensor, bias: bool, dtype: torch.dtype, release: Release | None) -> nn.Module:
        """A `QuantizedLinear` holding exactly the codes `QuantizedLinear.from_linear` gives."""
        n, k = weight.shape
        mode, g = self.layer_mode(k), self.group_size
        layer = QuantizedLinear(k, n, mode, g, bias=bias, dtype=dtype, device="meta")
        if mode == "int8":  # straight into the decode kernels' panels (P, in, 64): a piece's rows fill whole panels
            panels = hugepages.arena_empty((-(-n // PANEL), k, PANEL), torch.int8).zero_()  # streamed: huge pages
            scale = hugepages.arena_empty((panels.shape[0], -(-k // Q4_BLOCK), PANEL), torch.float16).zero_()
            for a, piece in row_chunks(weight, release):
                p0 = a // PANEL
                codes, d = int8_panels(*quantize_int8(piece), arena=False)  # plain temporaries, copied on
                panels[p0 : p0 + codes.shape[0]], scale[p0 : p0 + d.shape[0]] = codes, d
            layer.qweight, layer.scale = panels, scale
        else:  # Q4_0 panels (P, in / 32, 1152), a piece's rows filling whole panels
            shape = (-(-n // PANEL), k // Q4_BLOCK, Q4_CODE_BYTES + 2 * PANEL)
            panels = hugepages.arena_empty(shape, torch.uint8)  # streamed every decode step: huge pages
            for a, piece in row_chunks(weight, release):
                p0 = a // PANEL
                panels[p0 : p0 + -(-piece.shape[0] // PANEL)] = q4_panels(*quantize_q4_0(piece))
            layer.qweight = panels
        return layer


def quantizer_for(quantize: str | LinearQuantizer | None, include_lm_head: bool = True) -> LinearQuantizer | None:
    """The quantizer `load_model(quantize=...)` means: None, `"int8"`, `"int4"`, or a `LinearQuantizer` (e.g. NF4)."""
    if quantize is None or isinstance(quantize, LinearQuantizer):
        return quantize
    if quantize == "nf4":
        raise QuantizationError("nf4 is QLoRA's training format: load with nomoat.lora.nf4.load_model_nf4")
    return IntQuantizer(str(quantize), include_lm_head=include_lm_head)


# ---- memory -------------------------------------------------------------------------------------------------------


def estimate_bytes(shapes: Shapes, dtype: torch.dtype, quantizer: LinearQuantizer | None, tied: bool) -> int:
    """Bytes a model's weights take once loaded: `dtype` for all, linear layers in the quantizer's format.

    Args:
        shapes: `(name, shape)` of each checkpoint tensor (its header).
        dtype: The dtype unquantized tensors load in.
        quantizer: The format of the linear layers, or None.
        tied: The head shares the embeddings (a stored `lm_head.weight` is then skipped); quantizing the head gives
            it its own copy, counted here (in the head's format: `quantizer.for_layer("lm_head")`).
    """
    total = 0
    for name, shape in shapes:
        if tied and name == "lm_head.weight":
            continue
        embedding = name.endswith("embed_tokens.weight")
        linear = len(shape) == 2 and not embedding
        layer = name.removesuffix(".weight")
        if quantizer is not None and linear and quantizer.wants(layer):
            total += quantizer.for_layer(layer).bytes_for(shape[0], shape[1])
        else:
            total += torch.Size(shape).numel() * dtype.itemsize
        if quantizer is not None and tied and embedding and quantizer.wants("lm_head"):
            total += quantizer.for_layer("lm_head").bytes_for(shape[0], shape[1])
    return total


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype: torch.dtype, rows: int = 1) -> int:
    """Bytes of a KV cache holding `context` positions for `rows` sequences."""
    return 2 * cfg.num_layers * cfg.kv_size * context * rows * dtype.itemsize


def check_memory(
    name: str,
    shapes: Shapes,
    cfg: ModelConfig,
    dtype: torch.dtype,
    quantizer: LinearQuantizer | None,
    context: int | None = None,
) -> None:
    """Refuse a load whose weights (plus `LOAD_MARGIN`) and KV cache exceed the free memory, naming a remedy.

    The remedy is the first smaller format that would fit: bf16 for an fp32 load, then `--quantize int8`, `int4`.

    Raises:
        InsufficientMemoryError: it does not fit (`nomoat.util.memory.check_fits`, which also has the override).
    """
    free = available_bytes()
    shapes = list(shapes)
    kv = kv_cache_bytes(cfg, context, dtype) if context else 0

    def need(d: torch.dtype, q: LinearQuantizer | None) -> int:
        return int(LOAD_MARGIN * estimate_bytes(shapes, d, q, cfg.tie_word_embeddings)) + kv

    needed = need(dtype, quantizer)
    if free is None or needed <= free:
        return
    options: list[tuple[str, torch.dtype, LinearQuantizer | None]] = []
    if dtype == torch.float32 and quantizer is None:
        options.append(("--dtype bfloat16", torch.bfloat16, None))
    if quantizer is None:
        options.append(("--quantize int8", dtype, IntQuantizer("int8")))
    if quantizer is None or quantizer.mode == "int8":
        options.append(("--quantize int4", dtype, IntQuantizer("int4")))
    remedy = next((f"try {flag}" for flag, d, q in options if need(d, q) <= free), None)
    if remedy is None:
        remedy = "use a smaller model" + (" or a shorter context" if kv else "") + ": no format of this one fits"
    what = f"{name} in {str(dtype).removeprefix('torch.')}" + (f" ({quantizer.mode})" if quantizer else "")
    what += f" with a {context}-token KV cache" if context else ""
    check_fits(needed, what, remedy)
