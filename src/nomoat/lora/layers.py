"""`LoRALinear`: a drop-in `nn.Linear` with a low-rank adapter (LoRA, rsLoRA, DoRA) over a frozen base.

The base `weight` and `bias` stay on the layer under those names, so a base checkpoint loads unchanged; the adapter
sits beside it under PEFT's names, `lora_A` (in -> r), `lora_B` (r -> out) and, for DoRA, `lora_magnitude_vector`.
The arithmetic follows PEFT 0.21 (`tuners/lora/layer.py`, `dora.py`) operation by operation, so fp32 outputs agree
with `peft` to rounding. A quantized base (QLoRA: `QuantizedLinear` int8/int4 or `NF4Linear`) is held as `qbase`
(`weight` is None) and runs through `QuantizedBaseMatmul`, which keeps no dequantized weight between forward and
backward: the backward dequantizes again for the input gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.config.lora import LoRAConfig
from nomoat.lora.delta import delta_weight, lora_delta, lora_up
from nomoat.lora.nf4 import NF4Linear
from nomoat.models import fused_ops
from nomoat.models.quantize import QuantizedLinear

QuantizedBase = QuantizedLinear | NF4Linear


def _quantized_grad_input(qbase: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """`grad @ W` for a quantized frozen `W`, in `grad`'s dtype, dequantizing `W` for this product only."""
    if isinstance(qbase, NF4Linear):
        return qbase.grad_input(grad)  # a tile of `W` at a time
    cd = getattr(qbase, "compute_dtype", None) or grad.dtype
    return (grad.to(cd) @ qbase.dequantize(cd)).to(grad.dtype)  # `W` (out, in) freed on return


class QuantizedBaseMatmul(torch.autograd.Function):
    """`x @ W.T` for a quantized frozen `W`, saving nothing for backward but a reference to the quantized module.

    Forward runs the module's own kernels (no gradient is recorded inside); backward dequantizes the weight again,
    computes `grad @ W` and drops it. The weight gets no gradient.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, qbase: nn.Module) -> torch.Tensor:  # type: ignore[override]
        """Base output without bias: (..., out)."""
        ctx.qbase = qbase  # a module reference, not a saved tensor: nothing of the weight's size is kept
        return qbase(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        """Input gradient `grad @ W`, with `W` dequantized for this product only (in the base's compute dtype)."""
        return _quantized_grad_input(ctx.qbase, grad), None


class _SwiGLUDownLoRA(torch.autograd.Function):
    """`down(silu(gate) * up)` with a LoRA on `down`, keeping `gate`, `up` and the rank-r `A p` for backward.

    The product `p = silu(gate) * up` (tokens x intermediate, the largest activation of a layer) is what the
    gradient of `lora_A` needs; it is recomputed from `gate` and `up` in the backward pass (a cheap elementwise
    step) instead of being kept, which saves a third of the MLP's training memory. The frozen base is a weight
    tensor or, for QLoRA, an `NF4Linear` (`qbase`, decoded again a tile at a time in the backward pass, as in
    `QuantizedBaseMatmul`); the products run in `gate`'s dtype, the adapter cast to it (as autocast would).
    """

    @staticmethod
    def forward(ctx, gate, up, weight, qbase, bias, lora_a, lora_b, scaling):  # noqa: ANN001, ANN205
        with torch.autocast(gate.device.type, enabled=False):  # the dtypes are explicit
            dt = gate.dtype
            p = fused_ops.swiglu_forward(gate, up) if fused_ops.applicable(gate, up) else F.silu(gate) * up  # (..., I)
            lead = p.shape[:-1]
            p2 = p.reshape(-1, p.shape[-1])  # (N, I)
            a = p2 @ lora_a.to(dt).t()  # (N, r)
            base = F.linear(p2, weight, bias) if qbase is None else qbase(p2)
            if qbase is not None and bias is not None:
                base = base + bias.to(dt)
            del p, p2
            y = lora_up(a, lora_b.to(dt), scaling, out=base)  # (N, out), the update in place
        ctx.save_for_backward(gate, up, a, weight, lora_a, lora_b)
        ctx.scaling, ctx.qbase = scaling, qbase
        return y.view(*lead, y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        gate, up, a, weight, lora_a, lora_b = ctx.saved_tensors
        s, dt = ctx.scaling, gate.dtype
        need_a, need_b = ctx.needs_input_grad[5], ctx.needs_input_grad[6]
        g2 = grad.reshape(-1, grad.shape[-1]).to(dt)  # (N, out)
        la, lb = lora_a.to(dt), lora_b.to(dt)
        grad_b = ((g2.t() @ a) * s).to(lora_b.dtype) if need_b else None  # (out, r)
        grad_a_out = (g2 @ lb) * s  # (N, r)
        base = g2 @ weight if ctx.qbase is None else _quantized_grad_input(ctx.qbase, g2)  # (N, I)
        if fused_ops.applicable(gate, up, g2):
            grad_p = base.addmm_(grad_a_out, la).view(gate.shape)  # (..., I)
            p = torch.empty_like(gate) if need_a else None  # recomputed with the gradients
            grad_gate, grad_up = fused_ops.swiglu_backward(gate, up, grad_p, p)
            grad_lora_a = None if p is None else grad_a_out.t() @ p.reshape(-1, gate.shape[-1])  # (r, I)
            return grad_gate, grad_up, None, None, None, grad_lora_a, grad_b, None
        sig = torch.sigmoid(gate)
        act = gate * sig
        grad_lora_a = None
        if need_a:
            grad_lora_a = (grad_a_out.t() @ (act * up).reshape(-1, gate.shape[-1])).to(lora_a.dtype)  # (r, I)
        grad_p = base.addmm_(grad_a_out, la).view(gate.shape)  # (..., I)
        grad_up = grad_p * act
        # silu'(g) = sig * (1 + g * (1 - sig)) = sig + act * (1 - sig); in place, to spare (N, I) temporaries.
        dsilu = torch.rsub(sig, 1.0).mul_(act).add_(sig)
        grad_gate = grad_p.mul_(up).mul_(dsilu)
        return grad_gate, grad_up, None, None, None, grad_lora_a, grad_b, None


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters train in fp32 over a half-precision base (PEFT's `autocast_adapter_dtype=True`)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class LoRALinear(nn.Module):
    """A linear layer `y = x W^T + b + scaling * B(A(dropout(x)))` with `W`, `b` frozen and `A`, `B` trained.

    Build one with `from_linear` (shares the base weight tensor) or `from_quantized` (QLoRA); `inject_lora` does it
    for a whole model. State flags: `merged` (the update was added into `weight`; forward is the plain linear) and
    `disabled` (forward is the base layer alone; set by `nomoat.lora.merge.disable_lora`).

    Attributes:
        weight: Frozen base weight (out, in), or None over a quantized base.
        bias: Frozen base bias (out,), or None.
        qbase: The frozen quantized base (`QuantizedLinear` or `NF4Linear`), or None.
        lora_A: `nn.Linear(in, r, bias=False)`, Kaiming-uniform at init.
        lora_B: `nn.Linear(r, out, bias=False)`, zero at init (so a fresh adapter changes nothing).
        lora_magnitude_vector: DoRA's magnitude per output channel (out,), or None without DoRA.
        lora_dropout: Dropout on the adapter's input (`nn.Identity` when the probability is 0).
        scaling: `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: LoRAConfig,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        with_weight: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = cfg.r
        self.lora_alpha = cfg.alpha
        self.use_rslora = cfg.use_rslora
        self.use_dora = cfg.use_dora
        self.scaling = cfg.scaling
        weight = torch.empty(out_features, in_features, dtype=dtype, device=device) if with_weight else None
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.register_parameter("weight", None if weight is None else nn.Parameter(weight, requires_grad=False))
        self.register_parameter("bias", None if b is None else nn.Parameter(b, requires_grad=False))
        self.qbase: QuantizedBase | None = None
        self.lora_dropout: nn.Module = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        adtype = _adapter_dtype(dtype)
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, dtype=adtype, device=device)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False, dtype=adtype, device=device)
        self.register_parameter("lora_magnitude_vector", None)
        self.merged = False
        self.disabled = False
        self._dora_norm: torch.Tensor | None = None  # the weight norm used at merge time, for an exact unmerge
        self.reset_lora_parameters(cfg.init)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LoRAConfig) -> LoRALinear:
        """Wrap a linear layer: the new layer shares its weight and bias tensors (no copy) and freezes them."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, cfg, False, w.dtype, w.device, with_weight=False)
        new.weight = w
        new.bias = linear.bias
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        if cfg.use_dora:
            new.init_dora()
        return new

    @classmethod
    def from_quantized(cls, qlinear: QuantizedBase, cfg: LoRAConfig) -> LoRALinear:
        """QLoRA: a full-precision adapter over a frozen int8/int4 `QuantizedLinear` or NF4 `NF4Linear`.

        The quantized module is held as `qbase`; its bias (if any) moves to this layer's `bias`.
        """
        if not isinstance(qlinear, (QuantizedLinear, NF4Linear)):
            raise TypeError(f"from_quantized expects a QuantizedLinear or NF4Linear, got {type(qlinear).__name__}")
        b = qlinear.bias
        dtype = b.dtype if b is not None else torch.float32
        device = qlinear.qweight.device
        new = cls(qlinear.in_features, qlinear.out_features, cfg, False, dtype, device, with_weight=False)
        new.bias = b
        if b is not None:
            b.requires_grad_(False)
        qlinear.bias = None  # the bias is added here, after the quantized product
        new.qbase = qlinear
        if cfg.use_dora:
            new.init_dora()
        return new

    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's initialisation: A Kaiming-uniform (`a=sqrt(5)`, or normal(0, 1/r) for `"gaussian"`), B zero."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def init_dora(self) -> None:
        """(Re)set DoRA's magnitude to the row norms of `W + scaling * B @ A`, as PEFT does when adding a layer."""
        self.use_dora = True
        with torch.no_grad():
            w = self.base_weight(torch.float32)
            lora_weight = delta_weight(self.lora_A.weight.float(), self.lora_B.weight.float(), 1.0).to(w.device)
            norm = torch.linalg.norm(w + self.scaling * lora_weight, dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))

    # ---- the pieces -----------------------------------------------------------------------------------------------

    @property
    def quantized(self) -> bool:
        """Whether the frozen base is quantized (QLoRA)."""
        return self.qbase is not None

    @property
    def base_dtype(self) -> torch.dtype:
        """Dtype of the base layer's floating-point tensors."""
        if self.weight is not None:
            return self.weight.dtype
        return self.bias.dtype if self.bias is not None else torch.float32

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight (out, in): the parameter itself, or a fresh dequantized copy over a quantized base."""
        if self.qbase is not None:
            return self.qbase.dequantize(dtype or torch.float32)
        assert self.weight is not None
        return self.weight if dtype is None else self.weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """The plain LoRA update `scaling * B @ A` (out, in) in the adapter dtype (without DoRA's rescaling)."""
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors by their names in this layer (`lora_A.weight`, `lora_B.weight`, ...)."""
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.lora_magnitude_vector is not None:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` without bias, in `x`'s dtype."""
        if self.qbase is not None:
            if x.requires_grad and torch.is_grad_enabled():
                return QuantizedBaseMatmul.apply(x, self.qbase)
            return self.qbase(x)
        assert self.weight is not None
        return F.linear(x, self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone (with the merged update if merged): `x W^T + b`."""
        if self.qbase is None:
            assert self.weight is not None
            w, b = self.weight, self.bias
            if w.dtype != x.dtype:
                w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
            return F.linear(x, w, b)
        y = self._base_matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to `x` (..., in_features); the output has `x`'s dtype."""
        lead = x.shape[:-1]
        if x.dim() != 2:
            # One 2-D product: its output is a fresh tensor (not a view) that the update can be added to in place.
            return self.forward(x.reshape(-1, x.shape[-1])).view(*lead, self.out_features)
        result = self.base_forward(x)
        if self.disabled:
            if self.merged:
                raise RuntimeError("a merged LoRA layer cannot be disabled; use disable_lora(), which unmerges first")
            return result
        if self.merged:
            return result
        out_dtype = result.dtype
        # Under autocast the adapter's products run in the autocast dtype: `x` goes in as it is (an fp32 copy would
        # be cast straight back, and both copies kept for the backward pass).
        xa = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is None and result.dtype == xa.dtype == self.lora_A.weight.dtype:
            # result += scaling * (A x) B^T in place, one addmm: no (tokens, out) temporary, copy or fresh pages (an
            # out-of-place addmm copies `result` first: measured 8 ms per (1024, 1536) product in training). The base
            # product's backward needs its inputs, not its output, so autograd allows the in-place update.
            # A quantized base's output is a view: `lora_delta` then adds out of place (autograd forbids in place).
            return lora_delta(self.lora_dropout(xa), self.lora_A.weight, self.lora_B.weight, self.scaling, out=result)
        if self.lora_magnitude_vector is None:
            result = result + lora_delta(self.lora_dropout(xa), self.lora_A.weight, self.lora_B.weight, self.scaling)
        else:
            result = result + self._dora_term(xa, result)
        return result.to(out_dtype)

    def swiglu_forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """`self(silu(gate) * up)` for training, without keeping the product for the backward pass.

        Returns None when this layer cannot (DoRA, dropout, a merged, disabled or trainable base, an int8/int4
        base, or autocast over a full-precision base); the caller then runs the plain path. Over an NF4 base (QLoRA)
        autocast is allowed: its products run in `gate`'s dtype, which autocast gave the layers before.
        """
        plain = (self.lora_magnitude_vector is None and not self.merged and not self.disabled
                 and isinstance(self.lora_dropout, nn.Identity) and gate.dtype == up.dtype
                 and (self.bias is None or not self.bias.requires_grad))  # fmt: skip
        if not plain:
            return None
        if self.qbase is not None:
            if not isinstance(self.qbase, NF4Linear) or not gate.is_floating_point():
                return None  # int8/int4 bases: their no-grad product is not the exact one training uses
            return _SwiGLUDownLoRA.apply(gate, up, None, self.qbase, self.bias, self.lora_A.weight,
                                         self.lora_B.weight, self.scaling)  # fmt: skip
        if (torch.is_autocast_enabled() or self.weight is None or self.weight.requires_grad
                or not (gate.dtype == self.weight.dtype == self.lora_A.weight.dtype)):  # fmt: skip
            return None
        return _SwiGLUDownLoRA.apply(gate, up, self.weight, None, self.bias, self.lora_A.weight, self.lora_B.weight,
                                     self.scaling)  # fmt: skip

    def _dora_term(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to the base output, as PEFT's `DoraLinearLayer.forward` computes it."""
        assert self.lora_magnitude_vector is not None
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result if self.bias is None else result - self.bias.to(result.dtype)
        else:
            x = self.lora_dropout(x)
            base_result = self._base_matmul(x)
        with torch.no_grad():
            # ||W + s BA|| per output channel, treated as a constant (DoRA paper, section 4.3).
            lora_weight = delta_weight(self.lora_A.weight, self.lora_B.weight, 1.0).to(x.dtype)  # (out, in)
            w = self.base_weight(x.dtype)
            weight_norm = torch.linalg.norm(w + self.scaling * lora_weight, dim=1).to(w.dtype)
            del w, lora_weight
        mag_norm_scale = (self.lora_magnitude_vector / weight_norm).view(1, -1)
        lora_result = lora_delta(x, self.lora_A.weight, self.lora_B.weight, 1.0)  # (N, out), unscaled
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling

    # ---- merging --------------------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Add the adapter into `weight` (DoRA: rescale rows to the magnitude); a no-op when already merged.

        Raises:
            RuntimeError: the base is quantized (merge into a full-precision copy of the base instead).
        """
        if self.merged:
            return
        if self.qbase is not None:
            raise RuntimeError(
                f"cannot merge a LoRA adapter into a quantized ({self.qbase.mode}) base layer: the sum is not "
                "representable in the quantized format; load the base in full precision to merge"
            )
        assert self.weight is not None
        with torch.no_grad():
            delta = self.delta_weight().to(self.weight.dtype)
            if self.lora_magnitude_vector is not None:
                norm = torch.linalg.norm(self.weight + delta, dim=1).to(self.weight.dtype)
                self._dora_norm = norm
                factor = (self.lora_magnitude_vector.to(norm.dtype) / norm).view(-1, 1)
                self.weight.copy_(factor * (self.weight + delta))
            else:
                self.weight.add_(delta)
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter back out of `weight` (exact up to rounding); a no-op when not merged."""
        if not self.merged:
            return
        assert self.weight is not None
        with torch.no_grad():
            delta = self.delta_weight().to(self.weight.dtype)
            if self.lora_magnitude_vector is not None:
                assert self._dora_norm is not None
                factor = (self.lora_magnitude_vector.to(self._dora_norm.dtype) / self._dora_norm).view(-1, 1)
                self.weight.copy_(self.weight / factor - delta)
                self._dora_norm = None
            else:
                self.weight.sub_(delta)
        self.merged = False

    def to_base(self) -> nn.Module:
        """The plain layer this one wraps.

        An `nn.Linear` sharing `weight`/`bias` (with the update in it if merged), or the quantized base with its
        bias restored.
        """
        if self.qbase is not None:
            self.qbase.bias = self.bias
            return self.qbase
        assert self.weight is not None
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        """Shapes, rank, scaling and flags, for `print(model)`."""
        kind = "dora" if self.lora_magnitude_vector is not None else "lora"
        base = f", base={self.qbase.mode}" if self.qbase is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, {kind}, "
            f"scaling={self.scaling:g}{base}, merged={self.merged}, disabled={self.disabled}"
        )
