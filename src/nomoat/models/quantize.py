"""Weight-only int8 / int4 quantization of a model's linear layers, for decoding in less memory and time.

`quantize_model(model, "int8" | "int4")` replaces every `nn.Linear` of a model, in place and under the same module
path (`model.layers.0.self_attn.q_proj` still names it), by a `QuantizedLinear` that stores integer weights and
computes in floating point: activations are never quantized, and outputs come back in the input's dtype.
`weight_bytes(model)` counts weight bytes; `model.quantization` records the bytes before and after.

Formats (chosen for the fastest CPU kernel available: nomoat's panel kernels for int8, fbgemm's bags for int4):
    int8: symmetric, one fp32 scale per output channel: `w[n, k] = q[n, k] * scale[n]`, `q` in [-127, 127], held
        once, in the compiled kernels' panel layout (`nomoat.kernels.layout`: panels of 64 output channels, k-major,
        out padded to a multiple of 64): `qweight` (P, in, 64) int8. `int8_codes()` gives the plain (out, in) int8
        matrix back (a permutation). 1 byte per weight (+ 4 per output channel, + the padding to 64 channels).
    int4: asymmetric groups of `group_size` (default 32) consecutive *output* channels per input channel:
        `w = code * scale + minimum`, codes in [0, 15], with fp16 `scale` and `minimum` per group, in fbgemm's 4-bit
        row format (0.625 bytes per weight at group 32). Groups run along output channels because the kernel
        contracts over input channels one row at a time; so `out_features % group_size == 0` is required
        (`quantize_model` falls back to int8 for a layer where it is not, and logs it).

Kernels, one per (device, mode, tokens per call), all computing in fp32 for fp32 models:
    int8, CPU, any number of rows (with the compiled kernels): `nomoat.kernels.linear_int8` on the panels, the op
        the decode model runs too (`nomoat.inference.prepare` shares these panels: the codes exist once).
    CPU, int4, up to `INT4_BAG_MAX_ROWS` tokens: `quantized::embedding_bag_4bit_rowwise_offsets`, the same with one
        bag per (token, output group). Rows are only 16 bytes at group 32, so per-row overhead limits it: the
        layers' matrices 1.3-1.4x fp32, whole-model decode 1.25-1.7x (noisy), at a sixth of fp32's bytes for the
        quantized weights. A larger `group_size` is faster (fewer, longer rows) and less accurate.
    CPU, more int4 tokens (prefill), int8 without the compiled kernels, and CUDA or any other device:
        dequantize-then-matmul, in chunks of at most `CHUNK_ELEMENTS` weights so the temporary stays in cache (and
        small on a GPU): int4 chunks are unpacked by fbgemm's `embedding_bag_4bit_unpack` on CPU and by plain torch
        ops elsewhere. On a GPU this saves memory but is not faster than bf16 weights at batch 1.
    With gradients (an input that requires grad, e.g. LoRA training over a quantized base): the weight is
        dequantized whole and `F.linear` runs, so autograd reaches the input; quantized weights never train.
Rejected after measuring (torch 2.13 CPU build, AMD EPYC, 2 threads):
    `aten._weight_int8pack_mm`: scalar code for fp32 and fp16 activations (0.5-0.6x the speed of fp32 `F.linear`
        over the 210 matrices, 4-12x slower on cache-resident ones); fast only for bf16 activations on an AVX-512
        build (under AVX2 its bf16 path is scalar too), and then no faster than the fbgemm bag.
    `aten._weight_int4pack_mm_for_cpu`: likewise scalar for fp32 (0.3x the speed of fp32 `F.linear`).
    torchao 0.18: `Int8WeightOnlyConfig` dequantizes the whole weight then calls `mm` on every call (about 2x
        slower than the bag kernel), and `Int4WeightOnlyConfig` needs GPU kernel packages even on CPU. Not used.
    Dequantize-then-matmul at decode, even blocked to stay in cache: the int8->fp32 conversion pass plus an fp32
        GEMV gave only 1.3-1.4x at decode; int4 (unpack, convert, scale, GEMV) was slower than fp32.
    Splitting a layer into several bags so fbgemm's two threads share it: slower at 2 threads (thread wake-ups).

A tied output head (`lm_head.weight is model.embed_tokens.weight`): the embedding keeps its full-precision matrix
(lookups are unchanged) and the head gets its own quantized copy, so quantizing the head adds `vocab * hidden` bytes
(int8) or `0.625 * vocab * hidden` bytes (int4, group 32) to the model's memory, while the head's per-token read
drops 4x (int8) or 6.4x (int4): for SmolLM2-135M the head is 21% of fp32's per-token weight traffic, hence quantized
by default. `include_lm_head=False` leaves the head alone (and shared).

Thread count: on small VMs, OpenMP's default spin-waiting can stall tiny parallel ops for milliseconds (seen here
in attention at decode); the benchmark sets `OMP_WAIT_POLICY=PASSIVE`, which the serving process should set too.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nomoat import kernels
from nomoat.kernels import hugepages
from nomoat.kernels.layout import PANEL
from nomoat.util.errors import ModelError

logger = logging.getLogger(__name__)

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32
# Rows up to which an int8 layer on the CPU runs the compiled panel kernel (all of them: it also serves prefill).
INT8_KERNEL_MAX_ROWS = 1 << 62
# The fbgemm int4 bag kernel reads the weights once per token row, so it wins only for a few rows per call (decode);
# above this row count (prefill) dequantize-then-matmul is faster (measured on the reference machine).
INT4_BAG_MAX_ROWS = 2
# Weights dequantized per chunk on the dequantize-then-matmul path: 2M elements is 8 MB of fp32 scratch per thread.
CHUNK_ELEMENTS = 1 << 21
_q = getattr(torch.ops, "quantized", None)
_HAS_BAGS = _q is not None and all(
    hasattr(_q, op) for op in ("embedding_bag_4bit_rowwise_offsets", "embedding_bag_4bit_unpack")
)
_FP16 = torch.finfo(torch.float16)


class QuantizationError(ModelError, ValueError):
    """A mode or layer shape that cannot be quantized as asked."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization mode {mode!r}: expected one of {', '.join(MODES)}")


def _check_group(out_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % 2:
        raise QuantizationError(f"int4 group_size must be a positive even number, got {group_size}")
    if out_features % group_size:
        raise QuantizationError(
            f"int4 groups run along output channels, so out_features must be divisible by group_size: "
            f"{out_features} % {group_size} = {out_features % group_size}; pick a group_size that divides "
            f"{out_features} or use int8 for this layer"
        )


# ---- formats: quantize and dequantize one matrix ------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 codes of a matrix.

    Args:
        weight: (out, in) floating-point matrix.

    Returns:
        `q`: int8 (out, in) in [-127, 127]; `scale`: fp32 (out,) with `weight ~= q * scale[:, None]`.
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_panels(q: torch.Tensor) -> torch.Tensor:
    """Panels (P, in, 64) int8 of (out, in) int8 codes: the kernels' layout (huge pages on the CPU), any device."""
    if q.device.type == "cpu":
        return kernels.pack_int8(q.t())
    n, k = q.shape
    padded = F.pad(q, (0, 0, 0, -n % PANEL))  # (P * 64, in)
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()


def int8_codes(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The (out, in) int8 codes that panels (P, in, 64) hold (a new contiguous tensor, any device)."""
    return kernels.unpack(panels, out_features)


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """Asymmetric int4 in groups of `group_size` consecutive output channels, in fbgemm's 4-bit row format.

    Args:
        weight: (out, in) floating-point matrix; `out % group_size == 0`.
        group_size: Output channels per group (even).

    Returns:
        uint8 (out / group_size * in, group_size / 2 + 4): row `b * in + k` holds the codes of
        `weight[b*g:(b+1)*g, k]` (element `2j` in the low nibble of byte `j`, `2j+1` in the high nibble), then the
        fp16 pair (scale, minimum): `w = code * scale + minimum`, codes in [0, 15].
    """
    n, k = weight.shape
    _check_group(n, group_size)
    rows = weight.detach().float().reshape(n // group_size, group_size, k).permute(0, 2, 1).reshape(-1, group_size)
    lo = rows.amin(dim=1).clamp(_FP16.min, _FP16.max).half()
    step = ((rows.amax(dim=1) - lo.float()) / 15.0).clamp(_FP16.tiny, _FP16.max).half()
    # Codes are computed against the fp16-rounded parameters, so the stored triple reproduces the best grid.
    q = torch.round((rows - lo.float()[:, None]) / step.float()[:, None]).clamp_(0, 15).to(torch.uint8)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    params = torch.stack([step, lo], dim=1).view(torch.uint8)  # (rows, 4)
    return torch.cat([codes, params], dim=1).contiguous()


def _int4_rows(packed: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized rows (n_rows, group_size) of int4 `packed` rows, with plain torch ops."""
    half = group_size // 2
    codes = packed[:, :half]
    q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1, group_size).to(dtype)
    params = packed[:, half:].contiguous().view(torch.float16).to(dtype)  # (n_rows, 2): scale, minimum
    return q * params[:, :1] + params[:, 1:]


def dequantize_int4(
    packed: torch.Tensor, out_features: int, in_features: int, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The (out, in) matrix int4 `packed` rows stand for, with plain torch ops (any device)."""
    rows = _int4_rows(packed, group_size, dtype)  # (blocks * in, g)
    w = rows.view(out_features // group_size, in_features, group_size).permute(0, 2, 1)
    return w.reshape(out_features, in_features)


# ---- kernels ------------------------------------------------------------------------------------------------------

_scratch_local = threading.local()
_bag_cache: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}


def _scratch(dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer on CPU (one per thread and dtype, grown on demand); a fresh tensor elsewhere."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    bufs = getattr(_scratch_local, "bufs", None)
    if bufs is None:
        bufs = _scratch_local.bufs = {}
    buf = bufs.get(dtype)
    # A buffer made under `torch.inference_mode()` cannot be written outside it: replace it there.
    if buf is None or buf.numel() < numel or (buf.is_inference() and not torch.is_inference_mode_enabled()):
        buf = bufs[dtype] = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=dtype)
    return buf[:numel]


def _bags(n_rows: int, per_bag: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and offsets (int32) for `tokens * n_rows / per_bag` bags of `per_bag` consecutive rows each.

    Shared by every layer of the same shape (a dict lookup per call; a few MB at most for a large vocabulary).
    """
    key = (n_rows, per_bag, tokens)
    hit = _bag_cache.get(key)
    if hit is None:
        idx = torch.arange(n_rows, dtype=torch.int32).repeat(tokens)
        hit = _bag_cache[key] = (idx, torch.arange(0, n_rows * tokens, per_bag, dtype=torch.int32))
    return hit


def int8_matmul(x: torch.Tensor, panels: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """`x @ (q * scale[:, None]).T` for a 2-D `x` and int8 panels of `q` (n, in), without the whole fp32 weight.

    The compiled panel kernel on the CPU; elsewhere (or without the kernels) panels are dequantized in chunks of
    at most `CHUNK_ELEMENTS` weights, each multiplied as it is made.
    """
    m, k = x.shape
    if x.device.type == "cpu" and m <= INT8_KERNEL_MAX_ROWS and kernels.available():
        return kernels.linear_int8(x.float(), panels, scale, n).to(x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (k * PANEL))  # panels per chunk
    for p0 in range(0, panels.shape[0], step):
        n0, n1 = p0 * PANEL, min(n, (p0 + step) * PANEL)
        w = panels[p0 : p0 + step].transpose(1, 2).reshape(-1, k)[: n1 - n0].to(x.dtype)  # (n1 - n0, in)
        torch.mm(x, w.mul_(scale[n0:n1, None].to(x.dtype)).t(), out=out[:, n0:n1])
    return out


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, out_features: int, group_size: int) -> torch.Tensor:
    """`x @ dequantize_int4(packed, ...).T` for a 2-D `x`."""
    m, k = x.shape
    n_rows = packed.shape[0]
    blocks = out_features // group_size
    if x.device.type == "cpu" and m <= INT4_BAG_MAX_ROWS and _HAS_BAGS:
        # Bag (token, block) sums the `in` rows of that block, row k weighted by x[token, k] (fbgemm, fp32).
        idx, offsets = _bags(n_rows, k, m)
        weights = x.float().repeat(1, blocks).reshape(-1)
        y = _q.embedding_bag_4bit_rowwise_offsets(packed, idx, offsets, per_sample_weights=weights)
        return y.view(m, out_features).to(x.dtype)
    out = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // (k * group_size))
    for b in range(0, blocks, step):
        e = min(blocks, b + step)
        chunk = packed[b * k : e * k]
        if chunk.device.type == "cpu" and _HAS_BAGS:
            w = _q.embedding_bag_4bit_unpack(chunk).to(x.dtype)  # fbgemm's fused unpack (fp32)
        else:
            w = _int4_rows(chunk, group_size, x.dtype)
        w = w.view(e - b, k, group_size)
        y = torch.matmul(x, w)  # (blocks, m, g)
        out[:, b * group_size : e * group_size] = y.permute(1, 0, 2).reshape(m, -1)
    return out


# ---- the module ---------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A weight-only quantized `nn.Linear` (int8 per output channel, or int4 in groups) for inputs of any shape.

    Build one from a trained layer with `QuantizedLinear.from_linear(linear, mode, group_size)`. The packed weights
    (and int8 scales) are buffers: they follow `.to(device)` and appear in `state_dict`. The bias, if any, stays a
    full-precision parameter.

    Args:
        in_features: Input width.
        out_features: Output width.
        mode: `"int8"` or `"int4"`.
        group_size: Output channels per int4 group (ignored for int8).
        bias: Whether the layer has a bias.
        dtype: Dtype of the bias (the model's dtype).
        device: Where to allocate.
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
    ) -> None:
        super().__init__()
        _check_mode(mode)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        if mode == "int8":
            self.group_size = None
            panels = -(-out_features // PANEL)
            self.register_buffer("qweight", torch.zeros(panels, in_features, PANEL, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        else:
            _check_group(out_features, group_size)
            self.group_size = group_size
            shape = (out_features // group_size * in_features, group_size // 2 + 4)
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.uint8, device=device))
            self.scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedLinear:
        """Quantize a linear layer's weight (the layer itself is left unchanged)."""
        _check_mode(mode)
        w = linear.weight
        n, k = w.shape
        if mode == "int4":
            _check_group(n, group_size)
        new = cls(k, n, mode, group_size, bias=linear.bias is not None, dtype=w.dtype, device="meta")
        with torch.no_grad():
            if mode == "int8":
                q, new.scale = quantize_int8(w)
                new.qweight = int8_panels(q)
            else:
                new.qweight = quantize_int4(w, group_size)
            if linear.bias is not None:
                new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return new

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight these integers stand for, in `dtype`, computed with plain torch ops."""
        if self.mode == "int8":
            return self.int8_codes().to(dtype) * self.scale.to(dtype)[:, None]
        return dequantize_int4(self.qweight, self.out_features, self.in_features, self.group_size, dtype)

    def int8_codes(self) -> torch.Tensor:
        """The plain (out, in) int8 codes of an int8 layer (`w = q * scale[:, None]`), rebuilt from the panels."""
        if self.mode != "int8":
            raise QuantizationError(f"int8_codes: the layer is {self.mode}")
        return int8_codes(self.qweight, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features); the output has `x`'s dtype."""
        if x.requires_grad and torch.is_grad_enabled():
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.mode == "int8":
            y = int8_matmul(x2, self.qweight, self.scale, self.out_features)
        else:
            y = int4_matmul(x2, self.qweight, self.out_features, self.group_size)
        if self.bias is not None:
            y = y.add_(self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape, mode and group size, for `print(model)`."""
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}, "
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

    An int4 layer whose `out_features` is not divisible by `group_size` is quantized to int8 instead (logged).
    Every `nn.Linear` is a target: attach LoRA adapters after quantizing, not before.
    A tied `lm_head` gets its own quantized copy; the embedding keeps its full-precision matrix (see the module
    docstring for the memory cost). The result is also described in `model.quantization` (a dict: mode,
    group_size, bytes before and after, the mode of each replaced layer).

    Args:
        model: Any module (a `nomoat.models.transformer.Transformer` in practice); changed in place.
        mode: `"int8"` or `"int4"`.
        group_size: Output channels per int4 group (even; 32 by default).
        include_lm_head: Quantize the module named `lm_head` too (default); False keeps it in full precision.

    Returns:
        The same model, for chaining.
    """
    _check_mode(mode)
    if mode == "int4":
        _check_group(2 * group_size, group_size)  # a bad group size is an error, not a silent int8 fallback
    before = weight_bytes(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Names, not modules: no list may keep a replaced layer (and its fp32 weight) alive until the end.
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (include_lm_head or name.rsplit(".", 1)[-1] != "lm_head")
    ]
    layers: dict[str, str] = {}
    for name in targets:
        linear = model.get_submodule(name)
        layer_mode = mode
        if mode == "int4" and linear.out_features % group_size:
            layer_mode = "int8"
            logger.warning(
                "%s: out_features %d is not divisible by group_size %d; quantized to int8 instead",
                name, linear.out_features, group_size,
            )  # fmt: skip
        if id(linear.weight) in embeddings:
            logger.info("%s is tied to an embedding: the embedding stays full precision, the head gets a copy", name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(linear, layer_mode, group_size))
        del linear
        hugepages.release_freed_memory()  # the fp32 weight's memory goes back now: the peak is one layer more
        layers[name] = layer_mode
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
