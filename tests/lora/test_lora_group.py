"""LoRA groups (q/k/v, gate/up trained with one adapter product each) equal the layers run one by one."""

from __future__ import annotations

import pytest
import torch

from nomoat.config import LoRAConfig
from nomoat.lora import group as group_mod
from nomoat.lora import inject_lora, lora_layers, lora_parameters, merge_lora
from nomoat.models.checkpoint import load_model

from hf_models import make_hf_model, padded_batch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("group_models")
    out = {}
    for name in ("llama3", "qwen2", "phi3"):
        make_hf_model(name, root / name)
        out[name] = root / name
    return out


def _lora_model(folder, **lora):
    model = load_model(folder)
    inject_lora(model, LoRAConfig(r=4, alpha=8, **lora))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    model.train()
    return model


def _loss_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask)
    loss = (out.float().square() * mask[..., None]).mean()
    loss.backward()
    return loss.detach(), out.detach(), {k: p.grad.clone() for k, p in lora_parameters(model).items()}


def _count_group_calls(monkeypatch):
    calls = []
    real = group_mod._LoRAGroupFn.apply
    monkeypatch.setattr(group_mod._LoRAGroupFn, "apply", lambda *a: calls.append(len(a[1])) or real(*a))
    return calls


@pytest.mark.parametrize("family", ["llama3", "qwen2", "phi3"])
def test_groups_equal_layers_one_by_one(folders, family, monkeypatch):
    ids, mask = padded_batch(T=20)
    model = _lora_model(folders[family])
    calls = _count_group_calls(monkeypatch)
    loss, out, grads = _loss_and_grads(model, ids, mask)
    n_layers = model.config.num_layers
    assert sorted(calls) == [2] * n_layers + [3] * n_layers  # every q/k/v and gate/up ran as a group
    group_mod.detach_groups(model)
    calls.clear()
    loss_ref, out_ref, grads_ref = _loss_and_grads(model, ids, mask)
    assert not calls
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) >= 11 * n_layers  # phi3 shares A within a group
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], rtol=1e-4, atol=1e-7, msg=k)


def test_groups_step_aside_where_they_do_not_apply(folders, monkeypatch):
    ids, mask = padded_batch(T=12)
    calls = _count_group_calls(monkeypatch)
    _loss_and_grads(_lora_model(folders["llama3"], dropout=0.1), ids, mask)  # one dropout mask per layer, as PEFT
    _loss_and_grads(_lora_model(folders["llama3"], use_dora=True), ids, mask)
    model = _lora_model(folders["llama3"])
    with torch.no_grad():
        model(ids, attention_mask=mask)  # inference runs the plain layers
    merge_lora(model)
    model(ids, attention_mask=mask).sum()  # merged: plain linear layers
    assert not calls
    model = _lora_model(folders["llama3"])
    model(ids, attention_mask=mask).sum()
    assert calls  # and the same model unmerged does group
