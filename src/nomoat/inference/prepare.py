"""`prepare(model, config) -> DecodeModel`: the one place that packs, quantizes and fuses weights for decoding.

The user's model (what `nomoat.load` returned: plain modules, Hugging Face names, what training and export see) is
never changed. `prepare` builds a twin of its module tree: container modules are copied (so an adapter bank can wrap
the twin's layers), embeddings, norms and rotary tables are shared, and each linear layer gets its decode form:
- fp32 CPU `nn.Linear`: fp32 panels (or int8 panels with `quantize="int8"`);
- bf16 CPU `nn.Linear` (a bf16 model): a `Bf16Linear` reading the user's weight in place (no copy; a tied output
  head reads the embedding), or int8 panels with "int8";
- `PackedLinear` (`nomoat.models.packed.pack_model`, what the inference commands load): its own panels, shared, so
  the weights exist once;
- int8 `QuantizedLinear`: its own int8 panels, shared; int4 `QuantizedLinear`: its 4-bit panels, shared
  (`Q4PanelLinear`; with `quantize="int4"`, fp32 / bf16 layers are quantized to them, the output head to int8
  panels: `nomoat.models.quantize.layer_mode`);
- a `LoRALinear` (a model with LoRA injected, e.g. under training): `LiveLoRALinear` (`live.py`), its base in the
  decode form above (packed once) and its adapter read live by the decode stack; where the stack cannot hold the
  adapter (DoRA, a rank above 256), `LiveLayer`, which runs the user's layer as it is at each call;
- anything else (another device), or no compiled kernels: the layer itself.
With the compiled kernels and a Llama/Mistral/Qwen2-style model, decode steps then run as one call (`stack.py`);
other fp32 models run their layers with one attention call per layer at decode (`attention.py`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nomoat import kernels
from nomoat.inference.attention import KernelAttention
from nomoat.inference.bf16_linear import Bf16Linear
from nomoat.inference.decode_model import DecodeModel
from nomoat.inference.live import LiveAdapters, live_layer
from nomoat.inference.panel_linear import PanelLinear, Q4PanelLinear
from nomoat.lora.layers import LoRALinear
from nomoat.models.packed import PackedLinear
from nomoat.models.quantize import QuantizedLinear, layer_mode, quantize_model
from nomoat.models.transformer import Attention

LINEAR_TYPES = (nn.Linear, PackedLinear, QuantizedLinear)


def _stack_default() -> bool:
    return os.environ.get("NOMOAT_DECODE_STACK", "1") != "0"


@dataclass
class DecodeConfig:
    """How `prepare` makes a model's decode form.

    Attributes:
        quantize: None, or "int8" / "int4": weight-only quantization of the fp32 linear layers for decoding.
        stack: Run decode steps through the one-call stack where the model qualifies (`NOMOAT_DECODE_STACK=0`
            turns it off by default, for comparisons).
    """

    quantize: str | None = None
    stack: bool = field(default_factory=_stack_default)


class LiveLayer(nn.Module):
    """A leaf running a layer of the user's model as it is at each call (a LoRA layer: base and live adapter).

    The layer is not a registered child: the twin's traversals (`eval()`, packing) leave the user's layer alone.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output (..., out_features)."""
        return self.layer(x)


def decode_layer(layer: nn.Module, quantize: str | None = None) -> nn.Module:
    """A linear layer's decode form: `Bf16Linear`/`PanelLinear` where the kernels take it, else quantized or itself."""
    if isinstance(layer, LoRALinear):
        return LiveLayer(layer)  # its adapter decodes as it is now: nothing of it is packed
    if kernels.available() and quantize is None:
        shared = Bf16Linear.from_module(layer)
        if shared is not None:
            return shared
    if kernels.available() and quantize in (None, "int8"):
        panel = PanelLinear.from_module(layer, quantize)
        if panel is not None:
            return panel
    if kernels.available() and quantize in (None, "int4"):
        q4 = Q4PanelLinear.from_module(layer, quantize)  # int4 layers: 4-bit panels (shared or quantized here)
        if q4 is not None:
            return q4
    if quantize is not None and type(layer) is nn.Linear:
        holder = nn.Sequential(layer)
        quantize_model(holder, quantize)
        return holder[0]
    return layer


def _twin(
    module: nn.Module, path: str, packed: dict[str, nn.Module], make_layer: Callable[[nn.Module], nn.Module],
    fp32_cpu: bool,
) -> nn.Module:
    """A copy of `module`'s tree down to its leaves: linear layers in decode form, other leaves shared.

    `fp32_cpu`: the model computes in fp32 on the CPU (its attention layers may then decode through the kernels).
    """
    if isinstance(module, (*LINEAR_TYPES, LoRALinear)):
        packed[path] = module  # the source of the twin's layer at `path` (watched by `DecodeModel.stale`)
        return make_layer(module)
    if not module._modules:
        return module  # embeddings, norms: shared
    twin = copy.copy(module)
    twin._modules = {
        name: None if child is None else _twin(child, f"{path}.{name}" if path else name, packed, make_layer, fp32_cpu)
        for name, child in module._modules.items()
    }
    twin._parameters = dict(module._parameters)
    twin._buffers = dict(module._buffers)
    if fp32_cpu and type(module) is Attention and module.cfg.attn_logit_softcap is None and kernels.available():
        twin.__class__ = KernelAttention  # the twin's own copy: the user's module keeps its class
    return twin


def prepare(model: nn.Module, config: DecodeConfig | None = None) -> DecodeModel:
    """The decode form of a nomoat `Transformer` (see the module docstring); `model` itself is not changed.

    Args:
        model: The model to decode with (eval mode is set on the twin only).
        config: Quantization and stack options (default: `DecodeConfig()`).
    """
    config = config or DecodeConfig()
    packed: dict[str, nn.Module] = {}
    fp32_cpu = model.dtype == torch.float32 and model.device.type == "cpu"
    live = LiveAdapters()  # one source for every live LoRA layer: the stack's coefficient column of the adapter

    def make_layer(layer: nn.Module) -> nn.Module:
        quantize = config.quantize
        if quantize and layer is getattr(model, "lm_head", None):
            quantize = layer_mode("lm_head", quantize)  # int4: the output head gets int8 panels
        if isinstance(layer, LoRALinear):
            made = live_layer(layer, lambda base: decode_layer(base, quantize), live)
            if made is not None:
                return made
        return decode_layer(layer, quantize)

    net = _twin(model, "", packed, make_layer, fp32_cpu).eval()
    return DecodeModel(model, net, packed, make_layer, stack=config.stack)
