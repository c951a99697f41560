"""Many LoRA adapters over one frozen base model, chosen per row group of a batch (multi-adapter serving).

`AdapterBank(model)` wraps each linear layer an added adapter targets in a `MultiLoRALinear`: the base matmul runs
once for the whole batch, and each group of rows sharing an adapter selection adds `weight * scaling * (x A^T) B^T`
for every adapter of its selection: every group of a layer in one `kernels.lora_rows_` call (fp32 activations on the
CPU with the compiled kernels: the CPU form of S-LoRA's and Punica's segmented kernels), else in grouped matmuls or
a loop of small ones. A layer holds its adapters stacked once (`a_stack` (N, r, in), `bt_stack` (N, r, out)); base
weights are never changed, so any base works (plain, packed, quantized). Around each forward pass the engine sets
which rows use which selection with `with bank.plan([(rows, (("sql", 1.0),)), ...]):` (`group_rows` builds the
entries); the decode stack reads the same stacks through `MultiLoRALinear.decode_adapters`. The bank holds the
factors of every adapter in one dtype (`adapter_dtype`, see `resolve_adapter_dtype`): bf16 halves the bytes a decode
step with many distinct adapters streams; the compiled kernels widen bf16 factors to fp32 and sum in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from nomoat import kernels
from nomoat.config.lora import LoRAConfig
from nomoat.kernels import hugepages
from nomoat.lora.delta import lora_delta
from nomoat.lora.peft_format import WEIGHTS_FILE, AdapterError, _from_peft_state, _read_tensors, read_adapter_config
from nomoat.lora.selection import AdapterSelection, SelectionError

# (rows of the batch, ((adapter name, weight), ...)): rows as a slice or a 1-D index tensor.
# The row groups of a layer run segmented (as Punica's SGMV kernel) instead of as a loop of small ops per group:
# fp32 activations on the CPU with the compiled kernels, every group in one `kernels.lora_rows_` call (ROWS_KERNEL);
# otherwise several groups as two grouped matmuls over the layer's stacked adapters, `torch._grouped_mm` (torch >=
# 2.8; on the CPU it measured 2-4x faster than the loop for 32 groups). With GROUPED_MM off, or on other devices,
# the loop runs.
GROUPED_MM = hasattr(torch, "_grouped_mm")
ROWS_KERNEL = True
PlanEntry = tuple["slice | torch.Tensor", tuple[tuple[str, float], ...]]
ADAPTER_DTYPES = ("auto", "float32", "bfloat16")


def resolve_adapter_dtype(choice: str, file_dtypes: set[torch.dtype], model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a bank keeps one adapter's factors in (`AdapterBank(adapter_dtype=...)`).

    "float32" and "bfloat16" are what they say (bfloat16 rounds fp32 factors to nearest even). "auto" never rounds
    what the adapter file holds unless the base itself computes in bf16: bfloat16 when the file's factors are all
    bf16 (as PEFT saves adapters trained on bf16 models) or the model's weights are bf16, else the model's dtype.

    Raises:
        ValueError: An unknown choice.
    """
    if choice not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {choice!r}")
    if choice != "auto":
        return getattr(torch, choice)
    if file_dtypes == {torch.bfloat16} or model_dtype == torch.bfloat16:
        return torch.bfloat16
    return model_dtype


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
        self.layout: tuple[tuple[str, int, float], ...] = ()  # (adapter, rank, scaling) in stack order
        self.a_stack: torch.Tensor | None = None
        self.bt_stack: torch.Tensor | None = None
        self.compacted = False  # the stacks lie in the bank's huge-page buffer (`AdapterBank.compact`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x)`, plus each row group's adapters."""
        y = self.base(x)
        bank = self._bank[0]
        if not bank.current:
            return y
        if GROUPED_MM and ROWS_KERNEL and self.a_stack is not None and _rows_kernel(x, y, self.a_stack):
            rows, which, coef = bank.row_plan(self.layout, x)
            if rows.numel():
                kernels.lora_rows_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.a_stack, self.bt_stack,
                                   rows, which, coef)  # fmt: skip
            return y
        plan = bank.grouped_plan(self.layout, x) if len(bank.current) > 1 and self.layout else None
        if plan is not None:  # several row groups: all of them in two grouped matmuls
            perm, offs, coeff = plan
            x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            a_stack, bt_stack = self.a_stack.to(x.dtype), self.bt_stack.to(x.dtype)  # factors kept in another dtype
            xa = torch._grouped_mm(x2.index_select(0, perm), a_stack.transpose(1, 2), offs=offs)  # (M, r)
            xa *= coeff
            y2.index_add_(0, perm, torch._grouped_mm(xa, bt_stack, offs=offs).to(y.dtype))  # (M, out)
            return y
        for rows, selection in bank.current:
            delta = None
            for adapter, weight in selection:
                ab = bank.tensors[adapter].get(self.name)
                if ab is None:  # this adapter does not target this layer
                    continue
                a, bt, scaling = ab
                d = lora_delta(x[rows], a.to(x.dtype), bt.t().to(x.dtype), scaling * weight)  # (rows, T, out)
                delta = d if delta is None else delta + d
            if delta is not None:
                if isinstance(rows, slice):
                    y[rows] += delta.to(y.dtype)
                else:
                    y.index_add_(0, rows, delta.to(y.dtype))
        return y

    def decode_passthrough(self) -> tuple[nn.Module, AdapterBank]:
        """The base layer, and the bank whose `current` plan says whether adapters apply to a step.

        The decode stack (`nomoat.inference.stack`) runs the base layers and adds the adapters' terms itself.
        """
        return self.base, self._bank[0]

    def decode_adapters(self) -> list[tuple[str, torch.Tensor, torch.Tensor, float]]:
        """(adapter name, A (r, in), Bt (r, out), scaling) of each adapter on this layer, for the decode stack.

        Views of `a_stack` / `bt_stack` (ranks zero-padded to the largest), so they change when `rebuild` runs.
        """
        if self.a_stack is None:
            return []
        return [(name, self.a_stack[i], self.bt_stack[i], scaling) for i, (name, _, scaling) in enumerate(self.layout)]

    def rebuild(self) -> None:
        """Stack this layer's adapters into `a_stack` (N, r, in) and `bt_stack` (N, r, out).

        Ranks are zero-padded to the largest (exact: padded rows of A and B are zero). The bank's per-adapter
        tensors become views into the stacks, so adapter weights are held once.
        """
        bank = self._bank[0]
        self.compacted = False
        entries = [(name, t[self.name]) for name, t in sorted(bank.tensors.items()) if self.name in t]
        self.layout = tuple((name, ab[0].shape[0], ab[2]) for name, ab in entries)
        if not entries:
            self.a_stack = self.bt_stack = None
            return
        r = max(ab[0].shape[0] for _, ab in entries)
        a0, bt0 = entries[0][1][0], entries[0][1][1]
        dtype = bank.factor_dtype or a0.dtype
        self.a_stack = a0.new_zeros(len(entries), r, a0.shape[1], dtype=dtype)
        self.bt_stack = bt0.new_zeros(len(entries), r, bt0.shape[1], dtype=dtype)
        for i, (name, (a, bt, scaling)) in enumerate(entries):
            k = a.shape[0]
            self.a_stack[i, :k], self.bt_stack[i, :k] = a, bt
            bank.tensors[name][self.name] = (self.a_stack[i, :k], self.bt_stack[i, :k], scaling)


class AdapterBank:
    """Named LoRA adapters over one model, for batches whose rows use different adapters.

    Args:
        model: The base model (a nomoat `Transformer`), typically in eval mode for inference; its target layers are
            wrapped in place as adapters that target them are added.
        adapter_dtype: "auto", "float32" or "bfloat16": the dtype each added adapter's factors are kept in
            (`resolve_adapter_dtype`). The bank holds all of them in one dtype: that one where every adapter's
            agrees, else fp32 (which holds bf16 values exactly), so an adapter is never rounded because of another.

    Raises:
        ValueError: An unknown `adapter_dtype`.
    """

    def __init__(self, model: nn.Module, adapter_dtype: str = "auto") -> None:
        resolve_adapter_dtype(adapter_dtype, set(), torch.float32)  # validates the choice
        self.model = model
        self.adapter_dtype = adapter_dtype
        self.tensors: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}  # each adapter's own resolved dtype
        self.configs: dict[str, LoRAConfig] = {}
        self.current: list[PlanEntry] = []
        self._grouped: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = {}

    @property
    def names(self) -> list[str]:
        """The loaded adapters' names, sorted."""
        return sorted(self.tensors)

    @property
    def factor_dtype(self) -> torch.dtype | None:
        """The dtype the bank's factors are in (None without adapters): the adapters' own, or fp32 where they differ."""
        found = set(self.dtypes.values())
        return None if not found else found.pop() if len(found) == 1 else torch.float32

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
            raise AdapterError(
                f"{path}: a DoRA adapter cannot be applied per request on a shared base: its magnitude vector "
                "rescales every column of the adapted weight W + BA, so it needs its own copy of the weights",
                hint=f"merge it into the base and serve that: `nomoat export BASE --adapter {path} --out DIR`, then "
                "`nomoat serve DIR` (nomoat generate, chat and eval merge it with --merge)",
            )  # fmt: skip
        if cfg.modules_to_save:
            raise AdapterError(f"{path}: the adapter trains {', '.join(cfg.modules_to_save)} fully, which cannot be "
                               "switched per request; merge it into the model instead (--merge)")  # fmt: skip
        modules = dict(self.model.named_modules())
        incoming = _from_peft_state(self.model, _read_tensors(path), path / WEIGHTS_FILE)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in incoming.items():
            module, _, leaf = key.rpartition(".lora_")
            if leaf not in ("A.weight", "B.weight"):
                raise AdapterError(f"{path / WEIGHTS_FILE}: unexpected tensor {key}")
            pairs.setdefault(module, {})[leaf[0]] = value
        device, model_dtype = _device_dtype(self.model)
        dtype = resolve_adapter_dtype(self.adapter_dtype, {v.dtype for v in incoming.values()}, model_dtype)
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
            loaded[module] = (a.to(device, dtype).contiguous(), b.t().to(device, dtype).contiguous(), cfg.scaling)
        before = self.factor_dtype
        self.tensors[name] = loaded
        self.dtypes[name] = dtype
        self.configs[name] = cfg
        for module in loaded:
            self._wrap(module).rebuild()
        if self.factor_dtype != before:
            self._rebuild_all()
        return cfg

    def remove(self, name: str) -> None:
        """Forget an adapter (its layers stay wrapped; they cost nothing without adapters)."""
        before = self.factor_dtype
        gone = self.tensors.pop(name, None) or {}
        self.dtypes.pop(name, None)
        self.configs.pop(name, None)
        modules = dict(self.model.named_modules())
        for module in gone:
            layer = modules.get(module)
            if isinstance(layer, MultiLoRALinear):
                layer.rebuild()
        if self.factor_dtype != before and self.tensors:
            self._rebuild_all()

    def _rebuild_all(self) -> None:
        """Restack every layer: the bank's factor dtype changed (the values held are exact in either dtype)."""
        for m in self.model.modules():
            if isinstance(m, MultiLoRALinear) and m._bank[0] is self:
                m.rebuild()

    def compact(self) -> None:
        """Move every layer's adapter stacks into one buffer in huge pages (`kernels.hugepages`).

        The decode stack streams the factors of every adapter in a step from memory: in small separate allocations
        of 4 KiB pages, a step with many distinct adapters spends much of its time on TLB misses. Values and
        layouts are unchanged; the per-adapter tensors become views into the new stacks.
        """
        layers = [m for m in self.model.modules() if isinstance(m, MultiLoRALinear) and m.a_stack is not None]
        if all(m.compacted for m in layers):
            return
        dtype = layers[0].a_stack.dtype
        if any(m.a_stack.dtype != dtype or m.a_stack.device.type != "cpu" for m in layers):
            return
        arena = hugepages.empty((sum(m.a_stack.numel() + m.bt_stack.numel() for m in layers),), dtype)
        at = 0
        for m in layers:
            stacks = []
            for t in (m.a_stack, m.bt_stack):
                stacks.append(arena[at : at + t.numel()].view(t.shape).copy_(t))
                at += t.numel()
            m.a_stack, m.bt_stack = stacks
            m.compacted = True
            for i, (name, rank, scaling) in enumerate(m.layout):
                self.tensors[name][m.name] = (m.a_stack[i, :rank], m.bt_stack[i, :rank], scaling)

    def _wrap(self, module: str) -> MultiLoRALinear:
        parent_name, _, child = module.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        current = getattr(parent, child)
        if not isinstance(current, MultiLoRALinear):
            current = MultiLoRALinear(current, module, self)
            setattr(parent, child, current)
        return current

    def check(self, selection: AdapterSelection | Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
        """Validate a selection against the loaded adapters; returns its `(name, weight)` pairs as a tuple.

        Raises:
            SelectionError: An unknown adapter (listing the loaded ones), a weight that is not finite, or an adapter
                named twice.
        """
        selection = AdapterSelection.of(selection)
        for name in selection.names:
            if name not in self.tensors:
                known = ", ".join(self.names) or "none"
                raise SelectionError(f"unknown adapter {name!r} (loaded: {known})", "select a loaded adapter by name")
        return selection.items

    @contextlib.contextmanager
    def plan(self, entries: Sequence[PlanEntry]) -> Iterator[None]:
        """Apply `entries` (rows, selection) to forward passes inside the block; rows not listed use the base."""
        previous, previous_grouped = self.current, self._grouped
        self.current = [(rows, sel) for rows, sel in entries if sel]
        self._grouped = {}
        try:
            yield
        finally:
            self.current, self._grouped = previous, previous_grouped

    def row_plan(
        self, layout: tuple[tuple[str, int, float], ...], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current plan as entries for a layer whose stacked adapters are `layout`, sorted by adapter.

        Returns `(rows, which, coef)`: the token row of `x` (flattened to (B*T, in)) of each entry (int64; a row
        with a stack of adapters appears once per adapter of the layer), its index in the stack (int64), and its
        `weight * scaling` (fp32). Empty where no row's selection reaches the layer. Cached per layout and shape for
        the plan's duration (the layers of a model share one layout, so one plan serves them all).
        """
        batch, tokens = x.shape[0], x[0].numel() // x.shape[-1]
        key = ("rows", layout, batch, tokens)
        if key not in self._grouped:
            index = {name: (i, scaling) for i, (name, _, scaling) in enumerate(layout)}
            entries = []  # (stack index, batch row, coefficient)
            for rows, sel in self.current:
                row_ids = range(batch)[rows] if isinstance(rows, slice) else rows.tolist()
                for name, weight in sel:
                    if name in index:
                        i, scaling = index[name]
                        entries.extend((i, row, weight * scaling) for row in row_ids)
            entries.sort(key=lambda e: (e[0], e[1]))
            row_t = torch.tensor([e[1] for e in entries], dtype=torch.long)
            token_rows = (row_t[:, None] * tokens + torch.arange(tokens)).reshape(-1)  # (M,)
            which = torch.tensor([e[0] for e in entries], dtype=torch.long).repeat_interleave(tokens)
            coef = torch.tensor([e[2] for e in entries], dtype=torch.float32).repeat_interleave(tokens)
            self._grouped[key] = (token_rows.to(x.device), which.to(x.device), coef.to(x.device))
        return self._grouped[key]

    def grouped_plan(
        self, layout: tuple[tuple[str, int, float], ...], x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The current plan in grouped-matmul form for a layer whose stacked adapters are `layout`.

        Returns `(perm, offs, coeff)`: the token rows of `x` (flattened to (B*T, in)) sorted by adapter (a row with
        a stack of adapters appears once per adapter), the cumulative row count per stacked adapter (int32, as
        `torch._grouped_mm` takes it), and each entry's `weight * scaling` (M, 1). None where grouped matmuls are
        not available (then the per-group loop runs) or no row's selection reaches the layer.
        """
        if not GROUPED_MM or x.device.type != "cpu":
            return None
        rows, which, coef = self.row_plan(layout, x)
        if not rows.numel():
            return None
        offs = torch.cumsum(torch.bincount(which, minlength=len(layout)), 0).to(torch.int32)
        return rows, offs, coef.to(x.dtype)[:, None]


def _rows_kernel(x: torch.Tensor, y: torch.Tensor, a_stack: torch.Tensor) -> bool:
    """Whether `kernels.lora_rows_` applies a layer's adapters: fp32 CPU activations, fp32 or bf16 factors."""
    return (
        x.dtype == y.dtype == torch.float32
        and a_stack.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
        and kernels.available()
    )


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def group_rows(
    selections: Sequence[AdapterSelection | tuple[tuple[str, float], ...]], device: torch.device
) -> list[PlanEntry]:
    """A plan from each batch row's selection: rows sharing a selection form one group (a slice when contiguous)."""
    groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
    for row, sel in enumerate(selections):
        if sel:
            groups.setdefault(tuple(sel), []).append(row)
    plan: list[PlanEntry] = []
    for sel, rows in groups.items():
        if rows == list(range(rows[0], rows[-1] + 1)):
            plan.append((slice(rows[0], rows[-1] + 1), sel))
        else:
            plan.append((torch.tensor(rows, device=device), sel))
    return plan
