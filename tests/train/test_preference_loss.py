"""Preference losses against TRL 1.16: the same tiny model, batch and hyper-parameters give the same loss and grads.

TRL's own loss code is driven on a stand-in trainer object: `DPOTrainer._compute_loss` and `KTOTrainer._compute_loss`
(with precomputed reference log-probabilities), `CPOTrainer.cpo_loss` for SimPO and `ORPOTrainer.odds_ratio_loss`
for ORPO. The stand-in model returns TRL's per-token log-probabilities computed by TRL's `selective_log_softmax`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nomoat.train import preference_loss as pl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl", minversion="1.16")
from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

V, H, T, P = 17, 8, 9, 3  # vocab, hidden, sequence length, pairs
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(V, H), torch.nn.Tanh(), torch.nn.Linear(H, V)).float()


def _batch(rows: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, T) ids and a completion mask: a prompt of 3 tokens then completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for r in range(rows):
        mask[r, 3 : T - (r % 3)] = 1
    return ids, mask


def _labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(mask == 0, pl.IGNORE_INDEX)


class _TrlModel:
    """What TRL's trainers expect of `model(..., labels=, fused_lm_head=True)`: per-token log-probs and stats."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.training = module, True

    def __call__(self, input_ids, labels, **_):  # noqa: ANN001, ANN204
        logits = self.module(input_ids)[:, :-1]  # (N, T-1, V)
        targets = labels[:, 1:]
        logps = selective_log_softmax(logits, targets.clamp(min=0)) * (targets != -100)
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _stub(module: torch.nn.Module, **fields) -> SimpleNamespace:
    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    return SimpleNamespace(
        model=_TrlModel(module), accelerator=accel, aux_loss_enabled=False, precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        label_smoothing=0.0, **fields,
    )


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


def _compare(nomoat_fn, trl_fn) -> tuple[float, float]:  # noqa: ANN001
    """Run both on copies of one tiny model; assert loss and grads match; return the max differences."""
    ours_model, trl_model = _tiny_model(), _tiny_model()
    ours, theirs = nomoat_fn(ours_model), trl_fn(trl_model)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    for a, b in zip(_grads(ours_model), _grads(trl_model), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(_grads(ours_model), _grads(trl_model), strict=True))
    return (ours - theirs).abs().item(), grad_diff


def _ref_logps(n: int) -> torch.Tensor:
    return -torch.rand(n, generator=torch.Generator().manual_seed(7)) * 10 - 5


@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_dpo_and_ipo_match_trl(method: str) -> None:
    ids, mask = _batch(2 * P)  # rows [chosen..., rejected...]
    ref = _ref_logps(2 * P)
    beta = 0.3

    def ours(model):  # noqa: ANN001, ANN202
        logps, counts = pl.sequence_logps(model(ids), _labels(ids, mask))
        c, r = logps.chunk(2)
        rc, rr = ref.chunk(2)
        if method == "dpo":
            losses = pl.dpo_loss(c, r, rc, rr, beta)[0]
        else:
            cc, rc_n = counts.chunk(2)
            losses = pl.ipo_loss(c, r, rc, rr, cc, rc_n, beta)[0]
        return losses.sum() / P

    def theirs(model):  # noqa: ANN001, ANN202
        stub = _stub(model, ld_alpha=None, f_divergence_type="reverse_kl", beta=beta, use_weighting=False,
                     loss_types=["sigmoid" if method == "dpo" else "ipo"], loss_weights=[1.0])
        rc, rr = ref.chunk(2)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
                  "ref_chosen_logps": rc, "ref_rejected_logps": rr}
        return DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)

    loss_diff, grad_diff = _compare(ours, theirs)
    print(f"{method}: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")


def test_simpo_matches_trl() -> None:
    ids, mask = _batch(2 * P)
    beta, gamma = 2.0, 0.5

    def ours(model):  # noqa: ANN001, ANN202
        logps, counts = pl.sequence_logps(model(ids), _labels(ids, mask))
        c, r = (logps / counts).chunk(2)
        return pl.simpo_loss(c, r, beta, gamma / beta)[0].sum() / P

    def theirs(model):  # noqa: ANN001, ANN202
        stub = _stub(model, alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta)
        logps = CPOTrainer.get_batch_logps(model(ids), _labels(ids, mask), average_log_prob=True)
        c, r = logps.chunk(2)
        return CPOTrainer.cpo_loss(stub, c, r)[0].mean()

    loss_diff, grad_diff = _compare(ours, theirs)
    print(f"simpo: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")


def test_orpo_matches_trl() -> None:
    ids, mask = _batch(2 * P)
    beta = 0.25

    def nll(model):  # noqa: ANN001, ANN202
        """TRL's SFT term: mean token cross-entropy over the chosen completions of the batch."""
        logits, labels = model(ids)[:P, :-1], _labels(ids, mask)[:P, 1:]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))

    def ours(model):  # noqa: ANN001, ANN202
        logps, counts = pl.sequence_logps(model(ids), _labels(ids, mask))
        c, r = (logps / counts).chunk(2)
        return pl.orpo_loss(c, r, nll(model).expand(P), beta)[0].sum() / P

    def theirs(model):  # noqa: ANN001, ANN202
        stub = _stub(model, beta=beta)
        logps = ORPOTrainer.get_batch_logps(model(ids), _labels(ids, mask), average_log_prob=True)
        c, r = logps.chunk(2)
        return nll(model) - ORPOTrainer.odds_ratio_loss(stub, c, r)[0].mean()

    loss_diff, grad_diff = _compare(ours, theirs)
    print(f"orpo: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")


def test_kto_matches_trl() -> None:
    n = 5
    ids, mask = _batch(n)
    kl_ids, kl_mask = _batch(n, seed=3)
    label = torch.tensor([True, False, True, True, False])
    ref, ref_kl = _ref_logps(n), _ref_logps(n) + 1.5
    beta, w_good, w_bad = 0.2, 1.0, 1.3

    def ours(model):  # noqa: ANN001, ANN202
        logps, _ = pl.sequence_logps(model(ids), _labels(ids, mask))
        with torch.no_grad():
            kl_logps, _ = pl.sequence_logps(model(kl_ids), _labels(kl_ids, kl_mask))
        kl = pl.kto_kl(kl_logps, ref_kl)
        return pl.kto_loss(logps, ref, label, kl, beta, w_good, w_bad)[0].mean()

    def theirs(model):  # noqa: ANN001, ANN202
        stub = _stub(model, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=w_good,
                     undesirable_weight=w_bad)
        stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
                  "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
                  "KL_completion_mask": kl_mask, "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
        return KTOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)

    loss_diff, grad_diff = _compare(ours, theirs)
    print(f"kto: max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e}")


def test_kto_kl_is_positive_and_detached() -> None:
    x = torch.tensor([-1.0, -2.0], requires_grad=True)
    assert pl.kto_kl(x, torch.zeros(2)).item() == 0.0
    assert not pl.kto_kl(x, x.detach() - 3).requires_grad
