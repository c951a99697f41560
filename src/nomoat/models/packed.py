"""Inference-only linear layers whose weight is stored once, in the layout of the fastest CPU kernel available.

Where nomoat's compiled kernels build (`nomoat.kernels`), a `PackedLinear` holds the weight as fp32 panels and every
call, decode rows or a prefill's hundreds, is one `torch.ops.nomoat.linear_f32` call (rows run in blocks of 8 over
each panel; memory sees each weight once per call). Elsewhere it holds oneDNN's blocked layout, torch's fastest
fp32 CPU matmul path (on the 2-core x86 machines nomoat targets it reads weights at 17-19 GB/s where `F.linear` reads
10-14). Either way the original (N, K) matrix is not kept: `weight()` rebuilds it.

`pack_model` replaces a model's fp32 CPU `nn.Linear` layers by `PackedLinear`s, in place, under the same module
paths: for a model loaded only to generate (the CLI's inference commands), so that its weights exist once.
`nomoat.inference.prepare` then decodes with the same panels. An output head tied to the embedding shares the
embedding's one matrix: with the kernels, both become views of one set of panels (`PackedEmbedding` looks token rows
up in them, the head's `PackedLinear` multiplies by them), so the matrix is not held a second time and the head reads
the panels the decode kernels are fastest on; without the kernels the tied pair is left as it is. Packed layers have
no autograd: do not train or save a packed model. `pack_model` leaves a model unchanged where neither layout applies
(off the CPU, not fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from nomoat import kernels
from nomoat.kernels import hugepages
from nomoat.kernels.layout import PANEL


def packing_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether `pack_model` would pack layers for this device and dtype."""
    ops = torch.ops.mkldnn
    onednn = torch.backends.mkldnn.is_available() and all(
        hasattr(ops, op) for op in ("_reorder_linear_weight", "_linear_pointwise")
    )
    return torch.device(device).type == "cpu" and dtype == torch.float32 and (onednn or kernels.available())


class PackedLinear(nn.Module):
    """`y = x W^T + b` with `W` stored once: as the compiled kernels' panels, or for oneDNN (inference only).

    Args:
        linear: The `nn.Linear` to pack (its weight is copied into the packed layout; the original is not kept).
        lazy_onednn: Without the kernels, build the oneDNN layout at the first call instead of now.
        panels: The weight's fp32 panels, already made (`kernels.pack_fp32`): shared, not copied.
    """

    def __init__(self, linear: nn.Linear, lazy_onednn: bool = False, panels: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().contiguous()
        if panels is None:
            panels = kernels.pack_fp32(weight) if kernels.available() else None
        self._pending = weight if panels is None and lazy_onednn else None  # (N, K), until the first call
        packed = None
        if panels is None and not lazy_onednn:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.register_buffer("panels", panels, persistent=False)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def weight(self) -> torch.Tensor:
        """The (out, in) weight matrix, rebuilt from the stored layout (a new tensor)."""
        if self.panels is not None:
            return kernels.unpack(self.panels, self.out_features)
        if self._pending is not None:
            return self._pending.clone()
        eye = torch.eye(self.in_features)
        return torch.ops.mkldnn._linear_pointwise(eye, self.packed_weight, None, "none", [], "").t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to fp32 (..., in_features)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.panels is not None:
            y = kernels.linear_fp32(x2, self.panels, self.out_features, self.bias)
        else:
            if self.packed_weight is None:
                with torch.no_grad():
                    self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self._pending, None)
                self._pending = None
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none", [], "")
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedEmbedding(nn.Module):
    """An fp32 embedding table held as the compiled kernels' panels (`kernels.pack_fp32`), for a tied output head.

    The output head tied to this embedding multiplies by the same panels (a `PackedLinear` sharing them), so the
    (vocab, hidden) matrix exists once, in the layout the decode kernels read fastest. A lookup gathers each token's
    row from its panel (row `i` is column `i % 64` of panel `i // 64`). Inference only (no autograd).

    Args:
        panels: (P, hidden, 64) fp32 panels of the (vocab, hidden) matrix, shared.
        num_embeddings: Vocabulary rows (`P * 64` or fewer: the rest is padding).
    """

    def __init__(self, panels: torch.Tensor, num_embeddings: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = panels.shape[1]
        self.register_buffer("panels", panels, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The panels (what `device` and `dtype` are read from); `matrix()` gives the (vocab, hidden) table."""
        return self.panels

    def matrix(self) -> torch.Tensor:
        """The (vocab, hidden) embedding matrix, rebuilt from the panels (a new tensor)."""
        return kernels.unpack(self.panels, self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of token ids (...) : (..., hidden)."""
        return self.panels[ids // PANEL, :, ids % PANEL]

    def extra_repr(self) -> str:
        """Shape summary shown by `print(model)`."""
        return f"{self.num_embeddings}, {self.embedding_dim}, panels (shared with the tied head)"


def _pack_tied(model: nn.Module) -> int:
    """Put each fp32 CPU embedding tied to an `nn.Linear` (an output head) and that head on one set of panels.

    Returns how many heads were packed (0 without the compiled kernels: the tied pair stays as it is, shared).
    """
    if not kernels.available():
        return 0
    n = 0
    embeddings = [name for name, m in model.named_modules() if type(m) is nn.Embedding]
    for emb_name in embeddings:
        emb = model.get_submodule(emb_name)
        w = emb.weight
        heads = [name for name, m in model.named_modules() if type(m) is nn.Linear and m.weight is w]
        if not heads or w.dtype != torch.float32 or w.device.type != "cpu" or emb.max_norm is not None:
            continue
        panels = kernels.pack_fp32(w.detach())
        for name in [emb_name, *heads]:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child_name)
            new = PackedEmbedding(panels, w.shape[0]) if name == emb_name else PackedLinear(old, panels=panels)
            setattr(parent, child_name, new)
            n += name != emb_name
        del emb, w, old
        hugepages.release_freed_memory()
    return n


def pack_model(model: nn.Module) -> int:
    """Replace every fp32 CPU `nn.Linear` of `model` by a `PackedLinear`, in place, under the same module path.

    An output head tied to an embedding shares one set of panels with it (the embedding becomes a `PackedEmbedding`):
    the matrix is held once. Returns how many layers were packed (0 where packing is not available).
    """
    n = _pack_tied(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # Names, not modules: no list may keep a replaced layer (and its weight) alive until the end.
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m.weight) not in embeddings]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, child_name)
        if packing_available(child.weight.device, child.weight.dtype):
            setattr(parent, child_name, PackedLinear(child, lazy_onednn=child_name == "lm_head"))
            del child
            hugepages.release_freed_memory()  # the replaced weight's memory goes back now: the peak is one layer more
            n += 1
    return n
