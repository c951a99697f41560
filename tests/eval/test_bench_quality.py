"""The metric of benchmarks/bench_quality.py: sliding-window perplexity equals transformers' own loss-based count."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nomoat.models.checkpoint import load_model

from hf_models import VOCAB, make_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_quality  # noqa: E402


@pytest.mark.parametrize(("n", "window", "stride"), [(100, 32, 12), (33, 32, 31), (10, 32, 8), (64, 16, 1)])
def test_windows_score_every_token_but_the_first_once(n: int, window: int, stride: int) -> None:
    scored: list[int] = []
    for start, end, k in bench_quality.windows(n, window, stride):
        assert end - start <= window and start < end - k  # every scored token has context in its window
        scored += range(end - k, end)
    assert scored == list(range(1, n))


def test_windows_need_context() -> None:
    with pytest.raises(ValueError, match="stride"):
        list(bench_quality.windows(100, 32, 32))


def _transformers_sliding_ppl(model, ids: torch.Tensor, window: int, stride: int) -> float:
    """The Hugging Face "perplexity of fixed-length models" recipe: labels masked with -100, `outputs.loss`."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        trg_len = end - prev_end
        input_ids = ids[None, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        valid = int((target[:, 1:] != -100).sum())  # the model shifts labels left by one
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll_sum / n_tokens)


def test_perplexity_equals_transformers_on_a_tiny_random_model(tmp_path: Path) -> None:
    hf = make_hf_model("llama_tied_mqa", tmp_path)
    ours = load_model(tmp_path, dtype="float32", device="cpu")
    ids = torch.randint(3, VOCAB, (100,), generator=torch.Generator().manual_seed(0))
    want = _transformers_sliding_ppl(hf, ids, window=32, stride=12)
    got = bench_quality.perplexity(bench_quality.nomoat_scorer(ours), ids.tolist(), window=32, stride=12)
    assert got == pytest.approx(want, rel=1e-5)
    # The windows matter: with less context per token the same model scores differently.
    assert bench_quality.perplexity(bench_quality.nomoat_scorer(ours), ids.tolist(), 8, 7) != pytest.approx(want)


def test_kl_divergence_and_agreement_against_a_reference() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(VOCAB, 16, generator=g), dim=-1)  # (V, 16): next-token rows per token

    def scorer(temperature: float):
        def score(chunk, n):
            logits = table[torch.tensor(list(chunk))[-n - 1 : -1] % 16] / temperature  # (n, 16)
            return torch.log_softmax(logits, dim=-1)

        return score

    ids = torch.randint(0, 16, (50,), generator=g).tolist()
    stats = bench_quality.score_windows({"ref": scorer(1.0), "same": scorer(1.0), "hot": scorer(2.0)}, ids, 16, 5,
                                        {"same": "ref", "hot": "ref"})  # fmt: skip
    assert stats["same"]["kld"] == pytest.approx(0.0, abs=1e-12) and stats["same"]["top1_agreement"] == 1.0
    p = torch.softmax(table[torch.tensor(ids[:-1]) % 16], -1).double()  # every scored position once
    q = torch.softmax(table[torch.tensor(ids[:-1]) % 16] / 2.0, -1).double()
    assert stats["hot"]["kld"] == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-6)
    assert stats["ref"]["tokens"] == len(ids) - 1


def test_ratios_compare_increases_over_each_engines_own_reference() -> None:
    def s(ppl: float, kld: float = 0.0) -> dict[str, float]:
        return {"perplexity": ppl, "kld": kld}

    stats = {"nomoat_fp32": s(10.0), "nomoat_int8": s(10.1, 0.002), "nomoat_int4": s(11.0, 0.1),
             "llamacpp_f32": s(20.0), "llamacpp_q8_0": s(20.0, 0.001), "llamacpp_q4_0": s(24.0, 0.2),
             "llamacpp_q4_0_pure": s(25.0, 0.25)}  # fmt: skip
    r = bench_quality.ratios_of(stats)
    assert r["int4_ppl_increase_vs_q4_0"] == pytest.approx(0.1 / 0.2)
    assert r["int4_pure_ppl_increase_vs_q4_0_pure"] == pytest.approx(0.1 / 0.25)
    assert r["int8_ppl_increase_vs_q8_0"] is None  # the peer lost nothing: no meaningful ratio
    assert r["int8_kld_vs_q8_0"] == pytest.approx(2.0) and r["fp32_ppl_vs_llamacpp_f32"] == pytest.approx(0.5)


def test_increase_gap_and_its_standard_error_from_paired_tokens() -> None:
    gen = np.random.default_rng(0)
    base = gen.uniform(1.0, 5.0, 4000)
    q8 = base + gen.normal(0.004, 0.05, 4000)  # the peer's variant: NLL up by 0.004 per token on average
    ours = base + gen.normal(0.006, 0.05, 4000)
    stats = {name: {"perplexity": float(np.exp(v.mean())), "kld": 0.001, "token_nll": torch.from_numpy(v)}
             for name, v in (("nomoat_fp32", base), ("nomoat_int8", ours), ("llamacpp_f32", base),
                             ("llamacpp_q8_0", q8))}  # fmt: skip
    r = bench_quality.ratios_of(stats)
    gap = np.exp((ours - base).mean()) - np.exp((q8 - base).mean())
    se = np.std(ours - q8, ddof=1) / np.sqrt(4000) * np.exp((q8 - base).mean())
    assert r["int8_ppl_increase_minus_q8_0"] == pytest.approx(gap, abs=1e-5)
    assert r["int8_ppl_increase_minus_q8_0_stderr"] == pytest.approx(se, abs=1e-5)
    assert 0.0005 < r["int8_ppl_increase_minus_q8_0_stderr"] < 0.002  # std 0.07 over 4000 tokens: about 0.0011
    assert "int4_ppl_increase_minus_q4_0" not in r  # no int4 rows: no gap
