"""The sampling step against transformers' logits processors, hand-computed penalties and seeded draws."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nomoat.generate.sampling import (
    SamplingBatch,
    SamplingParams,
    SamplingState,
    make_generator,
    process_logits,
    sample,
)

V = 257


def _hf_processors(p: SamplingParams) -> LogitsProcessorList:
    """transformers' processors for one row's params, in generate()'s order (only the enabled ones)."""
    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty)))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(float(p.temperature)))
    if p.top_k > 0:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    return procs


def _logits(b: int, v: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v) * scale


def _history(prompts: list[list[int]], outputs: list[list[int]], v: int = V) -> SamplingState:
    """A history built the engine's way: the prompts, then one append per decode step (equal output lengths)."""
    hist = SamplingState.from_prompts(prompts, v)
    for step in zip(*outputs):
        hist.append(torch.tensor(step))
    return hist


def _assert_same(got: torch.Tensor, want: torch.Tensor, atol: float = 0.0) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different tokens filtered"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=0)


KNOBS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.9),
    SamplingParams(top_k=1),
    SamplingParams(top_k=17),
    SamplingParams(top_k=V + 5),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.3),
    SamplingParams(top_p=1e-6),
    SamplingParams(top_p=1e-8),  # 1 - top_p rounds to 1.0 in fp32: only min_tokens_to_keep saves the top token
    SamplingParams(min_p=0.05),
    SamplingParams(min_p=0.5),
    SamplingParams(min_p=1.0),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
    SamplingParams(temperature=1.5, top_k=100, top_p=0.5, min_p=0.1, repetition_penalty=0.9),
]


def _knob_id(p: SamplingParams) -> str:
    default = SamplingParams()
    return ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(default, k))


@pytest.mark.parametrize("params", KNOBS, ids=_knob_id)
def test_each_knob_matches_transformers(params: SamplingParams) -> None:
    b = 4
    logits = _logits(b)
    prompts = torch.randint(0, V, (b, 12))
    outputs = torch.randint(0, V, (b, 5))
    hist = _history(prompts.tolist(), outputs.tolist())
    got = process_logits(logits, hist, None, [params] * b)
    want = _hf_processors(params)(torch.cat([prompts, outputs], dim=1), logits.clone())
    if params.top_k <= V:  # top_k above the vocabulary keeps everything, as in transformers
        assert not torch.equal(got, logits), "the knob changed nothing: the test would prove nothing"
    _assert_same(got, want, atol=0.0)


def test_top_p_boundary_matches_transformers() -> None:
    # Four equal logits give exact probabilities 0.25 each: the cumulative sum hits 1 - top_p = 0.5 exactly, and
    # transformers drops tokens whose cumulative probability is <= the cut (here two of the four).
    logits = torch.full((1, 8), -math.inf)
    logits[0, [1, 3, 4, 6]] = 0.0
    got = process_logits(logits, None, None, [SamplingParams(top_p=0.5)])
    want = TopPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), logits.clone())
    assert int(torch.isfinite(got).sum()) == 2
    assert torch.equal(got, want)


def test_mixed_batch_equals_each_row_alone() -> None:
    rows = [
        *KNOBS,
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5, temperature=0.5, top_k=3),
    ]
    b = len(rows)
    logits = _logits(b)
    prompts = torch.randint(0, V, (b, 9)).tolist()
    outputs = torch.randint(0, V, (b, 4)).tolist()
    batched = process_logits(logits, _history(prompts, outputs), None, rows)
    for i, p in enumerate(rows):
        alone = process_logits(logits[i : i + 1], _history([prompts[i]], [outputs[i]]), None, [p])
        assert torch.equal(batched[i : i + 1], alone), f"row {i} ({p}) depends on its batch"


def test_default_rows_are_untouched_bit_for_bit() -> None:
    rows = [SamplingParams(), KNOBS[-1], SamplingParams(seed=5, max_new_tokens=3), KNOBS[-2], SamplingParams()]
    logits = _logits(len(rows))
    logits[0, :10] = -math.inf  # already-masked tokens (e.g. a grammar) must stay as they are too
    before = logits.clone()
    hist = _history(torch.randint(0, V, (len(rows), 6)).tolist(), torch.randint(0, V, (len(rows), 3)).tolist())
    out = process_logits(logits, hist, None, rows)
    assert torch.equal(logits, before), "the caller's logits were modified"
    for i in (0, 2, 4):
        assert torch.equal(out[i], logits[i])
    for i in (1, 3):
        assert not torch.equal(out[i], logits[i])


def test_penalties_use_the_right_histories_hand_computed() -> None:
    # Prompt [1, 2], output [2, 3, 3] over a vocabulary of 6.
    logits = torch.tensor([[1.0, 2.0, -1.0, 4.0, -2.0, 0.5]])
    hist = SamplingState.from_prompts([[1, 2]], 6)
    for tok in (2, 3, 3):
        hist.append(torch.tensor([tok]))
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = process_logits(logits, hist, None, [p])
    # Repetition over prompt + output {1, 2, 3}: 2/2, -1*2, 4/2. Frequency/presence over the output only:
    # token 2 once (-0.5 - 0.25), token 3 twice (-1.0 - 0.25); token 1 is only in the prompt.
    want = torch.tensor([[1.0, 1.0, -2.0 - 0.75, 2.0 - 1.25, -2.0, 0.5]])
    assert torch.equal(got, want)


def test_state_updates_match_counts_from_scratch() -> None:
    b, steps = 5, 30
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (1, 4, 9, 2, 7)]
    state = SamplingState.from_prompts(prompts, V)
    generated = torch.randint(0, 20, (steps, b))  # a small range, so tokens repeat
    for t in range(steps):
        if t % 2:
            state.append(generated[t])
        else:
            state.record([4, 0, 2, 1, 3], generated[t][[4, 0, 2, 1, 3]])  # any row order
    for i in range(b):
        out = generated[:, i].tolist()
        assert state.output_counts[i].tolist() == [out.count(tok) for tok in range(V)]
        assert state.seen[i].tolist() == [tok in out or tok in prompts[i] for tok in range(V)]


def test_state_slots_follow_the_engine_rows() -> None:
    state = SamplingState(4, V)
    state.reset_row(2, [5, 6, V + 3])  # an id beyond the logits (wider embedding table) is ignored
    state.record(2, 7)
    state.record([2, 0], [7, 1])
    assert state.seen[2].nonzero().flatten().tolist() == [5, 6, 7]
    assert state.output_counts[2, 7] == 2 and state.output_counts[0, 1] == 1
    seen2, counts2 = state.seen[2].clone(), state.output_counts[2].clone()
    state.move_row(2, 1)
    assert torch.equal(state.seen[1], seen2) and torch.equal(state.output_counts[1], counts2)
    state.reset_row(1, [9])  # a new request takes the row: nothing of the old one remains
    assert state.seen[1].nonzero().flatten().tolist() == [9] and state.output_counts[1].sum() == 0
    state.reset_row(3, [9], SamplingParams())  # no penalty: the row is never read, so nothing is written
    assert not state.seen[3].any()


def test_rows_map_logits_to_state_slots() -> None:
    # The engine samples a subset of its rows (a prefill samples one): rows name their slots.
    rows = [SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3), SamplingParams(presence_penalty=1.1)]
    state = SamplingState(5, V)
    state.reset_row(4, [1, 2, 3])
    state.reset_row(1, [10])
    state.record([4, 1, 4], [3, 11, 3])
    logits = _logits(2)
    got = process_logits(logits, state, [4, 1], rows)
    want0 = process_logits(logits[:1], _history([[1, 2, 3]], [[3, 3]]), None, rows[:1])
    want1 = process_logits(logits[1:], _history([[10]], [[11]]), None, rows[1:])
    assert torch.equal(got, torch.cat([want0, want1]))
    assert not torch.equal(got, logits)


def test_penalty_without_history_is_an_error() -> None:
    with pytest.raises(ValueError, match="SamplingState"):
        process_logits(_logits(1), None, None, [SamplingParams(presence_penalty=0.5)])


def _decode(rows: list[SamplingParams], steps: int, logits_seq: torch.Tensor, gens=None) -> torch.Tensor:
    """Run `steps` sampling steps over fixed logits (steps, B, V); returns (steps, B) tokens."""
    gens = gens or [make_generator(p) for p in rows]
    batch = SamplingBatch.build(rows)
    hist = SamplingState.from_prompts([[0]] * len(rows), logits_seq.shape[-1])
    toks = []
    for t in range(steps):
        out = sample(logits_seq[t], hist, None, batch, gens)
        hist.append(out.tokens)
        toks.append(out.tokens)
    return torch.stack(toks)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    steps = 20
    mine = SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=1.1, seed=1234)
    row_logits = torch.randn(steps, 1, V)
    alone = _decode([mine], steps, row_logits)[:, 0]
    again = _decode([mine], steps, row_logits)[:, 0]
    assert torch.equal(alone, again)
    others = [
        SamplingParams(),
        SamplingParams(temperature=0),
        SamplingParams(top_k=3, seed=7),
        SamplingParams(temperature=0.3, min_p=0.1, frequency_penalty=1.0),
    ]
    for pos in (0, 2, 4):
        rows = [*others[:pos], mine, *others[pos:]]
        logits = torch.randn(steps, len(rows), V)
        logits[:, pos] = row_logits[:, 0]
        in_batch = _decode(rows, steps, logits)[:, pos]
        assert torch.equal(in_batch, alone), f"seeded row changed at batch position {pos}"
    other_seed = _decode(
        [SamplingParams(temperature=1.2, top_p=0.95, repetition_penalty=1.1, seed=99)], steps, row_logits
    )[:, 0]
    assert not torch.equal(other_seed, alone), "the seed has no effect"


def test_unseeded_rows_follow_the_global_rng() -> None:
    rows = [SamplingParams(), SamplingParams(temperature=0.9)]
    logits = torch.randn(10, 2, V)
    torch.manual_seed(42)
    first = _decode(rows, 10, logits)
    torch.manual_seed(42)
    assert torch.equal(_decode(rows, 10, logits), first)


def test_greedy_rows_take_the_argmax() -> None:
    rows = [
        SamplingParams(temperature=0, top_k=3, top_p=0.1, min_p=0.9, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0, repetition_penalty=3.0),
    ]
    logits = _logits(len(rows))
    hist = SamplingState.from_prompts([[], [], [], [int(logits[3].argmax())]], V)
    out = sample(logits, hist, None, rows, [None, None, make_generator(rows[2]), None])
    assert out.tokens[0] == logits[0].argmax() and out.tokens[1] == logits[1].argmax()
    # A greedy row with a penalty takes the argmax of its penalised logits, as transformers and vLLM do.
    penalised = process_logits(logits[3:], hist, [3], rows[3:])
    assert out.tokens[3] == penalised[0].argmax() and out.tokens[3] != logits[3].argmax()


def test_all_greedy_batch_applies_penalties() -> None:
    rows = [SamplingParams(temperature=0, repetition_penalty=3.0), SamplingParams(temperature=0)]
    logits = _logits(2)
    hist = SamplingState.from_prompts([[int(logits[0].argmax())], [int(logits[1].argmax())]], V)
    out = sample(logits, hist, None, rows, [None, None])
    assert out.tokens[0] != logits[0].argmax() and out.tokens[1] == logits[1].argmax()


# Upper 0.1% points of the chi-square distribution by degrees of freedom.
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            temperature=0.6,
            top_k=9,
            top_p=0.9,
            min_p=0.02,
            repetition_penalty=1.5,
            frequency_penalty=0.4,
            presence_penalty=0.3,
        ),
    ],
)
def test_draws_follow_the_processed_softmax(params: SamplingParams) -> None:
    v, n = 12, 20_000
    torch.manual_seed(3)
    logits = (torch.randn(1, v) * 1.5).expand(n, v).contiguous()
    hist = SamplingState.from_prompts([[0, 1, 2]] * n, v)
    hist.append(torch.full((n,), 1))
    gen = make_generator(SamplingParams(seed=11))
    # n rows sharing one generator: n independent draws from the same distribution in a single call.
    tokens = sample(logits, hist, None, [params] * n, [gen] * n).tokens
    probs = torch.softmax(process_logits(logits[:1], hist, [0], [params])[0].double(), dim=-1)
    counts = torch.bincount(tokens, minlength=v).double()
    allowed = probs > 0
    assert counts[~allowed].sum() == 0, "a filtered token was drawn"
    expected = probs[allowed] * n
    chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(allowed.sum()) - 1], f"chi2 {chi2:.1f}"
    # The same test must reject draws from the unprocessed distribution when processing changes it.
    raw = torch.softmax(logits[0].double(), dim=-1) * n
    if params != SamplingParams():
        assert float(((counts - raw) ** 2 / raw).sum()) > CHI2_999[v - 1]


def test_draws_are_gumbel_max_with_torch_exponential_noise() -> None:
    """Each sampling row takes argmax(processed - log E), E from torch's `exponential_` on its own generator (the
    reference: the noise drawn row by row as torch draws it), and leaves that generator where `exponential_` would."""
    rows = [SamplingParams(seed=5), SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=40, seed=9),
            SamplingParams(seed=5, top_p=0.8)]  # fmt: skip
    logits = _logits(len(rows), v=4099, scale=1.0)
    gens, refs = [make_generator(p) for p in rows], [make_generator(p) for p in rows]
    for _ in range(3):
        got = sample(logits, None, None, rows, gens).tokens
        processed = process_logits(logits, None, None, rows)
        for i, p in enumerate(rows):
            if p.is_greedy:
                assert int(got[i]) == int(processed[i].argmax())
                continue
            noise = torch.empty(logits.shape[1]).exponential_(generator=refs[i])
            assert int(got[i]) == int((processed[i] - noise.clamp_min(1e-30).log()).argmax())
    for i, p in enumerate(rows):
        if not p.is_greedy:
            assert torch.equal(gens[i].get_state(), refs[i].get_state())


def test_logprobs_are_the_raw_log_softmax() -> None:
    rows = [
        SamplingParams(temperature=0.5, repetition_penalty=1.5, top_k=4, logprobs=True, seed=0),
        SamplingParams(temperature=0, logprobs=True, top_logprobs=5),
        SamplingParams(top_logprobs=20),
    ]
    logits = _logits(len(rows))
    hist = SamplingState.from_prompts([list(range(50))] * len(rows), V)
    out = sample(logits, hist, None, rows, [make_generator(p) for p in rows])
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert torch.equal(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == (3, 20)
    order = torch.argsort(ref, dim=-1, descending=True)
    assert torch.equal(out.top_ids, order[:, :20])
    assert torch.equal(out.top_logprobs, ref.gather(1, order[:, :20]))
    assert bool((out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all())
    lists = out.logprob_lists(rows)
    assert [len(x[1]) for x in lists if x is not None] == [0, 5, 20]
    assert lists[0] is not None and lists[0][0] == pytest.approx(float(ref[0, out.tokens[0]]))
    assert lists[1] is not None and [t for t, _ in lists[1][1]] == order[1, :5].tolist()
    assert out.logprob_lists([SamplingParams(), *rows[1:]])[0] is None  # a row that did not ask gets None


def test_no_logprobs_unless_asked() -> None:
    rows = [SamplingParams(), SamplingParams(temperature=0)]
    out = sample(_logits(2), None, None, rows, [make_generator(SamplingParams()), None])
    assert out.logprobs is None and out.top_ids is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("max_new_tokens", 0),
        ("top_logprobs", 21),
        ("top_logprobs", -1),
        ("stop", [""]),
        ("stop_token_ids", [-3]),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_greedy_flag() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(temperature=0.1).is_greedy
    SamplingParams(top_p=1.0, min_p=1.0, frequency_penalty=-2, presence_penalty=2, top_logprobs=20)  # edges are valid
