"""LoRA, rsLoRA, DoRA and QLoRA adapters: the layer, placement by name, merging, combining, and PEFT-format files.

`layers` (`LoRALinear`), `inject` (`inject_lora` places layers by target-module name), `merge` (pure merge, unmerge,
disable, adapter state dict), `peft_format` (`save_adapter` / `load_adapter`: the adapter folder that hands over
between train, generate, serve and export), `combine` (several adapters into one), `nf4` (QLoRA base weights).
Imported from their own paths (not re-exported here): `bank` (many adapters per batch), `apply` (merge saved
adapters into a base), `group` (grouped training of q/k/v and gate/up) and `registry` (named adapters).
"""

from nomoat.config.lora import LoRAConfig
from nomoat.lora.combine import METHODS as MERGE_METHODS
from nomoat.lora.combine import CombineError, Parent, combine, combine_adapters, save_combined
from nomoat.lora.delta import delta_weight, lora_delta
from nomoat.lora.inject import (
    count_parameters,
    inject_lora,
    lora_layers,
    lora_parameters,
    match_targets,
    trainable_parameters,
    unload_lora,
)
from nomoat.lora.layers import LoRALinear, QuantizedBaseMatmul
from nomoat.lora.merge import disable_lora, lora_state_dict, merge_lora, unmerge_lora
from nomoat.lora.nf4 import NF4_CODEBOOK, NF4Linear, dequantize_nf4, quantize_model_nf4, quantize_nf4
from nomoat.lora.peft_format import AdapterError, load_adapter, read_adapter_config, read_provenance, save_adapter
from nomoat.lora.selection import AdapterSelection, SelectionError, parse_selection

__all__ = [
    "AdapterError",
    "AdapterSelection",
    "SelectionError",
    "delta_weight",
    "lora_delta",
    "parse_selection",
    "CombineError",
    "MERGE_METHODS",
    "Parent",
    "combine",
    "combine_adapters",
    "save_combined",
    "LoRAConfig",
    "LoRALinear",
    "NF4Linear",
    "NF4_CODEBOOK",
    "QuantizedBaseMatmul",
    "count_parameters",
    "dequantize_nf4",
    "disable_lora",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "match_targets",
    "merge_lora",
    "quantize_model_nf4",
    "quantize_nf4",
    "read_adapter_config",
    "read_provenance",
    "save_adapter",
    "trainable_parameters",
    "unload_lora",
    "unmerge_lora",
]
