"""Weight-only int8 / int4 quantization of a model's linear layers, for decoding in less memory and time.

`quantize_model(model, "int8" | "int4")` replaces every `nn.Linear` of a model, in place and under the same module
path (`model.layers.0.self_attn.q_proj` still names it), by a `QuantizedLinear` that stores integer weights; outputs
come back in the input's dtype. `weight_bytes(model)` counts weight bytes; `model.quantization` records the bytes
before and after.

Formats (each held once, in the compiled kernels' panel layout, `nomoat.kernels.layout`):
    int8: GGUF Q8_0's blocks: symmetric, an fp16 scale per block of 32 consecutive *input* channels of each output
        channel, `w[n, k] = d[n, k // 32] * q[n, k]`, `q` in [-127, 127], `d = absmax / 127` (llama.cpp's rounding):
        `qweight` (P, in, 64) int8 panels of 64 output channels, k-major, and `scale` (P, ceil(in / 32), 64) fp16
        (`kernels.pack_int8`). `int8_codes()` / `int8_scales()` give the plain (out, in) codes and (out, in / 32)
        scales back. 1.0625 bytes per weight (+ the padding to 64 channels). GGUF files' Q8_0 tensors load into it
        unchanged (`from_q8`); any `in_features` works (a last block of fewer than 32 channels has its own scale).
    int4: GGUF's 4-bit blocks of 32 consecutive *input* channels, an fp16 scale `d` per block: Q4_0 (what
        quantizing gives, with llama.cpp's own rounding: `w = d * (code - 8)`, 0.5625 bytes per weight) or Q4_1
        (`w = d * code + m`, with an fp16 minimum `m`, 0.625 bytes per weight; what a GGUF Q4_1 tensor keeps):
        `qweight` (P, in / 32, 1152 or 1280) uint8 panels (`kernels.pack_q4`). GGUF files' Q4_0 / Q4_1 tensors
        load into it unchanged (`from_q4`). `in_features % 32 == 0` is required (`quantize_model` falls back to
        int8 for a layer where it is not, and logs it); `group_size` is 32, GGUF's block.

Kernels (computing in fp32 for fp32 and bf16 models):
    CPU with the compiled kernels, any number of rows: `kernels.linear_int8` / `kernels.linear_q4` on the panels,
        the ops the decode model runs too (`nomoat.inference.prepare` shares these panels: the codes exist once).
        `linear_q4` rounds each activation row to int8 per block of 32 channels (as llama.cpp does for Q4_0) and
        computes the blocks' dot products on integers (AVX-512-VNNI, AVX-512BW or AVX2); so does `linear_int8`
        where the CPU has AVX-512-VNNI (to 16-bit codes per block of 32; `kernels.int8_dot`), else fp32 activations.
    Without the kernels, on CUDA or any other device: dequantize-then-matmul, in chunks of at most `CHUNK_ELEMENTS`
        weights so the temporary stays in cache (and small on a GPU); activations are not rounded there.
    With gradients (an input that requires grad, e.g. LoRA training over a quantized base): the weight is
        dequantized (whole, or in chunks inside QLoRA's own autograd function) and multiplied in floating point, so
        the forward is the exact product its backward differentiates; quantized weights never train.
Rejected after measuring (torch 2.13 CPU build, AMD EPYC, 2 threads):
    `aten._weight_int8pack_mm`: scalar code for fp32 and fp16 activations (0.5-0.6x the speed of fp32 `F.linear`
        over the 210 matrices, 4-12x slower on cache-resident ones); fast only for bf16 activations on an AVX-512
        build (under AVX2 its bf16 path is scalar too).
    `aten._weight_int4pack_mm_for_cpu`: likewise scalar for fp32 (0.3x the speed of fp32 `F.linear`).
    torchao 0.18: `Int8WeightOnlyConfig` dequantizes the whole weight then calls `mm` on every call, and
        `Int4WeightOnlyConfig` needs GPU kernel packages even on CPU. Not used.
    fbgemm's 4-bit embedding bags (groups along output channels): per-row overhead held int4 decode below fp32.

The output head (the layer named `lm_head`) under int4 is quantized to int8 (Q8_0 blocks), not to 4 bits: the head
decides every next-token distribution, and 4-bit codes there cost more quality than in any other layer, so llama.cpp's
q4_0 keeps its output matrix at higher precision too (q8_0 or q6_k). `layer_mode` is the one rule, which loading
(`load_plan.IntQuantizer`) and the decode model's own quantization follow too; GGUF tensors already stored as Q4
keep their blocks. A tied output head (`lm_head.weight is model.embed_tokens.weight`): the embedding keeps its
full-precision matrix (lookups are unchanged) and the head gets its own int8 copy, `vocab * hidden` bytes more, while
the head's per-token read drops 4x: for SmolLM2-135M the head is 21% of fp32's per-token weight traffic, hence
quantized by default. `include_lm_head=False` leaves the head alone (and shared).

Thread count: on small VMs, OpenMP's default spin-waiting can stall tiny parallel ops for milliseconds (seen here
in attention at decode); the benchmark sets `OMP_WAIT_POLICY=PASSIVE`, which the serving process should set too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nomoat import kernels
from nomoat.kernels import hugepages
from nomoat.kernels.layout import I8_BLOCK, PANEL, Q4_BLOCK, Q4_CODE_BYTES
from nomoat.util.errors import ModelError

logger = logging.getLogger(__name__)

MODES = ("int8", "int4")
INT4_FORMATS = ("q4_0", "q4_1")
DEFAULT_GROUP_SIZE = 32  # GGUF's Q4_0 / Q4_1 block: the only int4 group size
HEAD_NAME = "lm_head"  # the output head's module name: int8 under int4 (`layer_mode`)
# Rows up to which an int8 layer on the CPU runs the compiled panel kernel (all of them: it also serves prefill).
INT8_KERNEL_MAX_ROWS = 1 << 62
# Weights dequantized per chunk on the dequantize-then-matmul path: 2M elements is 8 MB of fp32 scratch per thread.
CHUNK_ELEMENTS = 1 << 21


class QuantizationError(ModelError, ValueError):
    """A mode or layer shape that cannot be quantized as asked."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}: expected one of {', '.join(MODES)}")


def _check_group(in_features: int, group_size: int) -> None:
    if group_size != Q4_BLOCK:
        raise QuantizationError(
            f"int4 group_size must be {Q4_BLOCK} (GGUF's Q4_0 / Q4_1 blocks of 32 input channels), got {group_size}"
        )
    if in_features % Q4_BLOCK:
        raise QuantizationError(
            f"int4 blocks run along input channels, so in_features must be divisible by {Q4_BLOCK}: "
            f"{in_features} % {Q4_BLOCK} = {in_features % Q4_BLOCK}; use int8 for this layer"
        )


def is_head(name: str) -> bool:
    """Whether the module path `name` is the output head (`lm_head`, at any depth)."""
    return name.rsplit(".", 1)[-1] == HEAD_NAME


def layer_mode(name: str, mode: str, in_features: int | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> str:
    """The format the linear layer at module path `name` gets when a model is quantized to `mode`.

    int8 stays int8. Under int4, the output head is int8 (the module docstring says why), and so is a
    layer whose `in_features` (None: not known yet) is not a multiple of the int4 block; every other layer is int4.
    """
    _check_mode(mode)
    if mode == "int4" and (is_head(name) or (in_features is not None and in_features % group_size)):
        return "int8"
    return mode


# ---- formats: quantize and dequantize one matrix ------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 codes of a matrix, rounded as llama.cpp (and the `gguf` package) round them.

    Per block of 32 input channels: `d = absmax / 127`, `q = round(x / d)` half away from zero (computed with fp32
    `d`, stored as fp16). A last block of fewer than 32 channels (`in % 32 != 0`) is its own block.

    Args:
        weight: (out, in) floating-point matrix.

    Returns:
        `q`: int8 (out, in) in [-127, 127]; `d`: fp16 (out, ceil(in / 32)), with `weight ~= d * q` per block.
    """
    n, k = weight.shape
    nb = -(-k // I8_BLOCK)
    # One fp32 working copy, worked on in place (a loader quantizes pieces of rows: few temporaries, little memory).
    w = torch.zeros((n, nb * I8_BLOCK), dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.detach()
    w = w.view(n, nb, I8_BLOCK)  # (out, b, 32)
    d = w.abs().amax(dim=2, keepdim=True).div_(127.0)
    w.mul_(torch.where(d == 0, torch.zeros_like(d), 1.0 / d))
    sign = torch.sign(w)
    w.abs_()
    floored = w.floor()
    w.sub_(floored).mul_(2).floor_().add_(floored).mul_(sign)  # gguf's np_roundf: half away from zero
    del sign, floored
    return w.clamp_(-127, 127).to(torch.int8).view(n, -1)[:, :k].contiguous(), d.squeeze(2).half()


def int8_panels(q: torch.Tensor, d: torch.Tensor, arena: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Panels (P, in, 64) int8 and block scales (P, ceil(in / 32), 64) fp16 of codes and scales, any device.

    `q` (out, in) int8 and `d` (out, ceil(in / 32)) fp16, as `quantize_int8` gives them; the kernels' layout
    (`kernels.pack_int8`, huge pages on the CPU unless `arena` is False: a temporary copied on).
    """
    if q.device.type == "cpu":
        return kernels.pack_int8(q, d, arena)
    panels, scales = kernels.pack_int8(q.cpu(), d.cpu())
    return panels.to(q.device), scales.to(q.device)


def int8_codes(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The (out, in) int8 codes that panels (P, in, 64) hold (a new contiguous tensor, any device)."""
    return kernels.unpack(panels, out_features)


def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 codes of a matrix, rounded as llama.cpp (and the `gguf` package) round them.

    Per block of 32 input channels: `d = v / -8` for the value `v` of largest magnitude, `code = trunc(x / d + 8.5)`
    clamped to 15 (computed with fp32 `d`, stored as fp16).

    Args:
        weight: (out, in) floating-point matrix, `in % 32 == 0`.

    Returns:
        `codes`: uint8 (out, in) in [0, 15]; `d`: fp16 (out, in / 32), with `weight ~= d * (codes - 8)` per block.
    """
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // Q4_BLOCK, Q4_BLOCK)  # (out, b, 32)
    vmax = blocks.gather(2, blocks.abs().argmax(dim=2, keepdim=True))  # (out, b, 1), signed
    d = vmax / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    codes = torch.trunc(blocks * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), d.squeeze(2).half()


def quantize_q4_1(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 codes of a matrix (llama.cpp's rounding): per block `d = (max - min) / 15`, `m = min`.

    Returns:
        `codes`: uint8 (out, in) in [0, 15]; `d`, `m`: fp16 (out, in / 32), with `weight ~= d * codes + m`.
    """
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // Q4_BLOCK, Q4_BLOCK)
    lo, hi = blocks.amin(dim=2, keepdim=True), blocks.amax(dim=2, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    codes = torch.trunc((blocks - lo) * inv + 0.5).clamp_(0, 15).to(torch.uint8)
    return codes.reshape(n, k), d.squeeze(2).half(), lo.squeeze(2).half()


def q4_panels(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
    """4-bit panels (P, in / 32, 1152 | 1280) of (out, in) codes and fp16 block scales (and minimums), any device."""
    if codes.device.type == "cpu":
        return kernels.pack_q4(codes, d, m)
    return kernels.pack_q4(codes.cpu(), d.cpu(), None if m is None else m.cpu()).to(codes.device)


def quantize_int4(weight: torch.Tensor, fmt: str = "q4_0") -> torch.Tensor:
    """4-bit panels of a matrix (`q4_panels`), in GGUF's `"q4_0"` (default) or `"q4_1"` format."""
    if fmt not in INT4_FORMATS:
        raise QuantizationError(f"unknown int4 format {fmt!r}: expected q4_0 or q4_1")
    return q4_panels(*(quantize_q4_0(weight) if fmt == "q4_0" else quantize_q4_1(weight)))


# ---- kernels ------------------------------------------------------------------------------------------------------

def int8_matmul(
    x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, n: int, exact: bool = False
) -> torch.Tensor:
    """`x @ W.T` for a 2-D `x` and int8 panels of W (n, in) with their block scales, without the whole fp32 weight.

    `exact`: fp32 activations even where the CPU kernel would round them (`kernels.int8_dot`).

    The compiled panel kernel on the CPU; elsewhere (or without the kernels) panels are dequantized in chunks of
    at most `CHUNK_ELEMENTS` weights, each multiplied as it is made.
    """
    m, k = x.shape
    if x.device.type == "cpu" and m <= INT8_KERNEL_MAX_ROWS and kernels.available():
        return kernels.linear_int8(x.float(), panels, scale, n, exact=exact).to(x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (k * PANEL))  # panels per chunk
    for p0 in range(0, panels.shape[0], step):
        n0, n1 = p0 * PANEL, min(n, (p0 + step) * PANEL)
        w = kernels.dequantize_int8(panels[p0 : p0 + step], scale[p0 : p0 + step], n1 - n0, x.dtype)
        torch.mm(x, w.t(), out=out[:, n0:n1])
    return out


def int4_matmul(x: torch.Tensor, panels: torch.Tensor, out_features: int, exact: bool = False) -> torch.Tensor:
    """`x @ W.T` for a 2-D `x` and 4-bit panels of W (out, in), without the whole fp32 weight.

    The compiled `linear_q4` on the CPU (int8 activations per block); elsewhere, without the kernels, or `exact`
    (unrounded activations), panels are dequantized in chunks of at most `CHUNK_ELEMENTS` weights, each multiplied
    as it is made.
    """
    m, k = x.shape
    if x.device.type == "cpu" and kernels.available() and not exact:
        return kernels.linear_q4(x.float(), panels, out_features).to(x.dtype)
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (k * PANEL))  # panels per chunk
    for p0 in range(0, panels.shape[0], step):
        n0, n1 = p0 * PANEL, min(out_features, (p0 + step) * PANEL)
        w = kernels.dequantize_q4(panels[p0 : p0 + step], n1 - n0, x.dtype)  # (n1 - n0, in)
        torch.mm(x, w.t(), out=out[:, n0:n1])
    return out


# ---- the module ---------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A weight-only quantized `nn.Linear` (int8 or int4, in GGUF's blocks) for inputs of any shape.

    Build one from a trained layer with `QuantizedLinear.from_linear(linear, mode)`, or from GGUF Q8_0 blocks with
    `from_q8`, Q4_0 / Q4_1 ones with `from_q4`. The packed weights (and int8 scales) are buffers: they follow
    `.to(device)` and appear in `state_dict`. The bias, if any, stays a full-precision parameter.

    Args:
        in_features: Input width.
        out_features: Output width.
        mode: `"int8"` or `"int4"`.
        group_size: Input channels per int4 block: 32 (ignored for int8).
        bias: Whether the layer has a bias.
        dtype: Dtype of the bias (the model's dtype).
        device: Where to allocate.
        int4_format: `"q4_0"` (scale only) or `"q4_1"` (scale and minimum), for int4.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        mode: str = "int8",
        group_size: int = DEFAULT_GROUP_SIZE,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        int4_format: str = "q4_0",
    ) -> None:
        super().__init__()
        _check_mode(mode)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        panels = -(-out_features // PANEL)
        if mode == "int8":
            self.group_size = None
            self.register_buffer("qweight", torch.zeros(panels, in_features, PANEL, dtype=torch.int8, device=device))
            shape = (panels, -(-in_features // I8_BLOCK), PANEL)
            self.register_buffer("scale", torch.ones(shape, dtype=torch.float16, device=device))
        else:
            _check_group(in_features, group_size)
            if int4_format not in INT4_FORMATS:
                raise QuantizationError(f"unknown int4 format {int4_format!r}: expected q4_0 or q4_1")
            self.group_size = group_size
            block = Q4_CODE_BYTES + (4 if int4_format == "q4_1" else 2) * PANEL
            shape = (panels, in_features // Q4_BLOCK, block)
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8, device=device))
            self.scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @property
    def int4_format(self) -> str | None:
        """`"q4_0"` or `"q4_1"` for an int4 layer (read from its panels' block size), None for int8."""
        if self.mode != "int4":
            return None
        return "q4_1" if self.qweight.shape[2] > Q4_CODE_BYTES + 2 * PANEL else "q4_0"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE, int4_format: str = "q4_0"
    ) -> QuantizedLinear:
        """Quantize a linear layer's weight (the layer itself is left unchanged)."""
        _check_mode(mode)
        w = linear.weight
        n, k = w.shape
        new = cls(k, n, mode, group_size, linear.bias is not None, w.dtype, "meta", int4_format)
        with torch.no_grad():
            if mode == "int8":
                new.qweight, new.scale = int8_panels(*quantize_int8(w))
            else:
                new.qweight = quantize_int4(w, int4_format)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    @classmethod
    def from_q4(
        cls,
        codes: torch.Tensor,
        d: torch.Tensor,
        m: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """An int4 layer holding given GGUF Q4_0 (`m` None) or Q4_1 blocks exactly (no re-quantization).

        Args:
            codes: (out, in) uint8 codes in [0, 15].
            d: (out, in / 32) fp16 block scales.
            m: (out, in / 32) fp16 block minimums (Q4_1), or None (Q4_0: `w = d * (code - 8)`).
            bias: (out,) bias, or None.
        """
        n, k = codes.shape
        fmt = "q4_0" if m is None else "q4_1"
        dtype = bias.dtype if bias is not None else torch.float32
        new = cls(k, n, "int4", DEFAULT_GROUP_SIZE, bias is not None, dtype, "meta", fmt)
        new.qweight = q4_panels(codes, d, m)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone())
        return new

    @classmethod
    def from_q8(cls, codes: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """An int8 layer holding given GGUF Q8_0 blocks exactly (no re-quantization).

        Args:
            codes: (out, in) int8 codes.
            d: (out, ceil(in / 32)) fp16 block scales (`w = d * q`).
            bias: (out,) bias, or None.
        """
        n, k = codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        new = cls(k, n, "int8", DEFAULT_GROUP_SIZE, bias is not None, dtype, "meta")
        new.qweight, new.scale = int8_panels(codes, d)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().clone())
        return new

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these integers stand for, in `dtype`, computed with plain torch ops."""
        if self.mode == "int8":
            return kernels.dequantize_int8(self.qweight, self.scale, self.out_features, dtype)
        return kernels.dequantize_q4(self.qweight, self.out_features, dtype)

    def int8_codes(self) -> torch.Tensor:
        """The plain (out, in) int8 codes of an int8 layer (`w = d * q` per block), rebuilt from the panels."""
        if self.mode != "int8":
            raise QuantizationError(f"int8_codes: the layer is {self.mode}")
        return int8_codes(self.qweight, self.out_features)

    def int8_scales(self) -> torch.Tensor:
        """The plain (out, ceil(in / 32)) fp16 block scales of an int8 layer, rebuilt from the panels' order."""
        if self.mode != "int8":
            raise QuantizationError(f"int8_scales: the layer is {self.mode}")
        return kernels.unpack_int8(self.qweight, self.scale, self.out_features)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features); the output has `x`'s dtype."""
        if x.requires_grad and torch.is_grad_enabled():
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # an input on its way to a gradient (QLoRA's base in training): the exact product its backward assumes
        if self.mode == "int8":
            y = int8_matmul(x2, self.qweight, self.scale, self.out_features, exact=x.requires_grad)
        else:
            y = int4_matmul(x2, self.qweight, self.out_features, exact=x.requires_grad)
        if self.bias is not None:
            y = y.add_(self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape, mode and int4 format, for `print(model)`."""
        fmt = f", format={self.int4_format}" if self.mode == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{fmt}, "
            f"bias={self.bias is not None}"
        )


# ---- the model ----------------------------------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by a model's weights: every parameter once (tied ones count once) plus quantized buffers."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = list(model.parameters())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            tensors += [t for t in (module.qweight, module.scale) if t is not None]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def quantize_model(
    model: nn.Module,
    mode: str,
    group_size: int = DEFAULT_GROUP_SIZE,
    include_lm_head: bool = True,
) -> nn.Module:
    """Replace every `nn.Linear` of `model` in place by a weight-only `QuantizedLinear` under the same name.

    Each layer's format is `layer_mode`'s: under int4 the output head is int8, and a layer whose
    `in_features` is not divisible by 32 is int8 too (logged). Every `nn.Linear` is a target: attach LoRA adapters
    after quantizing, not before. A tied `lm_head` gets its own quantized copy; the embedding keeps its
    full-precision matrix (see the module docstring for the memory cost). The result is also described in
    `model.quantization` (a dict: mode, group_size, bytes before and after, the mode of each replaced layer).

    Args:
        model: Any module (a `nomoat.models.transformer.Transformer` in practice); changed in place.
        mode: `"int8"` or `"int4"` (GGUF Q4_0 blocks; the head int8).
        group_size: Input channels per int4 block: 32, GGUF's.
        include_lm_head: Quantize the module named `lm_head` too (default); False keeps it in full precision.

    Returns:
        The same model, for chaining.
    """
    _check_mode(mode)
    if mode == "int4":
        _check_group(group_size, group_size)  # a bad group size is an error, not a silent int8 fallback
    before = weight_bytes(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Names, not modules: no list may keep a replaced layer (and its fp32 weight) alive until the end.
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or not is_head(name))
    ]
    layers: dict[str, str] = {}
    for name in targets:
        linear = model.get_submodule(name)
        this_mode = layer_mode(name, mode, linear.in_features, group_size)
        if this_mode != mode and not is_head(name):
            logger.warning(
                "%s: in_features %d is not divisible by the int4 block %d; quantized to int8 instead",
                name, linear.in_features, group_size,
            )  # fmt: skip
        if id(linear.weight) in embeddings:
            logger.info("%s is tied to an embedding: the embedding stays full precision, the head gets a copy", name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, this_mode, group_size))
        del linear
        hugepages.release_freed_memory()  # the fp32 weight's memory goes back now: the peak is one layer more
        layers[name] = this_mode
    after = weight_bytes(model)
    info: dict[str, Any] = {
        "mode": mode,
        "group_size": group_size if mode == "int4" else None,
        "include_lm_head": include_lm_head,
        "bytes_before": before,
        "bytes_after": after,
        "layers": layers,
    }
    model.quantization = info
    logger.info("quantized %d linear layers to %s: weights %.1f MB -> %.1f MB", len(layers), mode, before / 1e6,
                after / 1e6)  # fmt: skip
    return model
