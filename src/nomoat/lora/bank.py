"""Many LoRA adapters over one frozen base model, applied per row group of a batch (for serving).

`AdapterBank(model)` wraps every linear layer that an added adapter targets in a `MultiLoRALinear`. A forward pass
then runs the base matmul once for the whole batch, and for each group of rows that share an adapter selection adds
`weight * scaling * (x A^T) B^T` for every adapter of the selection: the CPU form of the segmented-gather kernels of
S-LoRA and Punica. Adapter tensors are loaded once and never copied per token; the base weights are never changed,
so any base works (plain, oneDNN-packed, int8/int4-quantized).

The plan of a forward pass (which rows use which selection) is set with `bank.plan(...)` around the call:

    >>> bank = AdapterBank(model)
    >>> bank.add("sql", "adapters/sql")
    >>> with bank.plan([(slice(0, 2), (("sql", 1.0),))]):
    ...     logits = model(ids)  # rows 0-1 with the "sql" adapter, the others with the base alone
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from nomoat.config.lora import LoRAConfig
from nomoat.lora.peft_format import WEIGHTS_FILE, AdapterError, _from_peft_state, _read_tensors, read_adapter_config

# (rows of the batch, ((adapter name, weight), ...)): rows as a slice or a 1-D index tensor.
PlanEntry = tuple["slice | torch.Tensor", tuple[tuple[str, float], ...]]


class MultiLoRALinear(nn.Module):
    """A frozen base layer plus the adapters of a bank, chosen per row group by the bank's current plan.

    Args:
        base: The base layer (`nn.Linear` or any module with `in_features`/`out_features` computing `x W^T + b`).
        name: The layer's module name in the model (the key of its adapter tensors).
        bank: The owning bank (holds the tensors and the plan).
    """

    def __init__(self, base: nn.Module, name: str, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._bank = [bank]  # a list, so the bank is not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x)`, plus each row group's adapters."""
        y = self.base(x)
        bank = self._bank[0]
        for rows, selection in bank.current:
            delta = None
            for adapter, weight in selection:
                ab = bank.tensors[adapter].get(self.name)
                if ab is None:  # this adapter does not target this layer
                    continue
                a, b, scaling = ab
                d = (x[rows] @ a.t()) @ b.t()  # (rows, T, r) -> (rows, T, out)
                d = d * (scaling * weight)
                delta = d if delta is None else delta + d
            if delta is not None:
                if isinstance(rows, slice):
                    y[rows] += delta.to(y.dtype)
                else:
                    y.index_add_(0, rows, delta.to(y.dtype))
        return y


class AdapterBank:
    """Named LoRA adapters over one model, for batches whose rows use different adapters.

    Args:
        model: The base model (a nomoat `Transformer`), typically in eval mode for inference; its target layers are
            wrapped in place as adapters that target them are added.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.current: list[PlanEntry] = []

    @property
    def names(self) -> list[str]:
        """The loaded adapters' names, sorted."""
        return sorted(self.tensors)

    def add(self, name: str, folder: str | Path) -> LoRAConfig:
        """Load a PEFT-format LoRA adapter folder under `name`.

        Raises:
            AdapterError: The name is taken, the folder is not a usable adapter, or the adapter needs what a shared
                base cannot give per row (DoRA's rescaling, fully trained `modules_to_save`); merge those instead.
        """
        if name in self.tensors:
            raise AdapterError(f"an adapter named {name!r} is already loaded")
        path = Path(folder)
        cfg = read_adapter_config(path)
        if cfg.use_dora:
            raise AdapterError(f"{path}: a DoRA adapter cannot be applied per request on a shared base; merge it "
                               "into the model instead (nomoat generate/chat --adapter)")  # fmt: skip
        if cfg.modules_to_save:
            raise AdapterError(f"{path}: the adapter trains {', '.join(cfg.modules_to_save)} fully, which cannot be "
                               "switched per request; merge it into the model instead")  # fmt: skip
        modules = dict(self.model.named_modules())
        incoming = _from_peft_state(self.model, _read_tensors(path), path / WEIGHTS_FILE)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in incoming.items():
            module, _, leaf = key.rpartition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise AdapterError(f"{path / WEIGHTS_FILE}: unexpected tensor {key}")
            pairs.setdefault(module, {})[leaf[0]] = value
        device, dtype = _device_dtype(self.model)
        loaded: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for module, ab in sorted(pairs.items()):
            layer = modules.get(module)
            if isinstance(layer, MultiLoRALinear):
                layer = layer.base
            if layer is None or not hasattr(layer, "in_features"):
                raise AdapterError(f"{path / WEIGHTS_FILE}: the model has no linear layer {module}")
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{path / WEIGHTS_FILE}: {module} lacks lora_A or lora_B")
            a, b = ab["A"], ab["B"]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features or a.shape[0] != b.shape[1]:
                raise AdapterError(f"{path / WEIGHTS_FILE}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                                   f"the layer is {layer.out_features}x{layer.in_features}")  # fmt: skip
            loaded[module] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous(), cfg.scaling)
        for module in loaded:
            self._wrap(module)
        self.tensors[name] = loaded
        self.configs[name] = cfg
        return cfg

    def remove(self, name: str) -> None:
        """Forget an adapter (its layers stay wrapped; they cost nothing without adapters)."""
        self.tensors.pop(name, None)
        self.configs.pop(name, None)

    def _wrap(self, module: str) -> None:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        current = getattr(parent, child)
        if not isinstance(current, MultiLoRALinear):
            setattr(parent, child, MultiLoRALinear(current, module, self))

    def check(self, selection: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """Validate a selection: known names, finite weights; returns it as a tuple.

        Raises:
            ValueError: An unknown adapter (listing the loaded ones) or a bad weight.
        """
        out = []
        for name, weight in selection:
            if name not in self.tensors:
                known = ", ".join(self.names) or "none"
                raise ValueError(f"unknown adapter {name!r} (loaded: {known})")
            weight = float(weight)
            if not torch.isfinite(torch.tensor(weight)):
                raise ValueError(f"adapter {name!r}: weight {weight} is not finite")
            out.append((name, weight))
        return tuple(out)

    @contextlib.contextmanager
    def plan(self, entries: Sequence[PlanEntry]) -> Iterator[None]:
        """Apply `entries` (rows, selection) to forward passes inside the block; rows not listed use the base."""
        previous = self.current
        self.current = [(rows, sel) for rows, sel in entries if sel]
        try:
            yield
        finally:
            self.current = previous


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def group_rows(selections: Sequence[tuple[tuple[str, float], ...]], device: torch.device) -> list[PlanEntry]:
    """A plan from each batch row's selection: rows sharing a selection form one group (a slice when contiguous)."""
    groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
    for row, sel in enumerate(selections):
        if sel:
            groups.setdefault(sel, []).append(row)
    plan: list[PlanEntry] = []
    for sel, rows in groups.items():
        if rows == list(range(rows[0], rows[-1] + 1)):
            plan.append((slice(rows[0], rows[-1] + 1), sel))
        else:
            plan.append((torch.tensor(rows, device=device), sel))
    return plan
