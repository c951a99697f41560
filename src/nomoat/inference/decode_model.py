"""`DecodeModel`: what the engine decodes with, built from the user's model by `prepare` and owned by the engine.

It holds `net`, a twin of the user's `Transformer`: its own module tree (so an adapter bank can wrap the twin's
layers, never the user's), sharing the user's embeddings, norms and rotary tables, with each linear layer in its
decode form (`PanelLinear`: panels, stored once; `Bf16Linear`: the user's bf16 weight read in place) or, where it
has none, the user's layer itself. Prefill runs the twin's layers (attention through
`scaled_dot_product_attention`). A decode step runs the one-call stack (`stack.py`) where the model qualifies (fp32,
int8 or bf16 weights; the stack's activations are fp32, its output is cast back to the model's dtype), else the twin's
layer loop (torch attention); which one is decided once, when the plan is built, never per token. Where the plan holds
the final norm and output head (`Plan.head`), a step's logits come from the same call.

The twin is a snapshot of the user's weights: `stale()` says whether the user's model changed since (a layer
replaced, a weight written in place or given new storage: merging an adapter into the base does both), and
`refresh()` repacks what changed. The engine asks when it admits requests, not per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nomoat.inference.stack import Plan, build_plan
from nomoat.models.kv_cache import KVCache

WEIGHT_NAMES = ("weight", "qweight", "scale", "panels", "bias")  # what a linear layer's decode form is made from


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be written outside inference mode)
        return -1


def _stamp(t: torch.Tensor | None) -> tuple[Any, ...]:
    """What identifies a tensor's contents cheaply: the object, its storage, its in-place write counter."""
    return (None,) if t is None else (id(t), t.data_ptr(), _version(t))


def _weights(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors a layer's decode form was built from."""
    found = (getattr(module, n, None) for n in WEIGHT_NAMES)
    return tuple(t if isinstance(t, torch.Tensor) else None for t in found)


class DecodeModel:
    """A model prepared for decoding (see the module docstring); call it like the `Transformer` it came from.

    Args:
        source: The user's model (read, never changed).
        net: The twin `Transformer` whose layers decode.
        packed: Module path -> the source layer each linear layer of `net` was made from (or is).
        make_layer: Builds a layer's decode form from a source layer (`prepare`'s packing).
        stack: Build the one-call decode stack where the model qualifies.
    """

    def __init__(
        self,
        source: nn.Module,
        net: nn.Module,
        packed: dict[str, nn.Module],
        make_layer: Callable[[nn.Module], nn.Module],
        stack: bool = True,
    ) -> None:
        self.source = source
        self.net = net
        self.config = net.config
        self.use_stack = stack
        self.stack_steps = 0  # decode steps run by the stack (for tests and benchmarks)
        self._make_layer = make_layer
        self._packed = dict(packed)
        self._stamps = self._stamp_all()
        self._watch()
        self.plan: Plan | None = None
        self.rebuild_plan()

    # ---- the snapshot -------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Record what `stale` compares: the user's model's module slots, linear tensors and norm weights.

        Linear layers' tensors by object, storage and write counter; norm weights by object and storage (the plan
        reads them in place, so in-place writes need nothing).
        """
        src = self.source
        self._edges = [(parent, name, child) for parent in src.modules() for name, child in parent._modules.items()]
        self._tensors = [(m, n, t, t.data_ptr(), _version(t)) for m in self._packed.values()
                         for n, t in zip(WEIGHT_NAMES, _weights(m)) if t is not None]
        self._norms = [(m, m.weight, m.weight.data_ptr()) for name, m in src.named_modules()
                       if "norm" in name.rsplit(".", 1)[-1] and isinstance(getattr(m, "weight", None), torch.Tensor)]

    def _stamp_all(self) -> tuple[tuple[Any, ...], ...]:
        """Per linear layer (in `_packed` order), the stamps of the tensors its decode form was made from."""
        return tuple(tuple(map(_stamp, _weights(m))) for m in self._packed.values())

    def _changed(self) -> list[tuple[str, nn.Module]]:
        """(path, the user's layer now) of every linear layer replaced or rewritten since its decode form was made."""
        out = []
        for (path, layer), stamps in zip(self._packed.items(), self._stamps):
            try:
                now = self.source.get_submodule(path)
            except AttributeError as e:
                raise ValueError(f"the model no longer has the layer {path}: prepare it again") from e
            if now is not layer or tuple(map(_stamp, _weights(now))) != stamps:
                out.append((path, now))
        return out

    def stale(self) -> bool:
        """Whether the user's model changed since the decode forms were made (modules, weights, norm storage)."""
        if any(parent._modules.get(name) is not child for parent, name, child in self._edges):
            return True
        for m, name, t, ptr, version in self._tensors:
            if getattr(m, name, None) is not t or t.data_ptr() != ptr or _version(t) != version:
                return True
        return any(m._parameters.get("weight") is not w or w.data_ptr() != ptr for m, w, ptr in self._norms)

    def refresh(self) -> bool:
        """Remake the decode form of every layer of the user's model that changed, then the plan; True if any did.

        Raises:
            ValueError: A layer the decode model was made from is gone from the model.
        """
        if not self.stale():
            return False
        for path, layer in self._changed():
            new = self._make_layer(layer)
            parent_name, _, child = path.rpartition(".")
            parent = self.net.get_submodule(parent_name) if parent_name else self.net
            current = getattr(parent, child)
            if hasattr(current, "decode_passthrough"):  # an adapter bank's layer: replace its base
                current.base = new
            else:
                setattr(parent, child, new)
            self._packed[path] = layer
        self._relink()
        self._stamps = self._stamp_all()
        self._watch()
        self.rebuild_plan()
        return True

    def _relink(self) -> None:
        """Share the user's current module wherever the twin shares a leaf (a norm, an embedding) that was replaced."""
        for path, module in self.source.named_modules():
            if not path or module._modules or path in self._packed:
                continue
            parent_name, _, child = path.rpartition(".")
            try:
                parent = self.net.get_submodule(parent_name) if parent_name else self.net
            except AttributeError:
                continue
            if parent._modules.get(child, module) is not module:
                setattr(parent, child, module)

    def rebuild_plan(self) -> None:
        """(Re)build the decode stack's plan from `net`'s layers: after adapters are added to or removed from a bank."""
        self.plan = None  # drop the old plan's references first
        if self.use_stack:
            banks = {id(b): b for m in self.net.modules() if hasattr(m, "decode_passthrough")
                     for b in (m.decode_passthrough()[1],)}  # fmt: skip
            for bank in banks.values():
                bank.compact()  # the stacks the plan streams, in huge pages
        self.plan = build_plan(self.net) if self.use_stack else None

    # ---- running ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of the model's embeddings (where inputs go)."""
        return self.net.device

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None = None,
        rows: slice | torch.Tensor | None = None,
        kv_len: int | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V) of tokens (B, T) at `position_ids`, written into `cache` rows (as `Transformer.forward`).

        With `return_hidden`, the final normed hidden states (B, T, D) instead.
        """
        stacked = self.plan is not None and input_ids.shape[1] == 1 and cache is not None
        if stacked and not isinstance(rows, torch.Tensor):  # a decode step (one token per row, rows a slice)
            if not return_hidden and self.plan.head:
                return self._stack_step(input_ids, position_ids, cache, rows, kv_len, logits=True)
            h = self._stack_step(input_ids, position_ids, cache, rows, kv_len)
            return h if return_hidden else self.net.logits(h)
        return self.net(input_ids, position_ids=position_ids, cache=cache, rows=rows, kv_len=kv_len,
                        return_hidden=return_hidden)  # fmt: skip

    forward = __call__

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output head on final hidden states (B, ..., D)."""
        return self.net.logits(hidden)

    def _stack_step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: slice | None,
        kv_len: int | None,
        logits: bool = False,
    ) -> torch.Tensor:
        """One token per row through every layer in one call: the final normed hidden states (B, 1, D).

        With `logits` (a plan with the head, `Plan.head`), the logits (B, 1, V) in the model's dtype instead, from the
        same call.
        """
        net, plan = self.net, self.plan
        B = ids.shape[0]
        row0 = 0 if rows is None else (rows.start or 0)
        kv_len = int(positions.max()) + 1 if kv_len is None else kv_len
        h = net.model.embed_tokens(ids)  # (B, 1, D)
        if net.config.embed_scale is not None:
            h = h * torch.tensor(net.config.embed_scale, dtype=torch.float32).to(h.dtype)
        dtype = h.dtype  # the model's (fp32, or bf16: the stack's activations are fp32 either way)
        h = h.float()
        tables = [net.rope_tables(kind, positions, torch.float32) for kind in plan.kinds]  # (B, 1, rd) each
        out = plan.native.run(h, [c for c, _ in tables], [s for _, s in tables], positions, row0, int(kv_len),
                              cache.k, cache.v, plan.coefficients(B), logits)  # fmt: skip
        self.stack_steps += 1
        return out.to(dtype) if logits else net.model.norm(out.to(dtype))
