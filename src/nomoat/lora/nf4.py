"""4-bit NormalFloat (NF4) weights for a frozen QLoRA base, in plain torch (any device).

`quantize_nf4` / `dequantize_nf4` convert tensors, `NF4Linear` is the frozen layer, `quantize_model_nf4` converts a
model's linear layers and `load_model_nf4` loads a checkpoint straight into NF4 (each layer quantized as it is
read, so the full-precision base never exists in memory).

Format (QLoRA paper, section 3, without its double quantization): each weight divided by the
absmax of its block of 64 consecutive weights maps to the nearest of the 16 `NF4_CODEBOOK` values (normal quantiles
in [-1, 1], with an exact zero); two codes per byte, one fp32 absmax per block. The adapter on top stays in full
precision. The frozen product runs in `NF4Linear.compute_dtype` (bitsandbytes' `compute_dtype`): in bf16 where the CPU
has fast bf16 products, the dequantized weight takes half the bytes, while the input, output, adapter and optimizer
stay fp32. No dequantized weight is kept: forward and backward (`NF4Linear.grad_input`) dequantize one tile
of at most `CHUNK_ELEMENTS` weights straight into the compute dtype, use it for one product and drop it. A bf16
tile on the CPU is decoded by the compiled `nomoat.kernels.ops.nf4_decode_bf16` (the same values as `_decode`),
into one buffer per thread that every product reuses: a fresh tile per product would leave holes of its size in the
heap between the activations a training step keeps, and the process would grow by about one tile per layer.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.kernels import hugepages, ops
from nomoat.models.checkpoint import load_model, read_hf_config, resolve_device, resolve_dtype
from nomoat.models.load_plan import LinearQuantizer, Release, row_chunks
from nomoat.models.transformer import Transformer

NF4_BLOCK_SIZE = 64
# The 16 NF4 values (QLoRA paper, appendix E; bitsandbytes `create_normal_map`), lowest code first.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# Weights dequantized per tile in `NF4Linear.forward` and `grad_input`: bounds the temporary dequantized matrix.
CHUNK_ELEMENTS = 1 << 22
_SCRATCH = threading.local()  # `cpu`: this thread's bf16 tile buffer for the compiled decode (`_scratch_tile`)


def nf4_codebook(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values as an fp32 tensor, lowest first."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def quantize_nf4(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a tensor to NF4 in blocks of `block_size` consecutive elements (row-major order).

    Args:
        weight: Any floating-point tensor whose element count is divisible by `block_size`.
        block_size: Elements per absmax block (even).

    Returns:
        `(packed, absmax)`: uint8 `(numel / 2,)` with element `2i` in the high nibble of byte `i` and `2i+1` in the
        low nibble (bitsandbytes' order), and fp32 `(numel / block_size,)` block absmax values.
    """
    n = weight.numel()
    if block_size % 2 or n % block_size:
        raise ValueError(f"NF4 needs an even block size dividing the element count; got {n} elements, {block_size}")
    blocks = weight.detach().float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    book = nf4_codebook(weight.device)
    # Nearest value: count the midpoints between neighbouring values that lie below (ties go to the upper value).
    codes = torch.bucketize(normed, (book[1:] + book[:-1]) / 2).to(torch.uint8).reshape(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.contiguous(), absmax.contiguous()


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    block_size: int = NF4_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The tensor of `shape` that NF4 `packed`/`absmax` stand for, in `dtype` (computed in fp32)."""
    if block_size % 4 or packed.numel() % 2:
        values = _pair_table(packed.device)[packed.long()].view(-1, block_size) * absmax[:, None]  # (blocks, block)
        return values.reshape(shape).to(dtype)
    values = _decode(packed.view(-1, block_size // 2), absmax.view(-1, 1), torch.float32, block_size)  # (blocks, bs)
    return values.reshape(shape).to(dtype)


def _decode(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, block_size: int) -> torch.Tensor:
    """Dequantize rows of codes: `packed` uint8 (R, C / 2) (any strides), `absmax` (R, C / block_size): (R, C).

    One table lookup per two bytes (four codes). fp32 gives exactly `codebook[code] * absmax`; a 2-byte `dtype`
    (the bf16 compute path) multiplies codebook value and absmax rounded to `dtype` (three roundings: within
    3 * 2^-8 of the exact value, far inside the quantization error).
    """
    rows, packed = packed.shape[0], packed.contiguous()
    if packed.device.type == "cpu":
        pairs = packed.view(torch.uint16).int().view(-1)  # (R * C / 4,): four codes each
    else:  # the same numbers from integer ops every backend has
        two = packed.view(-1, 2).int()
        pairs = (two[:, 0] | two[:, 1] << 8) if sys.byteorder == "little" else (two[:, 0] << 8 | two[:, 1])
    table = _quad_table(packed.device, dtype)
    if dtype.itemsize == 2:
        values = table.view(torch.int64).view(-1).index_select(0, pairs).view(dtype)  # (R * C,)
    else:
        values = table.index_select(0, pairs)  # (R * C / 4, 4)
    scale = absmax if dtype == torch.float32 else absmax.to(dtype)
    values = values.view(rows, -1, block_size).mul_(scale[:, :, None]).view(rows, -1)  # (R, C)
    return values if values.dtype == dtype else values.to(dtype)


_PAIR_TABLES: dict[torch.device, torch.Tensor] = {}
_QUAD_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: the two codebook values each byte holds (high nibble first)."""
    table = _PAIR_TABLES.get(device)
    if table is None:
        with torch.inference_mode(False):  # a normal tensor even when first made while generating
            book, byte = nf4_codebook(device), torch.arange(256, device=device)
            table = _PAIR_TABLES[device] = torch.stack([book[byte >> 4], book[byte & 15]], dim=1)
    return table


def _quad_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(65536, 4) `dtype`: the four codebook values two packed bytes hold, indexed by the bytes read as one uint16."""
    key = (device, dtype)
    table = _QUAD_TABLES.get(key)
    if table is None:
        with torch.inference_mode(False):
            pairs, v = _pair_table(device), torch.arange(1 << 16, device=device)
            first, second = (v & 255, v >> 8) if sys.byteorder == "little" else (v >> 8, v & 255)
            table = _QUAD_TABLES[key] = torch.cat([pairs[first], pairs[second]], dim=1).to(dtype).contiguous()
    return table


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights (QLoRA's base layer format).

    The product runs in `compute_dtype` (None: the input's dtype) and the output comes back in the input's dtype.

    The packed codes and block absmax values are buffers, so they follow `.to(device)` and appear in `state_dict`.
    The bias, if any, stays a full-precision parameter. `out_features * in_features` must be divisible by the block
    size (64 by default), which holds for every transformer projection.

    Args:
        in_features: Input width.
        out_features: Output width.
        bias: Whether the layer has a bias.
        block_size: Elements per absmax block.
        dtype: Dtype of the bias.
        device: Where to allocate.
        compute_dtype: Dtype of the product (None: the input's).
    """

    mode = "nf4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: int = NF4_BLOCK_SIZE,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        n = in_features * out_features
        if block_size % 2 or n % block_size:
            raise ValueError(f"NF4Linear: {out_features}x{in_features} weights do not split into {block_size}-blocks")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.zeros(n // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.ones(n // block_size, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = NF4_BLOCK_SIZE) -> NF4Linear:
        """Quantize a linear layer's weight to NF4 (the layer itself is left unchanged)."""
        w = linear.weight
        new = cls(w.shape[1], w.shape[0], linear.bias is not None, block_size, w.dtype, device="meta")
        with torch.no_grad():
            new.qweight, new.absmax = quantize_nf4(w, block_size)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return new

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these codes stand for, in `dtype`: the weight the layer's products use.

        fp32 is exactly `codebook[code] * absmax`; a 2-byte dtype is computed in that dtype (see `_decode`), as
        every tile the forward and backward passes use.
        """
        n, k = self.out_features, self.in_features
        if dtype.itemsize == 2 and not (k % self.block_size or self.block_size % 4):
            return self._tile(0, n, 0, k, dtype)
        return dequantize_nf4(self.qweight, self.absmax, (n, k), self.block_size, dtype)

    def _tile(self, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype, scratch: bool = False) -> torch.Tensor:
        """Dequantized weight tile `W[r0:r1, c0:c1]` in `dtype`: (r1 - r0, c1 - c0).

        Column bounds must be multiples of the block size when blocks lie within rows (`in % block == 0`). With
        `scratch`, a compiled bf16 tile is written into this thread's reused buffer: valid until the next scratch
        tile, so only for a product that uses it at once (never for a weight handed out).
        """
        n, k, bs = self.out_features, self.in_features, self.block_size
        if k % bs or bs % 4:
            return dequantize_nf4(self.qweight, self.absmax, (n, k), bs, dtype)[r0:r1, c0:c1]
        q = self.qweight.view(n, k // 2)[r0:r1, c0 // 2 : c1 // 2]  # (R, C / 2)
        a = self.absmax.view(n, k // bs)[r0:r1, c0 // bs : c1 // bs]  # (R, C / bs)
        if dtype == torch.bfloat16 and q.device.type == "cpu" and ops.available():
            if scratch:
                out = _scratch_tile(r1 - r0, c1 - c0)  # (R, C)
                return ops.nf4_decode_bf16_out(q, a, bs, out)
            return ops.nf4_decode_bf16(q, a, bs)  # the same values as `_decode`, compiled
        return _decode(q, a, dtype, bs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features), dequantizing at most `CHUNK_ELEMENTS` weights at a time.

        Under autograd (an input that requires grad) no tile is kept for the backward pass: `_NF4Matmul` decodes the
        weight again there (`grad_input`), as a QLoRA adapter's base product does.
        """
        cd = self.compute_dtype
        xc = x.to(cd) if cd is not None and cd != x.dtype else x
        if torch.is_grad_enabled() and xc.requires_grad:
            out = _NF4Matmul.apply(xc, self)  # (..., out), without the bias
            out = out if self.bias is None else out + self.bias.to(out.dtype)
        else:
            out = self._product(xc)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _product(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """`x @ W.T + b` (`x @ W.T` without `with_bias`) in `x`'s dtype, a tile of output rows at a time."""
        n, k = self.out_features, self.in_features
        bias = None if self.bias is None or not with_bias else self.bias.to(x.dtype)
        step = max(1, CHUNK_ELEMENTS // k)
        # A product autograd records keeps its weight for the input's gradient: that tile must be a tensor of its own.
        scratch = not (torch.is_grad_enabled() and x.requires_grad)
        if step >= n or k % self.block_size:
            return F.linear(x, self._tile(0, n, 0, k, x.dtype, scratch), bias)
        out = torch.cat([F.linear(x, self._tile(i, min(i + step, n), 0, k, x.dtype, scratch))
                         for i in range(0, n, step)], dim=-1)  # fmt: skip
        return out if bias is None else out + bias

    def grad_input(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad @ W` (..., in) for `grad` (..., out), in the compute dtype, a tile of input columns at a time.

        Each column tile's product is one output slice: no partial sums, nothing of the weight's size kept.
        """
        n, k, bs = self.out_features, self.in_features, self.block_size
        cd = self.compute_dtype or grad.dtype
        g = grad.to(cd)
        step = max(bs, CHUNK_ELEMENTS // n // bs * bs)
        scratch = not (torch.is_grad_enabled() and g.requires_grad)  # a double backward keeps its tiles
        if step >= k or k % bs:
            out = g @ self._tile(0, n, 0, k, cd, scratch)
        else:
            out = torch.cat([g @ self._tile(0, n, c, min(c + step, k), cd, scratch) for c in range(0, k, step)],
                            dim=-1)  # fmt: skip
        return out.to(grad.dtype)

    def extra_repr(self) -> str:
        """Shape and block size, for `print(model)`."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode=nf4, "
            f"block_size={self.block_size}, bias={self.bias is not None}"
            + ("" if self.compute_dtype is None else f", compute_dtype={self.compute_dtype}")
        )


class _NF4Matmul(torch.autograd.Function):
    """`x @ W.T` for a frozen `NF4Linear`, keeping only a reference to the layer for the backward pass.

    The backward pass decodes the weight again a tile at a time (`NF4Linear.grad_input`), so no decoded tile of the
    weight outlives the product that used it. The weight gets no gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        """(..., out) in `x`'s dtype, computed without recording (scratch tiles)."""
        ctx.layer = layer  # a module reference, not a saved tensor
        return layer._product(x, with_bias=False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """`grad @ W` (..., in), in the compute dtype."""
        return ctx.layer.grad_input(grad), None


def _scratch_tile(rows: int, cols: int) -> torch.Tensor:
    """This thread's bf16 tile buffer as a contiguous (rows, cols) tensor, grown (never shrunk) to fit."""
    buf = getattr(_SCRATCH, "cpu", None)
    if buf is None or buf.numel() < rows * cols:
        _SCRATCH.cpu = None  # the old buffer goes before the larger one is allocated
        with torch.inference_mode(False):  # a normal tensor even when first made while generating
            buf = _SCRATCH.cpu = torch.empty(rows * cols, dtype=torch.bfloat16)
    return buf[: rows * cols].view(rows, cols)


def quantize_model_nf4(
    model: nn.Module,
    include_lm_head: bool = False,
    block_size: int = NF4_BLOCK_SIZE,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` of `model` in place by an `NF4Linear` (a QLoRA base), under the same name.

    Args:
        model: Any module; changed in place. Attach LoRA adapters after quantizing (`inject_lora` wraps the NF4
            layers it targets).
        include_lm_head: Quantize the module named `lm_head` too (default False: QLoRA keeps the head in 16/32 bit).
        block_size: Elements per absmax block.
        compute_dtype: Dtype the frozen products run in (None: the input's).

    Returns:
        The same model, for chaining.
    """
    # Names, not modules: no list may keep a replaced layer (and its full-precision weight) alive until the end.
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or name.rsplit(".", 1)[-1] != "lm_head")
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = NF4Linear.from_linear(getattr(parent, child), block_size)
        layer.compute_dtype = compute_dtype
        setattr(parent, child, layer)
        hugepages.release_freed_memory()  # the replaced weight's memory goes back now, whatever malloc would keep
    return model


class NF4Quantizer(LinearQuantizer):
    """Builds `NF4Linear` layers while a checkpoint is read (`load_model(quantize=NF4Quantizer(...))`).

    Codes and absmax values are exactly those `NF4Linear.from_linear` computes for the whole weight.
    """

    mode = "nf4"

    def __init__(
        self, include_lm_head: bool = False, block_size: int = NF4_BLOCK_SIZE, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(include_lm_head)
        if 64 % block_size or block_size % 2:
            raise ValueError(f"NF4 block size must be even and divide 64 (the loader's row pieces), got {block_size}")
        self.block_size = block_size
        self.compute_dtype = compute_dtype

    def bytes_for(self, out_features: int, in_features: int) -> int:
        """Half a byte a weight plus one fp32 absmax per block."""
        n = out_features * in_features
        return n // 2 + 4 * (n // self.block_size)

    def quantize(self, weight: torch.Tensor, bias: bool, dtype: torch.dtype, release: Release | None) -> nn.Module:
        """An `NF4Linear` for `weight` (out, in), quantized a piece of rows at a time."""
        n, k = weight.shape
        layer = NF4Linear(k, n, bias, self.block_size, dtype, "meta", self.compute_dtype)
        packed = torch.empty(n * k // 2, dtype=torch.uint8)
        absmax = torch.empty(n * k // self.block_size, dtype=torch.float32)
        for a, piece in row_chunks(weight, release):
            lo, hi = a * k, (a + piece.shape[0]) * k
            packed[lo // 2 : hi // 2], absmax[lo // self.block_size : hi // self.block_size] = quantize_nf4(
                piece, self.block_size
            )
        layer.qweight, layer.absmax = packed, absmax
        return layer


def nf4_compute_dtype(hf: dict[str, Any], device: torch.device | str = "cpu") -> torch.dtype | None:
    """The frozen products' dtype for a checkpoint: bf16 where `dtype="auto"` would load it in bf16, else None.

    That is a half-precision checkpoint on a CPU with fast bf16 (or CUDA); None means the input's dtype.
    `NOMOAT_NF4_COMPUTE=float32` forces None.
    """
    if os.environ.get("NOMOAT_NF4_COMPUTE", "") in ("float32", "fp32"):
        return None
    return torch.bfloat16 if resolve_dtype("auto", resolve_device(device), hf) == torch.bfloat16 else None


def load_model_nf4(
    path: str | os.PathLike,
    dtype: Any = torch.float32,
    device: Any = "auto",
    compute_dtype: torch.dtype | str | None = "auto",
    include_lm_head: bool = False,
) -> Transformer:
    """Load a checkpoint as a QLoRA base: every linear layer (but the head) NF4, quantized as it is read.

    Args:
        path: A model folder (or GGUF file) `load_model` accepts.
        dtype: Dtype of what stays unquantized (embeddings, norms, head, biases).
        device: Where the model goes.
        compute_dtype: Dtype of the frozen products: `"auto"` (`nf4_compute_dtype`), a dtype, or None (the input's).
        include_lm_head: Quantize the output head too.
    """
    if compute_dtype == "auto":
        compute_dtype = nf4_compute_dtype(read_hf_config(path), device)
    quantizer = NF4Quantizer(include_lm_head, compute_dtype=compute_dtype)  # type: ignore[arg-type]
    return load_model(path, dtype=dtype, device=device, quantize=quantizer)
