"""GRPO and RLOO losses against TRL 1.16: `GRPOTrainer._compute_loss` and `RLOOTrainer._compute_loss` run on a
stand-in trainer whose model returns fixed per-token log-probabilities; advantages against TRL's `nanstd` formula.
"""

from __future__ import annotations

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nomoat.train import rl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl", minversion="1.16")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

N, T, G, MAX_NEW = 6, 7, 3, 10
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _case(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(N, T, dtype=torch.long)
    for r in range(N):
        mask[r, T - r % 4 :] = 0  # completions of different lengths
    logps = -torch.rand(N, T, generator=g) * 3
    old = logps + torch.randn(N, T, generator=g) * 0.3  # ratios on both sides of the clipping range
    ref = logps + torch.randn(N, T, generator=g) * 0.2
    adv = torch.randn(N, generator=g)
    return {"logps": logps, "old": old, "ref": ref, "adv": adv, "mask": mask}


def _accelerator() -> SimpleNamespace:
    same = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(gather=same, gather_for_metrics=same, reduce=same, num_processes=1, sync_gradients=True,
                           process_index=0, device=torch.device("cpu"))  # fmt: skip


def _trl_grpo(case: dict, leaf: torch.Tensor, loss_type: str, beta: float, eps: float) -> torch.Tensor:
    args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1)
    stub = SimpleNamespace(
        args=args, beta=beta, loss_type=loss_type, epsilon_low=eps, epsilon_high=eps, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, aux_loss_enabled=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW,
        accelerator=_accelerator(), _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
    )  # fmt: skip
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": case["mask"],
              "advantages": case["adv"], "old_per_token_logps": case["old"], "ref_per_token_logps": case["ref"],
              "num_items_in_batch": case["mask"].sum()}  # fmt: skip
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_match_trl(loss_type: str, beta: float) -> None:
    case = _case()
    ours_leaf = case["logps"].clone().requires_grad_()
    theirs_leaf = case["logps"].clone().requires_grad_()
    loss_sum, units, stats = rl.grpo_loss(ours_leaf, case["old"], case["ref"] if beta else None, case["adv"],
                                          case["mask"].bool(), beta, 0.2, loss_type, MAX_NEW)  # fmt: skip
    ours = loss_sum / units
    theirs = _trl_grpo(case, theirs_leaf, loss_type, beta, 0.2)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, **TOL)
    assert 0 < int(stats["clipped"][case["mask"].bool()].sum()) < int(case["mask"].sum())  # clipping is exercised
    if beta:  # the KL term is TRL's k3 estimate
        r = case["ref"] - case["logps"]
        torch.testing.assert_close(stats["kl"], torch.exp(r) - r - 1, **TOL)


def test_rloo_loss_and_gradient_match_trl() -> None:
    case = _case(1)
    m = case["mask"]
    ours_leaf = case["logps"].clone().requires_grad_()
    theirs_leaf = case["logps"].clone().requires_grad_()
    loss_sum, units, _ = rl.rloo_loss(ours_leaf, case["old"], case["adv"], m.bool(), 0.2)
    stub = SimpleNamespace(epsilon_low=0.2, epsilon_high=0.2, aux_loss_enabled=False, accelerator=_accelerator(),
                           model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
                           _get_per_token_logps_and_entropies=lambda *a, **k: (theirs_leaf, torch.zeros_like(
                               theirs_leaf), None))  # fmt: skip
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": m,
              "old_logps": (case["old"] * m).sum(1), "advantages": case["adv"]}  # fmt: skip
    theirs = RLOOTrainer._compute_loss(stub, None, inputs)
    ours = loss_sum / units
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, **TOL)


def test_advantages_follow_trls_formulas() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0, 0.5, 1.5, 3.0])
    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    std = nanstd(grouped, dim=1).repeat_interleave(G)
    torch.testing.assert_close(rl.grpo_advantages(rewards, G), (rewards - mean) / (std + 1e-4), **TOL)
    baseline = ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    torch.testing.assert_close(rl.rloo_advantages(rewards, G), rewards - baseline, **TOL)
