"""Pure loss functions of preference tuning: sigmoid DPO, IPO, SimPO, ORPO and KTO, as TRL defines them.

Each function takes sequence log-probabilities (already reduced over the completion tokens) and returns the loss of
every pair or example, unreduced, so a recipe can sum them and let the training loop normalise by the number of
pairs; plus the implicit rewards that the metrics report. `sequence_logps` turns logits and labels into those
log-probabilities. Nothing here touches a model, a reference or the data.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PAIRED_METHODS = ("dpo", "ipo", "simpo", "orpo")
METHODS = (*PAIRED_METHODS, "kto")
NEEDS_REFERENCE = ("dpo", "ipo", "kto")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's label tokens, and how many label tokens each row has.

    Args:
        logits: (N, T, V) next-token logits, position t predicting token t + 1.
        labels: (N, T) token ids, `IGNORE_INDEX` where a position is not part of the completion.

    Returns:
        `(logps, counts)`, both (N,): the sum of log p(label) over the completion and its token count.
    """
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO: `-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))` per pair.

    Args:
        chosen: (P,) policy log-probabilities of the chosen completions (summed over tokens).
        rejected: (P,) same for the rejected completions.
        ref_chosen: (P,) reference log-probabilities of the chosen completions.
        ref_rejected: (P,) same for the rejected completions.
        beta: Strength of the implicit KL penalty.

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each (P,); the rewards are `beta * log-ratio`, detached.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: `(per-token chosen log-ratio - per-token rejected log-ratio - 1 / (2 beta))^2` per pair.

    The log-ratios are divided by each completion's token count (as TRL does), so beta means the same at any length.

    Args:
        chosen: (P,) policy log-probabilities of the chosen completions (summed over tokens).
        rejected: (P,) same for the rejected completions.
        ref_chosen: (P,) reference log-probabilities of the chosen completions.
        ref_rejected: (P,) same for the rejected completions.
        chosen_tokens: (P,) completion token counts of the chosen sequences.
        rejected_tokens: (P,) same for the rejected sequences.
        beta: The regularisation strength (tau in the paper).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each (P,).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma_beta_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: `-log sigmoid(beta * (mean chosen logp - mean rejected logp) - gamma)`, no reference model.

    Args:
        chosen_mean: (P,) policy log-probabilities of the chosen completions averaged over their tokens.
        rejected_mean: (P,) same for the rejected completions.
        beta: Reward scale.
        gamma_beta_ratio: The target margin gamma divided by beta (TRL's `simpo_gamma` is gamma itself).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each (P,); rewards are `beta * mean logp`.
    """
    logits = chosen_mean - rejected_mean - gamma_beta_ratio
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, chosen_nll: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO: the chosen completion's NLL minus `beta * log sigmoid(log odds(chosen) - log odds(rejected))`.

    Args:
        chosen_mean: (P,) policy log-probabilities of the chosen completions averaged over their tokens.
        rejected_mean: (P,) same for the rejected completions.
        chosen_nll: (P,) the SFT term of each pair (TRL uses the batch's mean token NLL on the chosen completions).
        beta: Weight of the odds-ratio term (lambda in the paper).

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each (P,); rewards are `beta * mean logp`.
    """
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO on unpaired feedback: `1 - sigmoid(beta (ratio - KL))` if desirable, else `1 - sigmoid(beta (KL - ratio))`.

    Args:
        logps: (N,) policy log-probabilities of the completions (summed over tokens).
        ref_logps: (N,) reference log-probabilities of the same completions.
        desirable: (N,) bool, the feedback label of each completion.
        kl: () the batch's detached KL estimate, clamped at 0 (TRL's reference point z0).
        beta: Reward scale.
        desirable_weight: Weight of the desirable examples' losses.
        undesirable_weight: Weight of the undesirable examples' losses.

    Returns:
        `(losses, rewards)`, both (N,) in the input order; rewards are `beta * log-ratio`, detached.
    """
    ratio = logps - ref_logps
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def kto_kl(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean log-ratio on mismatched prompt/completion pairs, detached, at least 0.

    Args:
        mismatched_logps: (N,) policy log-probabilities of completions paired with another row's prompt.
        ref_mismatched_logps: (N,) reference log-probabilities of the same.

    Returns:
        () the KL estimate.
    """
    return (mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0)
