"""The decode stack's plan: every layer of a decode step in one call (`torch.classes.nomoat.StackPlan`).

One C++ call runs every layer of a Llama/Mistral/Qwen2-style pre-norm block stack for any number of rows, one new
token each, and returns the hidden states before the final norm (`nomoat/kernels/csrc/decode_stack.cpp` says how:
one OpenMP region per step, units claimed from counters, idempotent units so a thread may help a descheduled one).
`build_plan` makes the plan once from a decode model's layers: it points at their panels (no weight memory), the norm
weights, and each adapter-bank layer's factors (`decode_adapters`, one coefficient column per adapter); a step gets
each row's adapter weights from the banks' current row-group plans (`Plan.coefficients`).

Where it applies: every layer a plain pre-norm `Block` (no sandwich norm, q/k norm, soft-capping, Gemma norm offset
or MLP bias; SiLU), every projection a `PanelLinear` (fp32 or int8), a `Bf16Linear` (a bf16 model: the user's
weights read in place) or a `Q4PanelLinear` (4-bit panels: each projection's input rounded to int8 per block of 32,
as `linear_q4` rounds it), or an adapter-bank layer over one; fp32 or bf16 norms. The step's activations are fp32;
the KV cache is the model's dtype (fp32, or bf16 for a bf16 model).

An fp32 model whose output head is an fp32 or int8 `PanelLinear`, or a bf16 model whose head is a `Bf16Linear` (a
tied head: the embedding, read in place), with no soft-capping and a plain final `RMSNorm`, gets its final norm and
head in the same call too (`Plan.head`): one parallel region per decode step instead of two, and no norm between them
(a bf16 model's logits come back rounded to bf16, as its own head returns them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nomoat import kernels
from nomoat.config.model import ModelConfig
from nomoat.inference.attention import KernelAttention
from nomoat.inference.bf16_linear import Bf16Linear
from nomoat.inference.panel_linear import PanelLinear, Q4PanelLinear
from nomoat.models.transformer import MLP, Attention, Block, RMSNorm

_EMPTY = torch.empty(0)


def config_eligible(cfg: ModelConfig) -> bool:
    """Whether a `ModelConfig` describes blocks the stack kernel computes (Llama/Mistral/Qwen2-style, SiLU)."""
    return (
        not cfg.sandwich_norm
        and not cfg.qk_norm
        and cfg.attn_logit_softcap is None
        and cfg.hidden_act == "silu"
        and not cfg.norm_offset
        and not cfg.mlp_bias
    )


class Plan:
    """A built stack plan, the rope kinds it reads, and the adapter banks whose row groups its steps apply.

    Args:
        native: The `torch.classes.nomoat.StackPlan`.
        kinds: Layer types, in the order of the rope tables `run` takes.
        sources: Adapter banks (objects with `current`: (rows, ((name, weight), ...)) entries) the layers belong to.
        slots: Adapter name -> coefficient column.
        head: Whether the plan can end a step with the final norm and the output head (`run`'s last argument).
    """

    def __init__(
        self, native: Any, kinds: list[str], sources: list[Any], slots: dict[str, int], head: bool = False
    ) -> None:
        self.native = native
        self.head = head
        self.kinds = kinds
        self.sources = tuple(sources)
        self.slots = dict(slots)

    def coefficients(self, batch: int) -> torch.Tensor:
        """The (batch, slots) weight of each adapter for each row under the banks' current plans (empty: none)."""
        if not any(source.current for source in self.sources):
            return _EMPTY
        rows_at: list[int] = []  # (row, column, weight) triples: one indexed add a step, not one per row group
        cols: list[int] = []
        weights: list[float] = []
        for source in self.sources:
            for rows, selection in source.current:
                ids = range(batch)[rows] if isinstance(rows, slice) else rows.tolist()
                for name, weight in selection:
                    rows_at += ids
                    cols += [self.slots[name]] * len(ids)
                    weights += [weight] * len(ids)
        coef = torch.zeros(batch, max(len(self.slots), 1))
        index = (torch.tensor(rows_at, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        return coef.index_put_(index, torch.tensor(weights, dtype=torch.float32), accumulate=True)


def _projection(m: nn.Module, sources: list[Any]) -> list[torch.Tensor] | None:
    """[panels, scale, bias] of a panel layer (empty tensors where absent), seeing through an adapter-bank layer."""
    passthrough = getattr(m, "decode_passthrough", None)
    if passthrough is not None:
        m, source = passthrough()
        if all(s is not source for s in sources):
            sources.append(source)
    if type(m) is Bf16Linear:  # the user's bf16 weight itself
        return [m.bf16_weight, _EMPTY, _EMPTY if m.bias is None else m.bias]
    if type(m) is Q4PanelLinear:  # 4-bit panels (Q4_0 / Q4_1 blocks): scales inside
        return [m.panels, _EMPTY, _EMPTY if m.bias is None else m.bias]
    if type(m) is not PanelLinear or m.bf16:  # the stack reads fp32 or int8 panels
        return None
    bias = _EMPTY if m.bias is None else m.bias
    return [m.panels, _EMPTY if m.scale is None else m.scale, bias]


def _block_eligible(block: nn.Module, cfg: ModelConfig) -> bool:
    if type(block) is not Block or block.sandwich or block._forward_hooks or block._forward_pre_hooks:
        return False
    attn, mlp = block.self_attn, block.mlp
    norms = (block.input_layernorm, block.post_attention_layernorm)
    if type(attn) not in (Attention, KernelAttention) or type(mlp) is not MLP or mlp.act != "silu":
        return False
    return all(
        type(n) is RMSNorm and not n.offset and n.eps == cfg.rms_norm_eps and n.weight.is_contiguous()
        and n.weight.dtype in (torch.float32, torch.bfloat16) and n.weight.device.type == "cpu" for n in norms
    )  # fmt: skip


def _head_parts(net: nn.Module, cfg: ModelConfig) -> list[torch.Tensor] | None:
    """[norm weight, weight, scale, bias] of the final norm and output head the stack computes, else None.

    An fp32 model's fp32 / int8 panel head (fp32 norm weight), or a bf16 model's `Bf16Linear` head (the user's bf16
    weight, a tied head the embedding itself; bf16 or fp32 norm weight).
    """
    head, norm = getattr(net, "lm_head", None), getattr(net.model, "norm", None)
    if cfg.final_logit_softcap is not None or head is None or head._forward_hooks or head._forward_pre_hooks:
        return None
    if type(head) is Bf16Linear and net.dtype == torch.bfloat16:
        weight, scale, dtypes = head.bf16_weight, None, (torch.bfloat16, torch.float32)
    elif type(head) is PanelLinear and not head.bf16 and net.dtype == torch.float32:
        weight, scale, dtypes = head.panels, head.scale, (torch.float32,)
    else:
        return None
    if type(norm) is not RMSNorm or norm.offset or norm.eps != cfg.rms_norm_eps or norm.weight.dtype not in dtypes:
        return None
    if not norm.weight.is_contiguous() or norm._forward_hooks or norm._forward_pre_hooks:
        return None
    empty = _EMPTY
    return [norm.weight.detach(), weight, empty if scale is None else scale,
            empty if head.bias is None else head.bias]  # fmt: skip


def build_plan(net: nn.Module) -> Plan | None:
    """The stack plan of a decode model's `Transformer` whose layers all qualify (module docstring), else None."""
    cfg = net.config
    if not kernels.available() or not config_eligible(cfg):
        return None
    sources: list[Any] = []  # adapter banks whose layers the plan sees through
    slots: dict[str, int] = {}  # adapter name -> column of the per-step coefficients
    loras: list[tuple[int, int, int, torch.Tensor, torch.Tensor, float]] = []  # (layer, projection, slot, A, Bt, s)
    kinds = sorted(set(cfg.layer_types))
    native = kernels.stack_plan(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                cfg.rms_norm_eps, cfg.query_scale)  # fmt: skip
    for i, block in enumerate(net.model.layers):
        if not _block_eligible(block, cfg):
            return None
        attn, mlp = block.self_attn, block.mlp
        tensors = [block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach()]
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for j, m in enumerate(projections):
            parts = _projection(m, sources)
            if parts is None:
                return None
            tensors += parts
            for name, a, bt, scaling in m.decode_adapters() if hasattr(m, "decode_adapters") else ():
                if a.dtype not in (torch.float32, torch.bfloat16) or bt.dtype != a.dtype or a.device.type != "cpu":
                    return None
                loras.append((i, j, slots.setdefault(name, len(slots)), a, bt, float(scaling)))
        if any(t.numel() for t in (tensors[16], tensors[19], tensors[22])):
            return None  # an MLP bias (mlp_bias is off in the config, but a layer could carry one)
        tensors = tensors[:16] + tensors[17:19] + tensors[20:22]  # gate, up, down: panels and scales only
        kind = cfg.layer_types[i]
        window = (cfg.sliding_window or 0) if kind == "sliding_attention" else 0
        native.add_layer(tensors, int(window), kinds.index(kind))
    for i, j, slot, a, bt, scaling in loras:
        native.add_lora(i, j, slot, a, bt, scaling)
    head = _head_parts(net, cfg)
    if head is not None:
        native.set_head(*head, net.lm_head.out_features)
    return Plan(native, kinds, sources, slots, head=head is not None)
