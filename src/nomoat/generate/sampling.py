"""The sampling step of a batched decoder: per-row penalties, warpers, seeded draws and raw logprobs.

Each decode row has its own `SamplingParams`. `sample` runs `process_logits` (penalties: repetition as transformers,
then OpenAI's frequency and presence; then, for sampling rows only, temperature, top-k, top-p, min-p in transformers'
order), takes the argmax for greedy rows and a Gumbel-max draw from each sampling row's own `torch.Generator`
(`make_generator`), so a seeded request gives the same tokens whatever shares its batch. Logprobs come from the RAW
model logits (vLLM's default), describing the model, not the sampler. A step runs only on the rows that enable it and
leaves the others bit for bit unchanged. `SamplingBatch.build` makes the per-row tensors once per batch composition;
`SamplingState` keeps each row's (R, V) token counts and seen-mask for the penalties, one scatter per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nomoat.kernels import ops

# Below this temperature a row decodes greedily (as vLLM): dividing by it would overflow fp32 logits to inf.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request picks its tokens (OpenAI / vLLM knobs).

    Attributes:
        temperature: Softmax temperature, >= 0; 0 (anything below 1e-5) decodes greedily.
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches `top_p`,
            in (0, 1]; 1 disables it.
        top_k: Keep the `top_k` most likely tokens, >= 0; 0 disables it.
        min_p: Drop tokens less likely than `min_p` times the most likely one, in [0, 1]; 0 disables it.
        repetition_penalty: CTRL penalty on every token of the prompt and output, > 0; 1 disables it.
        frequency_penalty: Subtracted once per earlier occurrence of a token in the output, in [-2, 2].
        presence_penalty: Subtracted once from any token already in the output, in [-2, 2].
        seed: Seeds the request's own generator, so its output does not depend on the rest of the batch.
        max_new_tokens: Most tokens to generate, >= 1.
        stop: Stop strings: the output ends right before the first one (never included).
        stop_token_ids: Token ids that end generation, in addition to the model's end-of-sequence tokens.
        logprobs: Return the logprob of every chosen token.
        top_logprobs: Also return the most likely `top_logprobs` tokens at each step, in [0, 20].
        ignore_eos: Keep generating past end-of-sequence tokens (benchmarks).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Each check states the allowed range, so NaN (false in every comparison) fails it.
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            (
                "top_logprobs",
                isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"an integer in [0, {MAX_TOP_LOGPROBS}]",
            ),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer or None"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}")

    @property
    def is_greedy(self) -> bool:
        """Whether this request takes the most likely token at every step (temperature 0)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether any penalty is on (the sampler then reads the request's `SamplingState` row)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def wants_logprobs(self) -> bool:
        """Whether the request asked for logprobs or top logprobs."""
        return self.logprobs or self.top_logprobs > 0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """Create the random generator of one request; the engine keeps it for the request's whole life.

    Args:
        params: The request's parameters; `seed` seeds the generator when set.
        device: Where the generator draws: best the logits' device. A CPU generator also works with CUDA logits
            (slower: a host draw and a copy per row and step) and then gives the same tokens on any device.

    Returns:
        A generator seeded from `params.seed`, or, when that is None, from torch's global RNG, so that
        `torch.manual_seed` makes a whole run reproducible.
    """
    if params.seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    else:
        seed = params.seed & 0xFFFF_FFFF_FFFF_FFFF  # any Python int, as OpenAI allows; torch wants 64 bits
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _ids(values: int | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long, device=device).reshape(-1)


class SamplingState:
    """The token history the penalties read, one preallocated slot (row) per running request.

    Kept incrementally so a decode step costs one scatter: `record` adds the sampled tokens. Slots follow the
    engine's rows: `reset_row` when a request takes a row, `move_row` when a request moves to another row.

    Attributes:
        output_counts: (R, V) int32: how often each token was generated (frequency and presence penalties).
        seen: (R, V) bool: whether each token is in the prompt or the output (repetition penalty).

    Args:
        max_rows: R, the number of slots (the engine's largest batch).
        vocab_size: V, the width of the logits.
        device: Where the logits live.
    """

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.output_counts = torch.zeros(max_rows, vocab_size, dtype=torch.int32, device=device)  # (R, V)
        self.seen = torch.zeros(max_rows, vocab_size, dtype=torch.bool, device=device)  # (R, V)
        self.vocab_size = vocab_size

    @classmethod
    def from_prompts(
        cls, prompts: Sequence[Sequence[int] | torch.Tensor], vocab_size: int, device: torch.device | str = "cpu"
    ) -> SamplingState:
        """A state whose rows 0..n-1 start from the given prompts (a static batch).

        Args:
            prompts: One sequence of token ids per row.
            vocab_size: V, the width of the logits.
            device: Where the logits live.

        Returns:
            A state of `len(prompts)` rows with no generated tokens yet.
        """
        state = cls(len(prompts), vocab_size, device)
        for row, ids in enumerate(prompts):
            state.reset_row(row, ids)
        return state

    def reset_row(
        self, row: int, prompt_ids: Sequence[int] | torch.Tensor, params: SamplingParams | None = None
    ) -> None:
        """Give a row to a new request: forget the previous one and mark the prompt's tokens as seen.

        Args:
            row: The slot.
            prompt_ids: The request's prompt (ids >= V, possible when the embedding table is wider than the output
                head, can never be generated and are ignored).
            params: The request's parameters; when given without any penalty, the row is never read, so the reset
                is skipped.
        """
        if params is not None and not params.has_penalties:
            return
        ids = _ids(prompt_ids, self.seen.device)
        self.output_counts[row].zero_()
        self.seen[row].zero_()
        self.seen[row, ids[(ids >= 0) & (ids < self.vocab_size)]] = True

    def record(self, rows: int | Sequence[int] | torch.Tensor, tokens: int | Sequence[int] | torch.Tensor) -> None:
        """Add one generated token to each of some rows (one scatter for all of them: pass the whole step).

        Args:
            rows: The slots (an int, or n of them).
            tokens: The token sampled for each (n,).
        """
        rows_t = _ids(rows, self.seen.device)  # (n,)
        tok = _ids(tokens, self.seen.device)  # (n,)
        self.output_counts.index_put_((rows_t, tok), torch.ones_like(tok, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((rows_t, tok), torch.ones_like(tok, dtype=torch.bool))

    def append(self, tokens: torch.Tensor) -> None:
        """Add one generated token to every row, for a static batch whose row i is slot i.

        Args:
            tokens: (R,) the tokens just sampled.
        """
        idx = tokens.to(device=self.seen.device, dtype=torch.long)[:, None]  # (R, 1)
        self.output_counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.int32))
        self.seen.scatter_(1, idx, True)

    def move_row(self, src: int, dst: int) -> None:
        """Move a request's history from one slot to another (the engine compacts its rows).

        Args:
            src: The slot the request leaves.
            dst: The slot it takes.
        """
        self.output_counts[dst] = self.output_counts[src]
        self.seen[dst] = self.seen[src]

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The histories of some slots.

        Args:
            rows: (n,) int64 slots.

        Returns:
            `(seen, output_counts)`, each (n, V).
        """
        return self.seen.index_select(0, rows), self.output_counts.index_select(0, rows)


@dataclass(frozen=True)
class _Rows:
    """The rows a processing step applies to, and the step's parameters for them."""

    index: torch.Tensor  # (n,) int64 row indices
    values: torch.Tensor  # (n, k) the step's per-row parameters
    all_rows: bool  # every row of the batch: no gather/scatter needed


def _rows(
    params: Sequence[SamplingParams],
    use: Callable[[SamplingParams], bool],
    values: Callable[[SamplingParams], Sequence[float]],
    dtype: torch.dtype,
    device: torch.device | str,
) -> _Rows | None:
    # The selection is made on the host from Python values, so applying a step never waits on the device.
    picked = [i for i, p in enumerate(params) if use(p)]
    if not picked:
        return None
    index = torch.tensor(picked, dtype=torch.long, device=device)
    vals = torch.tensor([values(params[i]) for i in picked], dtype=dtype, device=device)  # (n, k)
    return _Rows(index, vals, len(picked) == len(params))


@dataclass(frozen=True)
class SamplingBatch:
    """The per-row parameters of a batch as device tensors, built once per batch composition.

    Build it with `SamplingBatch.build(params, device)` whenever rows join or leave the batch and reuse it for
    every decode step in between. Each `_Rows` field lists the rows a step applies to (None: no row).

    Attributes:
        params: The rows' parameters, in batch order.
        greedy: Row indices that decode greedily.
        sampled: Row indices that sample.
        greedy_index: (n_greedy,) int64 `greedy` on the device.
        sampled_index: (n_sampled,) int64 `sampled` on the device.
        penalties: Rows with a penalty; values (n, 3): repetition, frequency, presence.
        temperature: Sampling rows with temperature != 1; values (n, 1).
        top_k: Sampling rows with top_k > 0; values (n, 1) int64, clamped to >= 1 (min_tokens_to_keep).
        top_p: Sampling rows with top_p < 1; values (n, 1) holding `1 - top_p` (computed in float64 first,
            as transformers does).
        min_p: Sampling rows with min_p > 0; values (n, 1).
        wants_logprobs: Whether any row asked for logprobs.
        max_top_logprobs: The largest `top_logprobs` of the batch.
    """

    params: tuple[SamplingParams, ...]
    greedy: list[int]
    sampled: list[int]
    greedy_index: torch.Tensor
    sampled_index: torch.Tensor
    penalties: _Rows | None
    temperature: _Rows | None
    top_k: _Rows | None
    top_p: _Rows | None
    min_p: _Rows | None
    wants_logprobs: bool
    max_top_logprobs: int

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu") -> SamplingBatch:
        """Build the per-row parameter tensors of a batch.

        Args:
            params: One `SamplingParams` per row.
            device: The device the logits live on.

        Returns:
            The batch's parameters, ready for `process_logits` and `sample`.
        """
        f32 = torch.float32
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        return cls(
            params=tuple(params),
            greedy=greedy,
            sampled=sampled,
            greedy_index=torch.tensor(greedy, dtype=torch.long, device=device),
            sampled_index=torch.tensor(sampled, dtype=torch.long, device=device),
            penalties=_rows(
                params,
                lambda p: p.has_penalties,
                lambda p: [p.repetition_penalty, p.frequency_penalty, p.presence_penalty],
                f32,
                device,
            ),
            # Warpers only apply to sampling rows: a greedy row's argmax is the same with or without them.
            temperature=_rows(
                params, lambda p: not p.is_greedy and p.temperature != 1.0, lambda p: [p.temperature], f32, device
            ),
            top_k=_rows(  # min_tokens_to_keep=1
                params, lambda p: not p.is_greedy and p.top_k > 0, lambda p: [max(p.top_k, 1)], torch.long, device
            ),
            top_p=_rows(  # `1 - top_p` in float64 first, as transformers compares against it
                params, lambda p: not p.is_greedy and p.top_p < 1.0, lambda p: [1.0 - p.top_p], f32, device
            ),
            min_p=_rows(params, lambda p: not p.is_greedy and p.min_p > 0.0, lambda p: [p.min_p], f32, device),
            wants_logprobs=any(p.wants_logprobs for p in params),
            max_top_logprobs=max((p.top_logprobs for p in params), default=0),
        )

    def __len__(self) -> int:
        return len(self.params)


def _as_batch(params: SamplingBatch | Sequence[SamplingParams], device: torch.device) -> SamplingBatch:
    return params if isinstance(params, SamplingBatch) else SamplingBatch.build(params, device)


def _penalise(logits: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Repetition penalty, then frequency and presence penalties; logits (n, V), values (n, 3)."""
    rep, freq, pres = values[:, 0:1], values[:, 1:2], values[:, 2:3]  # (n, 1) each
    # CTRL: dividing a negative logit would raise its probability, so negative logits are multiplied instead.
    penalised = torch.where(logits < 0, logits * rep, logits / rep)  # (n, V)
    logits = torch.where(seen, penalised, logits)
    counts = counts.to(logits.dtype)  # (n, V)
    # Two subtractions as vLLM; a zero penalty subtracts exact zeros, leaving the row unchanged.
    logits = logits - freq * counts
    return logits - pres * (counts > 0).to(logits.dtype)


def _temperature(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return logits / values  # (n, V) / (n, 1)


def _top_k(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # One topk at the largest k of these rows; its values come sorted, so each row's own k-th largest logit is
    # a gather away. As transformers: drop what is strictly below it (ties with the k-th survive).
    k = values.clamp(max=logits.shape[-1])  # (n, 1)
    top = torch.topk(logits, int(k.max()), dim=-1).values  # (n, k_max)
    kth = top.gather(1, k - 1)  # (n, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def _top_p(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    # transformers' TopPLogitsWarper: sort ascending, drop the low tail whose cumulative probability is
    # <= 1 - top_p, always keeping the most likely token (min_tokens_to_keep=1).
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # (n, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (n, V)
    remove = cumulative <= values  # values hold 1 - top_p, (n, 1)
    remove[:, -1] = False
    remove = remove.scatter(1, sorted_idx, remove)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def _min_p(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)  # (n, V)
    top = probs.amax(dim=-1, keepdim=True)  # (n, 1)
    remove = probs < values * top
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)  # keep at least the most likely token
    return logits.masked_fill(remove, -math.inf)


def _on_rows(
    logits: torch.Tensor,
    rows: _Rows | None,
    step: Callable[..., torch.Tensor],
    *per_row: torch.Tensor,
) -> torch.Tensor:
    """Apply `step` to the selected rows of `logits` (B, V); `per_row` tensors (n, ...) belong to those rows.

    Rows outside the selection are left untouched (subset steps write in place into `logits`, which
    `process_logits` owns).
    """
    if rows is None:
        return logits
    if rows.all_rows:
        return step(logits, rows.values, *per_row)
    sub = step(logits.index_select(0, rows.index), rows.values, *per_row)  # (n, V)
    return logits.index_copy_(0, rows.index, sub)


def _slots(rows: Sequence[int] | None, picked: torch.Tensor) -> torch.Tensor:
    """The state slots of the logits rows `picked` (n,): `rows[picked]`, or `picked` itself when rows is None."""
    if rows is None:
        return picked
    return torch.as_tensor(rows, dtype=torch.long, device=picked.device).index_select(0, picked)


def process_logits(
    logits: torch.Tensor,
    state: SamplingState | None,
    rows: Sequence[int] | None,
    params: SamplingBatch | Sequence[SamplingParams],
) -> torch.Tensor:
    """Apply each row's penalties and warpers to a batch of next-token logits.

    Order and semantics follow transformers: repetition penalty, then (OpenAI) frequency and presence penalties,
    then, for sampling rows only, temperature, top-k, top-p and min-p (filtered tokens become -inf, the most
    likely token is always kept). Greedy rows get the penalties only. A row whose parameters disable a step is
    left bit for bit unchanged by it.

    Args:
        logits: (B, V) next-token logits (cast to fp32); not modified.
        state: The token histories; required when any row has a penalty.
        rows: The state slot of each logits row (B,); None means slot i for row i.
        params: The batch's `SamplingBatch`, or one `SamplingParams` per row (then built on the fly).

    Returns:
        (B, V) fp32 processed logits (a new tensor, or `logits` itself when no step applies to any row).

    Raises:
        ValueError: If the sizes do not match, or a row has a penalty but no state is given.
    """
    batch = _as_batch(params, logits.device)
    if logits.dim() != 2 or logits.shape[0] != len(batch) or (rows is not None and len(rows) != len(batch)):
        raise ValueError(f"logits must be (B, V) with one params and one slot per row, got {tuple(logits.shape)}")
    steps = (batch.penalties, batch.temperature, batch.top_k, batch.top_p, batch.min_p)
    out = logits.float()
    if all(s is None for s in steps):
        return out
    out = out.clone() if out is logits else out  # steps on a subset of rows write in place: never the caller's
    if batch.penalties is not None:
        if state is None:
            raise ValueError("a row has a repetition/frequency/presence penalty: pass the SamplingState")
        seen, counts = state.gather(_slots(rows, batch.penalties.index))  # (n, V) each
        out = _on_rows(out, batch.penalties, _penalise, seen, counts)
    out = _on_rows(out, batch.temperature, _temperature)
    out = _on_rows(out, batch.top_k, _top_k)
    out = _on_rows(out, batch.top_p, _top_p)
    return _on_rows(out, batch.min_p, _min_p)


@dataclass
class SampleOutput:
    """What one decode step chose, per row.

    Attributes:
        tokens: (B,) int64 next tokens.
        logprobs: (B,) fp32 logprob of each chosen token under the RAW model distribution (log-softmax of the
            logits before penalties and temperature), or None when no row asked for logprobs.
        top_ids: (B, N) int64 the N most likely tokens of each row under the raw distribution, most likely first,
            where N is the batch's largest `top_logprobs`; row i uses its first `params[i].top_logprobs`.
            None when N is 0.
        top_logprobs: (B, N) fp32 their logprobs, descending.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None

    def logprob_lists(self, params: Sequence[SamplingParams]) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Each row's logprobs as Python values, in one device transfer.

        Args:
            params: The rows' parameters (which rows asked, and for how many top tokens).

        Returns:
            Per row: None when it did not ask, else `(chosen token's logprob, [(token id, logprob), ...])` with
            its `top_logprobs` most likely tokens, most likely first.
        """
        if self.logprobs is None:
            return [None] * len(params)
        chosen = self.logprobs.tolist()
        ids = self.top_ids.tolist() if self.top_ids is not None else [[] for _ in params]
        lps = self.top_logprobs.tolist() if self.top_logprobs is not None else [[] for _ in params]
        return [
            (chosen[i], list(zip(ids[i][: p.top_logprobs], lps[i][: p.top_logprobs]))) if p.wants_logprobs else None
            for i, p in enumerate(params)
        ]


def _draw(processed: torch.Tensor, batch: SamplingBatch, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Gumbel-max draws for the sampling rows: (n,) tokens distributed as softmax of their processed logits."""
    noise = torch.empty(len(batch.sampled), processed.shape[-1], dtype=processed.dtype, device=processed.device)
    uniform = torch.empty(noise.shape, dtype=torch.float64)  # (n, V): the CPU generators' draws
    on_cpu = []
    for j, row in enumerate(batch.sampled):  # noise: (n, V)
        # The one loop over rows: each request draws from its own generator, so a seeded request gets the same
        # numbers whatever else shares its batch.
        gen = generators[row]
        if gen is None:
            raise ValueError(f"row {row} samples (temperature > 0) but has no generator: see make_generator")
        if gen.device.type == "cpu":  # with CUDA logits too: the same numbers on any device
            uniform[j].uniform_(generator=gen)
            on_cpu.append(j)
        else:
            noise[j].exponential_(generator=gen)
    if on_cpu:
        # torch's CPU `exponential_` is -log1p(-u) of the generator's float64 uniforms one at a time; drawing the
        # uniforms and transforming them as one tensor gives the same numbers (and leaves the generator in the same
        # state) about 3x faster.
        exp1 = uniform.neg_().log1p_().neg_().to(noise.dtype)  # (n, V) ~ Exp(1)
        if len(on_cpu) == len(batch.sampled):
            noise.copy_(exp1)
        else:
            rows = torch.tensor(on_cpu)
            noise.index_copy_(0, rows.to(noise.device), exp1.index_select(0, rows).to(noise.device))
    # argmax(logits - log E) with E ~ Exp(1) picks token i with probability softmax(logits)_i, using only
    # elementwise ops and an exact max, so a row's result cannot depend on the batch. The clamp guards against
    # an exponential sample of exactly 0 (-log 0 = inf would tie every token).
    scores = processed.index_select(0, batch.sampled_index) - noise.clamp_min_(1e-30).log_()  # (n, V)
    return ops.argmax_rows(scores)


def sample(
    logits: torch.Tensor,
    state: SamplingState | None,
    rows: Sequence[int] | None,
    params: SamplingBatch | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> SampleOutput:
    """Pick the next token of every row: `process_logits`, then argmax (greedy rows) or a seeded draw.

    Greedy rows take the argmax of their penalised logits (the raw logits when they have no penalty; ties go
    to the lowest id). Sampling rows draw from the softmax of their processed logits with their own generator.

    Args:
        logits: (B, V) next-token logits from the model; not modified.
        state: The token histories; required when any row has a penalty. Not updated here: call
            `state.record(rows, out.tokens)` once the tokens are accepted.
        rows: The state slot of each logits row (B,); None means slot i for row i.
        params: The batch's `SamplingBatch`, or one `SamplingParams` per row.
        generators: One generator per row (from `make_generator`, best on the logits' device); None is allowed
            for greedy rows.

    Returns:
        The tokens, and the raw logprobs when any row asked for them.
    """
    batch = _as_batch(params, logits.device)
    if len(generators) != len(batch):
        raise ValueError(f"need one generator per row: {len(batch)} rows, {len(generators)} generators")
    processed = process_logits(logits, state, rows, batch)  # (B, V)
    if not batch.sampled:
        tokens = ops.argmax_rows(processed)  # (B,)
    else:
        tokens = torch.empty(len(batch), dtype=torch.long, device=logits.device)  # (B,)
        if batch.greedy:
            greedy = ops.argmax_rows(processed.index_select(0, batch.greedy_index))
            tokens.index_copy_(0, batch.greedy_index, greedy)
        tokens.index_copy_(0, batch.sampled_index, _draw(processed, batch, generators))
    out = SampleOutput(tokens)
    if batch.wants_logprobs:
        raw = torch.log_softmax(logits.float(), dim=-1)  # (B, V): the model's own distribution
        out.logprobs = raw.gather(1, tokens[:, None]).squeeze(1)  # (B,)
        if batch.max_top_logprobs > 0:
            out.top_logprobs, out.top_ids = torch.topk(raw, batch.max_top_logprobs, dim=-1)  # (B, N), sorted
    return out
