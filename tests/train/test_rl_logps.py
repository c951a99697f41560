"""`label_logps` (RL's per-token log-probabilities in head chunks) against plain torch's log-softmax of full logits."""

from __future__ import annotations

import pytest
import torch

from nomoat.data import IGNORE_INDEX
from nomoat.train.logps import label_logps

from train_utils import random_lora_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_lora_model(tmp_path_factory.mktemp("m") / "m")


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (3, 14), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # prompts
    labels[1, 11:] = IGNORE_INDEX  # a shorter completion (padding)
    return ids, labels


def _reference(model, ids, labels, temperature):
    """Plain torch: full logits / t, log-softmax, the label's entry, zero where masked."""
    logits = model(ids).float()
    if temperature > 0:
        logits = logits / temperature
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return lp * mask, mask


def _grads(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("trained_head", [False, True])
def test_label_logps_and_gradients_equal_the_full_log_softmax(model, temperature, trained_head):
    ids, labels = _batch()
    model.lm_head.weight.requires_grad_(trained_head)  # a trained head takes the recomputing path
    try:
        want, want_mask = _reference(model, ids, labels, temperature)
        hidden = model(ids, return_hidden=True)
        got, mask = label_logps(model, hidden, labels, temperature, chunk=4)  # chunks cut across rows
        assert torch.equal(mask, want_mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))  # any upstream gradient
        for g_got, g_want in zip(_grads(model, (got * weights).sum()), _grads(model, (want * weights).sum())):
            torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)
    finally:
        model.lm_head.weight.requires_grad_(False)


def test_label_logps_without_grad_and_without_labels(model):
    ids, labels = _batch()
    with torch.no_grad():
        want, _ = _reference(model, ids, labels, 1.0)
        got, _ = label_logps(model, model(ids, return_hidden=True), labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    none = torch.full_like(labels, IGNORE_INDEX)
    got, mask = label_logps(model, model(ids, return_hidden=True), none)
    assert not mask.any() and got.shape == mask.shape and not got.any()
