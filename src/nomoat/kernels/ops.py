"""The Python face of nomoat's ops: the compiled `torch.ops.nomoat.<op>` where built, else its reference.

Each function calls the compiled op where the kernels are built, else its plain-PyTorch reference (`reference.py`),
with the same arguments and results.

`available()` builds the kernels on first call (`build.py`) and registers each op's fake implementation (shapes and
dtypes only, no data) with `torch.library.register_fake`, so `torch.compile` traces through the ops. The decode
stack's plan is a `torch.classes.nomoat.StackPlan` (`stack_plan`): an object that holds pointers to the weights and a
workspace, which torch.compile does not trace into (a compiled caller calls it between compiled regions).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from nomoat.kernels import build, reference

_fakes_lock = threading.Lock()
_fakes_registered = False


def available() -> bool:
    """Whether the compiled kernels run (building them on the first call); False: the references run."""
    if not build.load():
        return False
    if not _fakes_registered:
        register_fakes()
    return True


def isa() -> str | None:
    """The instruction set the loaded kernels were compiled for ("avx512", "avx2", ...), or None without them."""
    return build.VARIANTS[torch.ops.nomoat.isa()] if available() else None


def linear_fp32(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K), any M, and `panels = layout.pack_fp32(W)`; returns (M, n)."""
    if available():
        return torch.ops.nomoat.linear_f32(x, panels, bias, n)
    return reference.linear_fp32(x, panels, n, bias)


def linear_bf16(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K), any M, and `panels = layout.pack_bf16(W)`; fp32 sums; (M, n).

    Up to 16 rows (decode) `x` stays fp32; above (prefill), on CPUs with AVX-512-BF16, its rows are rounded to bf16
    first, as a bf16 model's activations are (`bf16_dot_rows`).
    """
    if available():
        return torch.ops.nomoat.linear_bf16(x, panels, bias, n)
    return reference.linear_bf16(x, panels, n, bias)


def linear_bf16_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K) and a bf16 weight `W` (N, K), read in place (contiguous, no packing).

    fp32 sums, fp32 result (M, N); `bias` fp32 (N,) or None. Meant for decode's few rows. On CPUs with AVX-512-BF16
    the compiled op rounds `x` to bf16 in registers and uses hardware bf16 dot products (the precision of a bf16
    model's own layers); `NOMOAT_BF16_DOT=0` keeps exact fp32 activations.
    """
    if available():
        return torch.ops.nomoat.linear_bf16_rows(x, weight, bias)
    return reference.linear_bf16_rows(x, weight, bias)


def bf16_dot_rows() -> int | None:
    """Above how many rows `linear_bf16` rounds activations to bf16 (hardware bf16 dot products), or None: never."""
    return 16 if available() and "bf16" in build.current_variant().name else None


def linear_int8(
    x: torch.Tensor,
    panels: torch.Tensor,
    scale: torch.Tensor,
    n: int,
    bias: torch.Tensor | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K) and `panels, scale = layout.pack_int8(q, d)`; (M, n).

    `W = d * q` per block of 32 input channels (GGUF Q8_0's blocks; `scale` the (P, ceil(K / 32), 64) fp16 block
    scales). Where the build has AVX-512-VNNI and K is a multiple of 32, the compiled op rounds each row of `x` per
    block of 32 channels and takes integer dot products (`reference.linear_int8_dot`): to 16-bit codes in mode 2, the
    default, to int8 in mode 1 (as `linear_q4` does: llama.cpp's q8_0 x q8_0 arithmetic; `int8_dot`); in mode 0, with
    `exact`, and elsewhere, `x` stays fp32 (exact sums: what a product on its way to a gradient needs).
    """
    if available():
        return torch.ops.nomoat.linear_i8(x, panels, scale, bias, n, exact)
    return reference.linear_int8(x, panels, scale, n, bias)


def int8_dot(mode: int = -1) -> int:
    """The process's int8 mode (`linear_int8` and the decode stack): how int8 weights take their activations.

    2: rounded to 16-bit codes per block of 32 (two int8 digits each, integer dot products in two passes): the
    default where the build has AVX-512-VNNI; the activations' rounding error is 1/257 of mode 1's, so the perplexity
    lost is the weights' alone (below llama.cpp's q8_0 in `benchmarks/bench_quality.py`), at mode 1's speed where a
    step has few rows (about 1.4x its arithmetic at many). 1: rounded to int8 per block of 32 (with per-block weight
    scales, llama.cpp's q8_0 arithmetic; the fastest at many rows). 0: exact fp32 activations, the weights widened.
    `mode` 0, 1 or 2 sets it first (1 and 2 only take where the build has VNNI), -1 only reads; `NOMOAT_I8_DOT=0` or
    `=1` in the environment starts the process in that mode; always 0 without VNNI or the kernels.
    """
    return int(torch.ops.nomoat.i8_dot(mode)) if available() else 0


def linear_q4(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + bias` for 2-D fp32 `x` (M, K), any M, and 4-bit `panels = layout.pack_q4(...)` of W (n, K); (M, n).

    Each row of `x` is rounded to int8 codes per block of 32 channels (scale absmax / 127, as llama.cpp's Q8
    activations) and the blocks' dot products run on integers (`reference.quantize_activations` says how).
    """
    if available():
        return torch.ops.nomoat.linear_q4(x, panels, bias, n)
    return reference.linear_q4(x, panels, n, bias)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row0: int,
    positions: torch.Tensor,
    kv_len: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """One decode step of attention in one call (fp32, CPU): rope, KV-cache write, attention over the cached keys.

    Args:
        q: New queries (B, 1, H, hd), unit stride on the last dimension (not rotated yet).
        k: New keys (B, 1, n_kv, hd), not rotated.
        v: New values (B, 1, n_kv, hd).
        cos: Rotary cosines (B, 1, rd), `rd <= hd` (the first `rd` channels rotate).
        sin: Rotary sines (B, 1, rd).
        k_cache: One layer's key cache (max_batch, n_kv, S, hd), contiguous; row `row0 + b` gets row b's key.
        v_cache: The layer's value cache, same shape.
        row0: First cache row of the batch.
        positions: int64 (B, 1): where each row's token is written; it attends to keys `0..position`.
        kv_len: Keys beyond `kv_len - 1` are never read.
        window: Sliding window (keys `> position - window`), or 0 for none.
        scale: Query scale.

    Returns:
        Attention outputs (B, 1, H * hd), ready for the output projection.
    """
    fn = torch.ops.nomoat.decode_attention if available() else reference.decode_attention
    return fn(q, k, v, cos, sin, k_cache, v_cache, row0, positions, kv_len, window, scale)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one pass (fp32, contiguous; no gradient is recorded)."""
    return torch.ops.nomoat.swiglu_forward(gate, up) if available() else reference.swiglu_forward(gate, up)


def swiglu_backward(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, p_out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `p = silu(gate) * up` in one pass: `(grad_gate, grad_up)`.

    `grad` (dL/dp) is overwritten with dL/dgate and returned as `grad_gate`; when `p_out` is given, `p` is written
    into it (recomputed, for a gradient that needs the product).
    """
    fn = torch.ops.nomoat.swiglu_backward if available() else reference.swiglu_backward
    return grad, fn(gate, up, grad, p_out)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """Rotary embedding of `x` (B, H, T, hd) by `cos`/`sin` (B, T, rd) in one pass (`backward`: its gradient).

    The first `rd` channels rotate (rotate_half convention), the rest pass through. The result is laid out as
    (B, T, H, hd) in memory (a transposed view), like torch's elementwise ops on a transposed `x`.
    """
    fn = torch.ops.nomoat.rope if available() else reference.rope
    return fn(x, cos, sin, backward)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy `logsumexp(row) - row[target]` (c,); `logits` (c, V) becomes `softmax - onehot`."""
    fn = torch.ops.nomoat.softmax_xent_ if available() else reference.softmax_xent_
    return fn(logits, targets)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (B,) of 2-D `x` (B, V), as `x.argmax(dim=-1)`: the first maximum, a NaN the largest.

    fp32 CPU rows go through the compiled op (32 rows of 49,152 logits on two cores: 46 us, against 663 us for
    torch's CPU argmax); anything else, and a build without kernels, through torch.
    """
    if x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[1] > 0 and available():
        return torch.ops.nomoat.argmax_rows(x)
    return reference.argmax_rows(x)


def lora_rows_(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    rows: torch.Tensor,
    which: torch.Tensor,
    coef: torch.Tensor,
) -> torch.Tensor:
    """Many adapters over the rows of `x` in one call: y[rows[e]] += coef[e] * (x[rows[e]] a[w]^T) bt[w], w = which[e].

    Args:
        y: Output (N, out) fp32, unit stride along rows; updated in place and returned.
        x: Input (N, in) fp32, unit stride along rows.
        a: Stacked `A` factors (G, r, in) fp32 or bf16 contiguous (ranks zero-padded to r).
        bt: Stacked `B^T` factors (G, r, out) fp32 or bf16 contiguous (the same dtype as `a`).
        rows: int64 (E,): the row of each entry (a row may appear once per adapter of its selection).
        which: int64 (E,): each entry's adapter, sorted ascending.
        coef: fp32 (E,): each entry's factor (selection weight times the adapter's scaling).
    """
    if available():
        torch.ops.nomoat.lora_rows_(y, x, a, bt, rows, which, coef)
    else:
        reference.lora_rows_(y, x, a, bt, rows, which, coef)
    return y


def stack_plan(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float,
               scale: float) -> Any:  # fmt: skip
    """A new `torch.classes.nomoat.StackPlan` (the decode stack; see `csrc/decode_stack.cpp`); None without kernels."""
    if not available():
        return None
    return torch.classes.nomoat.StackPlan(hidden, heads, kv_heads, head_dim, intermediate, float(eps), float(scale))


def register_fakes() -> None:
    """Register each op's fake implementation (output shapes and dtypes only), once per process."""
    global _fakes_registered
    with _fakes_lock:
        if _fakes_registered:
            return
        fake = torch.library.register_fake
        fake("nomoat::linear_f32")(lambda x, panels, bias, n: x.new_empty(x.shape[0], n))
        fake("nomoat::linear_bf16")(lambda x, panels, bias, n: x.new_empty(x.shape[0], n))
        fake("nomoat::linear_bf16_rows")(lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0]))
        fake("nomoat::linear_i8")(lambda x, panels, scale, bias, n, exact=False: x.new_empty(x.shape[0], n))
        fake("nomoat::linear_q4")(lambda x, panels, bias, n: x.new_empty(x.shape[0], n))
        fake("nomoat::decode_attention")(
            lambda q, k, v, cos, sin, kc, vc, row0, positions, kv_len, window, scale: q.new_empty(
                q.shape[0], 1, q.shape[2] * q.shape[3]
            )
        )
        fake("nomoat::swiglu_forward")(lambda gate, up: torch.empty_like(gate))
        fake("nomoat::swiglu_backward")(lambda gate, up, grad, p_out: torch.empty_like(gate))
        fake("nomoat::rope")(
            lambda x, cos, sin, backward: x.new_empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)
        )
        fake("nomoat::lora_rows_")(lambda y, x, a, bt, rows, which, coef: None)
        fake("nomoat::softmax_xent_")(lambda logits, targets: logits.new_empty(logits.shape[0]))
        fake("nomoat::argmax_rows")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))
        _register_nf4_fakes()
        _fakes_registered = True


# ---- NF4 (QLoRA's frozen base) ------------------------------------------------------------------------------------


def nf4_decode_bf16(qweight: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """A bf16 tile (R, C) of an NF4 weight from its codes `qweight` uint8 (R, C / 2) and `absmax` fp32 (R, C / block).

    Both may be views into a larger weight (any row stride, unit stride along rows). Each value is
    `bf16(bf16(codebook[code]) * bf16(absmax))`, the plain-torch bf16 tile of `nomoat.lora.nf4` bit for bit.
    """
    if qweight.device.type == "cpu" and available():
        return torch.ops.nomoat.nf4_decode_bf16(qweight, absmax, block)
    return reference.nf4_decode_bf16(qweight, absmax, block)


def nf4_decode_bf16_out(qweight: torch.Tensor, absmax: torch.Tensor, block: int, out: torch.Tensor) -> torch.Tensor:
    """`nf4_decode_bf16` written into `out` (contiguous bf16 (R, C)): a buffer reused from tile to tile; returns it."""
    if qweight.device.type == "cpu" and available():
        torch.ops.nomoat.nf4_decode_bf16_out(qweight, absmax, block, out)
    else:
        out.copy_(reference.nf4_decode_bf16(qweight, absmax, block))
    return out


def _register_nf4_fakes() -> None:
    """Fake implementations of the NF4 ops (called by `register_fakes`)."""
    torch.library.register_fake("nomoat::nf4_decode_bf16")(
        lambda q, a, block: q.new_empty(q.shape[0], 2 * q.shape[1], dtype=torch.bfloat16)
    )
    torch.library.register_fake("nomoat::nf4_decode_bf16_out")(lambda q, a, block, out: None)
