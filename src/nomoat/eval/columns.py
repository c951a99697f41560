"""The base model and each adapter as columns of one comparison, all over a single loaded base model.

One `Engine` holds every adapter it can apply per row (plain LoRA) in its `AdapterBank`: generation requests of
all those columns share one continuous batch, and a log-likelihood forward selects its column with the bank's row
plan. Adapters a shared base cannot apply per row (DoRA, `modules_to_save`) are merged into the base weights for
their turn and taken back out afterwards (the touched tensors are snapshotted and restored exactly), so the base
model is never reloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nomoat.generate.engine import AdapterSelection, Engine
from nomoat.lora.apply import merge_adapters
from nomoat.lora.bank import MultiLoRALinear
from nomoat.lora.inject import match_targets
from nomoat.lora.peft_format import AdapterError, read_adapter_config
from nomoat.tokenizer import Tokenizer

__all__ = ["BASE", "AdapterSpec", "Column", "Columns", "normalise_adapters"]

BASE = "base"
# An adapter: a PEFT-format folder, or (folder, weight).
AdapterSpec = str | Path | tuple[str | Path, float]


def normalise_adapters(adapters: Mapping[str, AdapterSpec] | None) -> dict[str, tuple[Path, float]]:
    """`{name: folder or (folder, weight)}` -> `{name: (folder, weight)}`.

    Raises:
        ValueError: An adapter is named like the base column.
    """
    out: dict[str, tuple[Path, float]] = {}
    for name, spec in (adapters or {}).items():
        if name == BASE:
            raise ValueError(f"an adapter cannot be named {BASE!r}: that is the base model's column")
        folder, weight = spec if isinstance(spec, tuple) else (spec, 1.0)
        out[name] = (Path(folder).expanduser(), float(weight))
    return out


@dataclass
class Column:
    """How to run one column: the engine to generate with, its adapter selection, and a forward-pass context.

    Attributes:
        name: `"base"` or the adapter's name.
        engine: The engine (shared by all columns).
        selection: What to pass as `adapter=` to `engine.submit` (empty for the base and merged adapters).
        forward: `forward(batch_size)` gives the context inside which a `model(...)` call over a batch of that many
            rows computes this column's outputs.
        model: The model to call for log-likelihoods: the base model, or the engine's decode model for an adapter
            in the engine's bank (the bank wraps the decode model's layers, not the base model's).
    """

    name: str
    engine: Engine
    selection: AdapterSelection
    forward: Callable[[int], contextlib.AbstractContextManager]
    model: nn.Module


class Columns:
    """The base model (column `"base"`) and adapters (a column each) over one base model.

    Args:
        model: The base model (full precision when a DoRA or `modules_to_save` adapter must be merged).
        tokenizer: Its tokenizer.
        adapters: `{name: folder or (folder, weight)}`.
        include_base: Whether the base model is a column.
        max_running: Rows decoded together by the engine.
        max_seq_len: Tokens per engine row (prompt plus completion); default the engine's.

    Raises:
        AdapterError: An adapter folder is unusable for this model.
        ValueError: An adapter is named `"base"`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        adapters: Mapping[str, AdapterSpec] | None = None,
        include_base: bool = True,
        max_running: int = 8,
        max_seq_len: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        specs = normalise_adapters(adapters)
        self.names = ([BASE] if include_base else []) + list(specs)
        self.engine = Engine(model, tokenizer, max_running=max_running, max_seq_len=max_seq_len)
        self.banked: dict[str, float] = {}
        self.merged: dict[str, tuple[Path, float]] = {}
        for name, (folder, weight) in specs.items():
            cfg = read_adapter_config(folder)
            if cfg.use_dora and weight != 1.0:  # checked now, not after the other columns ran
                raise AdapterError(f"{folder}: a DoRA adapter cannot be weighted (its magnitude does not scale); "
                                   "use weight 1")  # fmt: skip
            if cfg.use_dora or cfg.modules_to_save:  # the bank refuses these: merge them in their turn
                self.merged[name] = (folder, weight)
            else:
                self.engine.add_adapter(name, folder)
                self.banked[name] = weight

    def close(self) -> None:
        """Give the model back as it came: the bank's per-row layers are replaced by the base layers again.

        Call it when done (or use `with Columns(...) as columns:`), so the model can be trained, merged or saved.
        """
        _unwrap(self.model)

    def __enter__(self) -> Columns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shared(self) -> list[str]:
        """Columns that run together in the shared engine (the base and per-row adapters), in column order."""
        return [n for n in self.names if n not in self.merged]

    def _bank_column(self, name: str) -> Column:
        if name == BASE:
            return Column(name, self.engine, (), lambda _: contextlib.nullcontext(), self.model)
        selection = ((name, self.banked[name]),)
        self.engine.refresh()  # the decode model follows the base model's weights (a merged column changes them)
        bank = self.engine.bank
        assert bank is not None
        return Column(name, self.engine, selection, lambda b: bank.plan([(slice(0, b), selection)]),
                      self.engine.decode.net)  # fmt: skip

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Column]:
        """Make `name` runnable inside the block (a merged adapter is merged, and taken back out on exit).

        Raises:
            KeyError: Not a column.
        """
        if name not in self.names:
            raise KeyError(f"no column {name!r} (columns: {', '.join(self.names)})")
        if name not in self.merged:
            yield self._bank_column(name)
            return
        folder, weight = self.merged[name]
        cache, self.engine.prefix_cache = self.engine.prefix_cache, None  # cached keys belong to other weights
        try:
            with _bank_layers_removed(self.model), _merged(self.model, folder, weight):
                yield Column(name, self.engine, (), lambda _: contextlib.nullcontext(), self.model)
        finally:
            self.engine.prefix_cache = cache


def _unwrap(model: nn.Module) -> list[tuple[nn.Module, str, MultiLoRALinear]]:
    """Put each bank-wrapped layer's base layer back in place; returns `(parent, child name, wrapper)`s."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
            swapped.append((parent, child, module))
    return swapped


@contextlib.contextmanager
def _bank_layers_removed(model: nn.Module) -> Iterator[None]:
    """Plain layers inside the block (merging needs them), the bank's wrappers again after it."""
    swapped = _unwrap(model)
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def _module_names(model: nn.Module, folder: Path) -> list[str]:
    """Modules that merging the adapter in `folder` changes: its LoRA targets and its `modules_to_save`."""
    cfg = read_adapter_config(folder)
    names = list(match_targets(model, cfg))
    for target in cfg.modules_to_save or []:
        names += [n for n, _ in model.named_modules() if n and (n == target or n.endswith("." + target))]
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def _merged(model: nn.Module, folder: Path, weight: float) -> Iterator[None]:
    """Merge one adapter into the base weights inside the block; the touched modules come back exactly on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}  # loading an adapter freezes the base
    saved = []
    for name in _module_names(model, folder):
        module = model.get_submodule(name)
        params = {leaf: (p, p.detach().clone()) for leaf, p in module._parameters.items() if p is not None}
        saved.append((name, module, params))
    try:
        merge_adapters(model, [(folder, weight)])
        yield
    finally:
        with torch.no_grad():
            for name, module, params in saved:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module)  # merging replaced target layers by new plain layers
                for leaf, (p, value) in params.items():
                    module._parameters[leaf] = p  # a tied weight trained fully got an untied copy
                    p.copy_(value)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for attr in ("lora_config", "lora_modules_to_save"):
            if hasattr(model, attr):
                delattr(model, attr)
