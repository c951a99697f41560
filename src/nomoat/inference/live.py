"""Decoding a model under training: its LoRA layers' base weights packed once, their adapters read live.

A `LoRALinear` of the user's model (what training updates) decodes as a `LiveLoRALinear`: its frozen base in the
decode form `prepare` gives any linear layer (fp32 panels, a bf16 weight read in place, int8 / int4 panels), made
once, and its adapter as a decode-stack entry whose `A` is a view of the trained `lora_A` weight and whose `B^T` is
a copy refreshed when `lora_B` changes (an optimizer step writes it in place): so the one-call decode stack
(`stack.py`) runs the model being trained, with no copy of base weights per step. Every row of every step uses the
live adapter, through one `LiveAdapters` source per decode model (the decode stack's coefficient column `LIVE`).

The copies are refreshed by `sync`, which the layer runs at each forward pass of its own (prefill: every request
starts with one) and when the stack's plan is built; a decode step then reads them as they are. The user's layer is
never changed. `disable_lora` (the reference model) switches the adapter off; a merged layer decodes its merged
weight alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nomoat.lora.delta import lora_delta
from nomoat.lora.layers import LoRALinear

LIVE = "live"  # the decode stack's adapter slot of the live adapters
MAX_STACK_RANK = 256  # the largest rank the decode stack takes (`MAX_LORA_RANK` in csrc/stack_lora.h)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


class LiveAdapters:
    """The adapter source of a decode model's live layers: every row uses `LIVE` with weight 1 (`stack.Plan`)."""

    def __init__(self) -> None:
        self.current: list[tuple[slice, tuple[tuple[str, float], ...]]] = [(slice(None), ((LIVE, 1.0),))]

    def compact(self) -> None:
        """Nothing to move: the factors are the trained parameters (or copies the size of one of them)."""


_NO_ADAPTER = LiveAdapters()
_NO_ADAPTER.current = []  # the source of a layer that lost its adapter (merged): no row uses any


class LiveLoRALinear(nn.Module):
    """The decode form of a `LoRALinear`: its base packed once, plus its adapter as it is now (module docstring).

    Args:
        layer: The user's LoRA layer (not registered as a child, so the twin's traversals leave it alone).
        base: The decode form of its frozen base (`x W^T + b`).
        source: The decode model's `LiveAdapters`.
    """

    def __init__(self, layer: LoRALinear, base: nn.Module, source: LiveAdapters) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._source = [source]  # a list, so it is not registered
        self._take(layer, base)

    def _take(self, layer: LoRALinear | None, base: nn.Module) -> None:
        """Decode `layer` (None: no adapter, `base` alone) over `base`; the factors' buffers made anew."""
        object.__setattr__(self, "layer", layer)
        self._modules["base"] = base
        self._state: tuple[Any, ...] = ()
        if layer is None:
            self.a = self.bt = None
            return
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: `sync` writes them in any mode
            self.a = layer.lora_A.weight.detach()  # (r, in): a view of the trained weight
            self.bt = layer.lora_B.weight.detach().t().contiguous()  # (r, out)
        self.sync()

    def __setattr__(self, name: str, value: Any) -> None:
        """`DecodeModel.refresh` gives a changed layer's new decode form as `base`: this layer takes it over."""
        if name == "base" and "base" in self._modules:
            if isinstance(value, LiveLoRALinear):
                self._take(value.layer, value.base)
            else:  # a merged layer's plain form (or one the stack cannot read): no adapter of its own
                self._take(None, value)
            return
        super().__setattr__(name, value)

    def sync(self) -> None:
        """Refresh the decode stack's copies of the adapter if the user's layer changed (cheap when it did not)."""
        layer = self.layer
        if layer is None:
            return
        a, b = layer.lora_A.weight, layer.lora_B.weight
        state = (a.data_ptr(), _version(a), b.data_ptr(), _version(b), layer.disabled, layer.merged)
        if state == self._state:
            return
        with torch.no_grad():
            if a.data_ptr() != self.a.data_ptr():  # the weight was given new storage: the plan keeps the old one
                self.a.copy_(a)
            if layer.disabled or layer.merged:
                self.bt.zero_()
            else:
                self.bt.copy_(b.t())
        self._state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x)` plus the adapter's update as the user's layer holds it now (..., out)."""
        self.sync()
        y = self.base(x)
        layer = self.layer
        if layer is None or layer.disabled or layer.merged:
            return y
        a, b = layer.lora_A.weight, layer.lora_B.weight
        delta = lora_delta(x.reshape(-1, x.shape[-1]).to(a.dtype), a, b, layer.scaling)  # (N, out)
        return y + delta.view(y.shape).to(y.dtype)

    def decode_passthrough(self) -> tuple[nn.Module, LiveAdapters]:
        """The base's decode form and the source of the live adapter (the decode stack reads both)."""
        return self.base, self._source[0] if self.layer is not None else _NO_ADAPTER

    def decode_adapters(self) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """`(LIVE, A (r, in), Bt (r, out), scaling)` for the decode stack (none without an adapter)."""
        if self.layer is None:
            return []
        self.sync()
        return [(LIVE, self.a, self.bt, float(self.layer.scaling))]


def live_layer(layer: LoRALinear, pack: Callable[[nn.Module], nn.Module], source: LiveAdapters) -> nn.Module | None:
    """The decode form of a LoRA layer: `LiveLoRALinear` over `pack(its base)`, the merged base packed, or None.

    None where the stack cannot hold its adapter (DoRA's rescaling, a quantized base with a bias of its own, a rank
    above the stack's, another device): the caller then runs the layer itself.
    """
    if layer.lora_magnitude_vector is not None or layer.r > MAX_STACK_RANK:
        return None
    if layer.lora_A.weight.device.type != "cpu" or not layer.lora_A.weight.is_contiguous():
        return None
    if layer.qbase is not None:
        if layer.bias is not None or layer.merged:
            return None
        base = layer.qbase
    else:
        base = layer.to_base()  # an `nn.Linear` sharing the weight and bias tensors
    packed = pack(base)
    if layer.merged:
        return packed
    return LiveLoRALinear(layer, packed, source)
