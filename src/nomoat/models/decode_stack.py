"""One decode step of the whole decoder stack in one compiled call (fp32 activations, CPU, 1-8 rows).

With `kernels.py`, a decode step of a SmolLM2-135M-shaped model still made about 7 kernel calls and 15 torch ops
per layer from Python (5 ms of a 33 ms token in dispatch), and each kernel call opened its own OpenMP parallel
region: under `OMP_WAIT_POLICY=PASSIVE` every region wakes a sleeping worker thread (about 120 wake-ups a token,
a quarter of the step). Here one C++ call runs every layer of a Llama/Mistral/Qwen2-style pre-norm block stack for
M <= 8 rows, one new token each, and returns the hidden states before the final norm:

    for each layer:  x_n = rmsnorm(x) * w_in;  qkv = x_n Wqkv^T (+ bias);  rope on q, k;  write k, v into the cache
                     attention over the cached keys 0..pos (GQA, sliding window);  x += attn Wo^T (+ bias)
                     x_n = rmsnorm(x) * w_post;  x += (silu(x_n Wg^T) * (x_n Wu^T)) Wd^T

Weights are the layers' own panels (`PackedLinear.panels`, int8 `QuantizedLinear` panels with their per-channel
scales; the fused q/k/v and gate/up tensors of `pack_model` / `quantize_model` are views of them), so the plan costs
no weight memory. The C++ is `nomoat/kernels/csrc/decode_stack.cpp` (`torch.classes.nomoat.StackPlan`).

Threading: ONE OpenMP parallel region per step. Each layer is five phases (q/k/v panels; attention over (row,
key/value head); output-projection panels added to the residual; gate/up panel pairs with SiLU; down panels added to
the residual). A phase's work units are claimed one at a time from an atomic counter, and a unit runs once the
previous phase has *finished all its units* (per-unit done flags and a count, not a barrier of threads). A thread
that finds a phase fully claimed skips it without waiting, so a thread that the shared VM deschedules holds nobody
back unless it holds a unit. And even then only briefly: a thread that needs a phase finished spins (`_mm_pause`)
for 20 us plus twice its own last time for such a unit, then runs the unfinished units itself. A unit may thus run
twice, even concurrently, so every unit is idempotent: each step's intermediates have one buffer per layer (and the
residual one per half layer: `x_next = x + projection`, never `x += ...`), and every shared write stores a final
value (attention accumulates in private scratch). Measured with a busy-loop process and another job sharing the 2
cores, a SmolLM2-135M step took 92-116 ms on 2 threads that waited for each other (spinning, then yielding or
sleeping), 35-42 on 1 thread, and 30-32 on 2 threads with helping (about 5 of the step's 2,000 units helped; when
idle, 2 threads take 16 ms, 1 thread 21). No thread ever sleeps inside the region; only its end waits for a
descheduled thread (OpenMP's join). The workspace (a few MB at 8 rows) belongs to the plan; a mutex serialises
calls. The RMSNorm of a phase's input is computed by each thread that runs a unit of it (M x hidden values: cheaper
than synchronising). An attention unit is a (row, key/value head): it rotates the new key, writes it and the new
value into the cache, and attends each query head of the group (`attend_head`: vectorised scores, exp and weighted
sum) reading the new key and value from its own copies, so attention needs no extra phase.

Numerics follow the unfused path (`Transformer` layers with `kernels.py`): the same GEMV code and accumulation order,
RMSNorm's mean of squares in double (F.rms_norm's fp32 result to rounding), rotate-half rope, fp32 softmax. Logits
agree with the unfused path to about 1e-6 relative.

Where it applies (else `Transformer.forward` runs its layers as before): a cached forward of one token per row,
rows a slice, at most `MAX_ROWS` rows, fp32 on CPU, gradients off, not under `torch.compile`; every layer a plain
pre-norm `Block` (no sandwich norm, q/k norm, soft-capping, Gemma norm offset or MLP bias; SiLU), every projection a
`PackedLinear` with panels or an int8 `QuantizedLinear`, and every module and weight still the one the plan was built
from (LoRA injection replaces modules, which turns it off: `DecodeStack.fallbacks` counts those calls). An adapter
bank's layers (`nomoat.lora.bank`) are seen through: the plan takes their base layers and each adapter's factors
(`add_lora`), and a step gets each row's adapter weights (`coef`, from the bank's current row-group plan), adding
`weight * scaling * (x A^T) B^T` to every projection's output panel by panel (x A^T is recomputed per panel: a
unit stays self-contained, and it costs 16 x 576 FMAs against the panel's 576 x 64 at rank 16). Measured
(SmolLM2-135M shape, one r=16 adapter on all linear layers, batch 1): adapter requests 23 -> 46-53 tok/s, base
requests on an engine with adapters loaded 29-31 -> 48-57. `NOMOAT_KERNELS=0` disables it with the other kernels,
`NOMOAT_DECODE_STACK=0` disables only it (for A/B).

Measured on the 2-core AMD EPYC (AVX-512) VM while its neighbours were idle, 2 threads, OMP_WAIT_POLICY=PASSIVE,
random weights; `benchmarks/bench_decode_kernels.py --kernels-only [--shape S] [--batch B]` (64 greedy steps after a
32-token prefill, best of 3 interleaved runs), tokens/s of all rows, layer by layer (`NOMOAT_DECODE_STACK=0`) ->
stack:
    SmolLM2-135M  batch 1: fp32 30.9 -> 46.6, int8 59.9 -> 109.6;  batch 8: fp32 178 -> 276, int8 225 -> 356
    Qwen2.5-0.5B  batch 1: fp32 13.9 -> 17.8, int8 32.5 -> 50.6;   batch 8: fp32 71 -> 93,   int8 103 -> 134
The layers' fp32 weights then stream at 26-27 GB/s (the machine reads about 26-29): the stack's part of a SmolLM2
step is about 16 ms of 21, the output head (outside the stack) 4. Through the engine (`bench_generate.py --quick`):
SmolLM2 fp32 decode 29.2 -> 47.7 tok/s (transformers 13.9: 3.4x), int8 47.5 -> 112.6 (llama.cpp q8_0 112.4).
Machine speed drifts by 10-30% over minutes here, so compare only interleaved runs.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from typing import Any

import torch

from nomoat import kernels

logger = logging.getLogger(__name__)

MAX_ROWS = 8  # rows per call (the GEMV templates hold at most 8 rows in registers)

def available() -> bool:
    """Whether the stack kernel (`torch.classes.nomoat.StackPlan`) can be used; builds the kernels on first call."""
    return kernels.available()


def config_eligible(cfg: Any) -> bool:
    """Whether a `ModelConfig` describes blocks the stack kernel computes (Llama/Mistral/Qwen2-style, SiLU)."""
    return (
        not cfg.sandwich_norm
        and not cfg.qk_norm
        and cfg.attn_logit_softcap is None
        and cfg.hidden_act == "silu"
        and not cfg.norm_offset
        and not cfg.mlp_bias
    )


def attach(model: torch.nn.Module) -> bool:
    """Give a packed or int8-quantized `Transformer` a `DecodeStack` (its `_decode_stack`); False where not eligible.

    Called by `pack_model` and `quantize_model`. The plan is built at the first eligible decode step.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(type(model), "_decode_stack") or not config_eligible(cfg):
        return False
    if not kernels.available():
        return False
    if not isinstance(getattr(model, "_decode_stack", None), DecodeStack):
        model._decode_stack = DecodeStack()
    return True


_EMPTY = torch.empty(0)
_VERSION = torch.Tensor._version.__get__  # a tensor's in-place write counter, callable from map()
_DATA_PTR = torch.Tensor.data_ptr


def _slot(obj: torch.nn.Module, name: str) -> tuple[dict[str, Any], str]:
    """The dict that holds `obj.name` (parameters, buffers, submodules or the instance dict), for identity guards."""
    for store in ("_parameters", "_buffers", "_modules"):
        d = obj.__dict__.get(store)
        if d is not None and name in d:
            return d, name
    return obj.__dict__, name


class _Plan:
    """The compiled plan of one model plus the guards that say whether it still describes the model."""

    def __init__(self, native: Any, guards: list[tuple[dict[str, Any], str, Any]], versions: list[tuple[Any, int]],
                 params: list[torch.Tensor], kinds: list[str], sources: list[Any] | None = None,
                 slots: dict[str, int] | None = None) -> None:  # fmt: skip
        self.native = native
        self.kinds = kinds
        self.sources = tuple(sources or ())  # adapter banks whose current row-group plans the steps apply
        self.slots = dict(slots or {})  # adapter name -> coefficient column
        dicts, keys, expected = (list(c) for c in zip(*guards))
        self._dicts, self._keys, self._expected = tuple(dicts), tuple(keys), tuple(expected)
        self._tensors = tuple(t for t, _ in versions)
        self._versions = tuple(v for _, v in versions)
        self._params = tuple(params)  # parameters whose storage can be swapped under them (`p.data = ...`)
        self._ptrs = tuple(map(_DATA_PTR, params))

    def coefficients(self, batch: int) -> torch.Tensor | None:
        """The (batch, slots) weight of each adapter for each row, from the banks' current row-group plans.

        None when a plan names an adapter the plan has no factors for.
        """
        coef = torch.zeros(batch, max(len(self.slots), 1))
        for source in self.sources:
            for rows, selection in source.current:
                for name, weight in selection:
                    slot = self.slots.get(name)
                    if slot is None:
                        return None
                    coef[rows, slot] += weight
        return coef

    def valid(self) -> bool:
        """Every module and weight is still the one the plan points at (and int8 codes unchanged in place)."""
        return self.valid_py()

    def valid_py(self) -> bool:
        """`valid`, computed in Python (a reference for tests)."""
        if not all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._expected)):
            return False
        return (
            tuple(map(_VERSION, self._tensors)) == self._versions and tuple(map(_DATA_PTR, self._params)) == self._ptrs
        )


def _linear(
    m: torch.nn.Module, guards: list, versions: list, params: list, sources: list | None = None
) -> list[torch.Tensor] | None:
    """[panels, scale, bias] of a packed fp32 or int8-quantized layer (empty tensors where absent), or None.

    A wrapper with `decode_passthrough()` (an adapter bank's layer) gives its base layer and the object whose
    `current` says whether adapters apply to this step: the plan uses the base and steps aside while they do
    (the object is added to `sources`).
    """
    from nomoat.models.packed import PackedLinear
    from nomoat.models.quantize import QuantizedLinear

    passthrough = getattr(m, "decode_passthrough", None)
    if passthrough is not None and sources is not None:
        base, source = passthrough()
        guards.append((*_slot(m, "base"), base))
        guards += [(*_slot(m, n), getattr(m, n)) for n in ("a_stack", "bt_stack", "layout")]  # replaced on rebuild
        if all(s is not source for s in sources):
            sources.append(source)
        return _linear(base, guards, versions, params)
    empty = torch.empty(0)
    if type(m) is PackedLinear:
        if m.panels is None or m.panels.dtype != torch.float32:
            return None
        guards += [(*_slot(m, "panels"), m.panels), (*_slot(m, "bias"), m.bias)]
        bias = m.bias
    elif type(m) is QuantizedLinear and m.mode == "int8":
        panels = m._kernel_panels(torch.empty(1, m.in_features))
        if panels is None or m.qweight.device.type != "cpu":
            return None
        guards += [(*_slot(m, n), getattr(m, n)) for n in ("qweight", "scale", "bias", "_panels")]
        for t in (m.qweight, m.scale):
            with contextlib.suppress(RuntimeError):  # inference tensors keep no version counter
                versions.append((t, t._version))
        bias = m.bias
        if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
            return None
        if bias is not None:
            params.append(bias)
        return [panels, m.scale, empty if bias is None else bias.detach()]
    else:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    return [m.panels, empty, empty if bias is None else bias]


def build_plan(model: torch.nn.Module) -> _Plan | None:
    """The stack plan of a `Transformer` whose layers all qualify (see the module docstring), else None."""
    from nomoat.models.transformer import MLP, Attention, Block, RMSNorm

    cfg = model.config
    if not available() or not config_eligible(cfg):
        return None
    guards: list[tuple[dict[str, Any], str, Any]] = []
    versions: list[tuple[Any, int]] = []
    params: list[torch.Tensor] = []
    sources: list[Any] = []  # adapter banks whose layers the plan sees through
    slots: dict[str, int] = {}  # adapter name -> column of the per-step coefficients
    loras: list[tuple[int, int, int, torch.Tensor, torch.Tensor, float]] = []  # (layer, projection, slot, A, Bt, s)
    decoder = model.model
    layers = decoder.layers
    guards.append((*_slot(decoder, "layers"), layers))
    kinds = sorted(set(cfg.layer_types))
    native = kernels.stack_plan(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           float(cfg.rms_norm_eps), float(cfg.query_scale))  # fmt: skip
    for i, block in enumerate(layers):
        if type(block) is not Block or block.sandwich or block._forward_hooks or block._forward_pre_hooks:
            return None
        attn, mlp = block.self_attn, block.mlp
        n_in, n_post = block.input_layernorm, block.post_attention_layernorm
        if type(attn) is not Attention or type(mlp) is not MLP or mlp.act != "silu":
            return None
        if type(n_in) is not RMSNorm or type(n_post) is not RMSNorm or n_in.offset or n_post.offset:
            return None
        if n_in.eps != cfg.rms_norm_eps or n_post.eps != cfg.rms_norm_eps:
            return None
        if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" for n in (n_in, n_post)):
            return None
        guards.append((*_slot(layers, str(i)), block))
        for owner, names in ((block, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
                             (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                             (mlp, ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            guards += [(*_slot(owner, n), getattr(owner, n)) for n in names]
        guards += [(*_slot(n, "weight"), n.weight) for n in (n_in, n_post)]
        params += [n_in.weight, n_post.weight]
        tensors = [n_in.weight.detach(), n_post.weight.detach()]
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        for j, m in enumerate(projections):
            parts = _linear(m, guards, versions, params, sources)
            if parts is None:
                return None
            tensors += parts
            for name, a, bt, scaling in m.decode_adapters() if hasattr(m, "decode_adapters") else ():
                if a.dtype != torch.float32 or bt.dtype != torch.float32 or a.device.type != "cpu":
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
    return _Plan(native, guards, versions, params, kinds, sources, slots)


class DecodeStack:
    """Runs a decode step's layers in one compiled call where possible (see the module docstring).

    Set on a model as `model._decode_stack` by `attach`; `Transformer.forward` calls it and runs its own layer
    loop when it returns None. `used` and `fallbacks` count the calls it took and declined; `reason` says why the
    last one was declined.
    """

    def __init__(self) -> None:
        self.plan: _Plan | None = None
        self.used = 0
        self.fallbacks = 0
        self.reason: str | None = None

    def _decline(self, reason: str) -> None:
        self.fallbacks += 1
        self.reason = reason

    def __call__(
        self,
        model: torch.nn.Module,
        h: torch.Tensor,
        ropes: dict[str, tuple[torch.Tensor, torch.Tensor]],
        cache_args: tuple[Any, Any, torch.Tensor, int],
    ) -> torch.Tensor | None:
        """Hidden states (B, 1, D) after every layer (before the final norm), or None where the stack does not apply.

        Args:
            model: The `Transformer`.
            h: Input hidden states (B, 1, D) (the embeddings).
            ropes: Rotary (cos, sin) tables (B, 1, rd) per layer type.
            cache_args: `(cache, rows, positions, kv_len)` as the layers get them.
        """
        if os.environ.get("NOMOAT_DECODE_STACK", "1") == "0":
            self._decline("disabled by NOMOAT_DECODE_STACK=0")
            return None
        kv, rows, positions, kv_len = cache_args
        if (
            h.dim() != 3
            or h.shape[1] != 1
            or h.shape[0] > MAX_ROWS
            or h.dtype != torch.float32
            or h.device.type != "cpu"
            or torch.is_grad_enabled()
            or not isinstance(rows, slice)
            or rows.step not in (None, 1)
            or positions.dtype != torch.int64
            or kv.k[0].dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            self._decline("inputs not eligible")
            return None
        plan = self.plan
        if plan is None or not plan.valid():
            self.plan = None  # drop references to replaced modules' tensors
            plan = self.plan = build_plan(model)
            if plan is None:
                self._decline("layers not eligible (adapters, unsupported modules, or no kernels)")
                return None
        coef = _EMPTY
        if plan.sources and any(source.current for source in plan.sources):
            coef = plan.coefficients(h.shape[0])
            if coef is None:
                self._decline("an adapter of this step is not in the plan")
                return None
        self.used += 1
        cos = [ropes[k][0] for k in plan.kinds]
        sin = [ropes[k][1] for k in plan.kinds]
        return plan.native.run(h, cos, sin, positions, rows.start or 0, int(kv_len), kv.k, kv.v, coef)

    def __deepcopy__(self, memo: dict[int, Any]) -> DecodeStack:
        """A copied model gets a fresh stack (the plan points at the original's tensors)."""
        return DecodeStack()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the plan (a compiled object; rebuilt at the next decode step)."""
        return {**self.__dict__, "plan": None}
