"""The base model and each adapter as columns of one comparison (`Columns`, `Column`), over one loaded base model.

One `Engine` holds every adapter it can apply per row (plain LoRA) in its `AdapterBank`: generation requests of
all those columns share one continuous batch. Adapters a shared base cannot apply per row (DoRA, `modules_to_save`)
decode alone, in their turn, through `LoRALinear` layers put into the model for that turn. Log-likelihood scoring
(full-sequence forward passes) runs on the model with the column's adapter in `LoRALinear` layers too, the training
layers whose arithmetic follows PEFT's. With `merge=True` every adapter is instead merged into the base weights for
its turn. Whatever a turn puts into the model comes back out exactly afterwards (replaced modules are put back and
changed tensors restored), so the base model is never reloaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nomoat.generate.engine import Engine
from nomoat.lora.apply import merge_adapters
from nomoat.lora.bank import MultiLoRALinear
from nomoat.lora.inject import lora_layers, match_targets, unload_lora
from nomoat.lora.peft_format import AdapterError, load_adapter, read_adapter_config
from nomoat.lora.selection import AdapterSelection
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
        selection: What to pass as `adapter=` to `engine.submit` (empty for the base and for an adapter that is in
            the model's own layers for its turn).
        forward: `forward(batch_size)` gives the context inside which a plain `model(...)` call over a batch of
            that many rows computes this column's outputs (a no-op inside `Columns.scoring`).
    """

    name: str
    engine: Engine
    selection: AdapterSelection
    forward: Callable[[int], contextlib.AbstractContextManager]


class Columns:
    """The base model (column `"base"`) and adapters (a column each) over one base model.

    Args:
        model: The base model (full precision when a DoRA or `modules_to_save` adapter must be merged).
        tokenizer: Its tokenizer.
        adapters: `{name: folder or (folder, weight)}`.
        include_base: Whether the base model is a column.
        max_running: Rows decoded together by the engine.
        max_seq_len: Tokens per engine row (prompt plus completion); default the engine's.
        merge: Merge each adapter into the base weights for its turn instead of loading it into the engine's bank.

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
        merge: bool = False,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.merge = merge
        self.specs = normalise_adapters(adapters)
        self.names = ([BASE] if include_base else []) + list(self.specs)
        self.engine = Engine(model, tokenizer, max_running=max_running, max_seq_len=max_seq_len)
        self.banked: dict[str, float] = {}
        self.alone: dict[str, tuple[Path, float]] = {}  # adapters that decode alone, in their turn
        for name, (folder, weight) in self.specs.items():
            cfg = read_adapter_config(folder)
            if cfg.use_dora and weight != 1.0:  # checked now, not after the other columns ran
                raise AdapterError(f"{folder}: a DoRA adapter cannot be weighted (its magnitude does not scale); "
                                   "use weight 1")  # fmt: skip
            if merge or cfg.use_dora or cfg.modules_to_save:  # the bank refuses DoRA and modules_to_save
                self.alone[name] = (folder, weight)
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
        return [n for n in self.names if n not in self.alone]

    @property
    def merged(self) -> dict[str, tuple[Path, float]]:
        """The adapters that decode alone in their turn (merged with `merge=True`, else in `LoRALinear` layers)."""
        return self.alone

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(f"no column {name!r} (columns: {', '.join(self.names)})")

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Column]:
        """Make `name` decodable by the engine inside the block: a bank selection, or its adapter in the model.

        Raises:
            KeyError: Not a column.
        """
        self._check(name)
        if name == BASE:
            yield Column(name, self.engine, AdapterSelection(), _no_context)
            return
        if name in self.banked:
            selection = AdapterSelection(((name, self.banked[name]),))
            bank = self.engine.bank
            assert bank is not None
            yield Column(name, self.engine, selection, lambda b: bank.plan([(slice(0, b), tuple(selection))]))
            return
        cache, self.engine.prefix_cache = self.engine.prefix_cache, None  # cached keys belong to other weights
        try:
            with self._applied(name):
                yield Column(name, self.engine, AdapterSelection(), _no_context)
        finally:
            self.engine.prefix_cache = cache

    @contextlib.contextmanager
    def scoring(self, name: str) -> Iterator[Column]:
        """The trainable model computes column `name` inside the block: full-sequence forwards for log-likelihoods.

        The adapter is in `LoRALinear` layers (merged into the base weights with `merge=True`); the bank's layers
        are out of the model meanwhile.

        Raises:
            KeyError: Not a column.
        """
        self._check(name)
        if name == BASE:
            with _bank_layers_removed(self.model):
                yield Column(name, self.engine, AdapterSelection(), _no_context)
            return
        with self._applied(name):
            yield Column(name, self.engine, AdapterSelection(), _no_context)

    def _applied(self, name: str) -> contextlib.AbstractContextManager:
        folder, weight = self.specs[name]
        return _in_model(self.model, folder, weight, self.merge)


def _no_context(_: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


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
def _in_model(model: nn.Module, folder: Path, weight: float, merge: bool) -> Iterator[None]:
    """The adapter in `model` inside the block: in `LoRALinear` layers, or merged into the base weights (`merge`).

    The bank's layers are taken out meanwhile; on exit the touched modules and tensors come back exactly.
    """
    with _bank_layers_removed(model):
        flags = {p: p.requires_grad for p in model.parameters()}  # loading an adapter freezes the base
        cfg = read_adapter_config(folder)
        copied = set(cfg.modules_to_save or [])  # loaded into in place; merging also changes the target weights
        saved = []
        for name in _module_names(model, folder):
            module = model.get_submodule(name)
            keep = merge or any(name == t or name.endswith("." + t) for t in copied)
            params = {leaf: (p, p.detach().clone() if keep else None)
                      for leaf, p in module._parameters.items() if p is not None}  # fmt: skip
            saved.append((name, module, params))
        try:
            if merge:
                merge_adapters(model, [(folder, weight)])
            else:
                _load_layers(model, folder, weight)
            yield
        finally:
            if lora_layers(model):
                unload_lora(model)
            with torch.no_grad():
                for name, module, params in saved:
                    parent_name, _, child = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    setattr(parent, child, module)  # the adapter's layers replaced the target layers
                    for leaf, (p, value) in params.items():
                        module._parameters[leaf] = p  # a tied weight trained fully got an untied copy
                        if value is not None:
                            p.copy_(value)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            for attr in ("lora_config", "lora_modules_to_save"):
                if hasattr(model, attr):
                    delattr(model, attr)


def _load_layers(model: nn.Module, folder: Path, weight: float) -> None:
    """Put the adapter into `LoRALinear` layers of the model, its update times `weight` (a DoRA adapter: weight 1)."""
    load_adapter(model, folder)
    if weight != 1.0:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.mul_(weight)
