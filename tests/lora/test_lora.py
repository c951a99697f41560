"""LoRA invariants on nomoat's decoder: B=0 is the base, merge == unmerged, only adapters train, state-dict keys."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from nomoat.config import LoRAConfig
from nomoat.lora import (
    LoRALinear,
    count_parameters,
    disable_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    unload_lora,
    unmerge_lora,
)
from nomoat.models.checkpoint import load_model

from hf_models import make_hf_model, padded_batch

FAMILIES = ["llama3", "llama_bias", "qwen2", "gemma2", "phi3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    out = {}
    for name in FAMILIES + ["llama_tied_mqa"]:
        make_hf_model(name, root / name)
        out[name] = root / name
    return out


def randomize(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
            if layer.lora_magnitude_vector is not None:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=g))


def logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dora", [False, True])
def test_zero_B_is_base_and_merge_roundtrip(folders, family, dora):
    ids, mask = padded_batch()
    model = load_model(folders[family], dtype=torch.float32, device="cpu")
    base = logits(model, ids, mask)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, LoRAConfig(r=4, alpha=8, use_dora=dora))
    # B = 0 at init: exactly the base (DoRA's magnitude equals the row norms, so its factor is exactly 1 too).
    torch.testing.assert_close(logits(model, ids, mask), base, rtol=0, atol=1e-6 if dora else 0)
    randomize(model)
    unmerged = logits(model, ids, mask)
    assert (unmerged - base).abs().max() > 1e-3
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    merged = logits(model, ids, mask)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    w_once = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)  # no-op
    for n, p in model.named_parameters():
        assert torch.equal(p, w_once[n]), n
    with disable_lora(model):
        torch.testing.assert_close(logits(model, ids, mask), base, rtol=0, atol=1e-5)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model, ids, mask), merged, rtol=0, atol=1e-6)
    unmerge_lora(model)
    unmerge_lora(model)  # no-op
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids, mask), unmerged, rtol=0, atol=1e-5)


def test_disable_context_restores_after_exception(folders):
    ids, mask = padded_batch()
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    base = logits(model, ids, mask)
    inject_lora(model, LoRAConfig(r=4))
    randomize(model)
    adapted = logits(model, ids, mask)
    with pytest.raises(KeyError), disable_lora(model):
        torch.testing.assert_close(logits(model, ids, mask), base, rtol=0, atol=0)
        raise KeyError("boom")
    torch.testing.assert_close(logits(model, ids, mask), adapted, rtol=0, atol=0)


def test_base_names_and_weight_sharing(folders):
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    w = q.weight
    base_keys = set(model.state_dict())
    inject_lora(model, LoRAConfig(r=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is w  # shared, not copied
    keys = set(model.state_dict())
    assert base_keys <= keys  # a base checkpoint's names still name the base weights
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert not w.requires_grad
    # PEFT's init: B zero, A Kaiming-uniform with a = sqrt(5), i.e. bound 1/sqrt(in).
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(layer.in_features)
    assert layer.lora_A.weight.std() > 0.3 / math.sqrt(layer.in_features)


def test_only_adapters_get_gradients(folders):
    ids, mask = padded_batch()
    model = load_model(folders["llama_bias"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=4, use_dora=True, modules_to_save=["lm_head"]))
    randomize(model)
    model.train()
    model(ids, attention_mask=mask).logsumexp(-1).mean().backward()
    trainable = trainable_parameters(model)
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert set(trainable) == set(lora_parameters(model)) | {"lm_head.weight"}
    n_adapter = sum(p.numel() for p in lora_parameters(model).values())
    t, total = count_parameters(model)
    assert t == n_adapter + model.lm_head.weight.numel()
    assert total == sum(p.numel() for p in model.parameters())


def test_tied_modules_to_save_untied_with_warning(folders, caplog):
    model = load_model(folders["llama_tied_mqa"], dtype=torch.float32, device="cpu")
    emb = model.model.embed_tokens.weight
    assert model.lm_head.weight is emb
    with caplog.at_level(logging.WARNING):
        inject_lora(model, LoRAConfig(r=2, modules_to_save=["lm_head"]))
    assert "tied" in caplog.text
    assert model.lm_head.weight is not emb and torch.equal(model.lm_head.weight, emb)
    assert model.lm_head.weight.requires_grad and not emb.requires_grad
    # Both listed: they stay tied and train as one.
    model = load_model(folders["llama_tied_mqa"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2, modules_to_save=["lm_head", "embed_tokens"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.requires_grad


def test_rslora_scaling():
    cfg = LoRAConfig(r=16, alpha=32, use_rslora=True)
    assert cfg.scaling == pytest.approx(32 / 4)
    assert LoRAConfig(r=16, alpha=32).scaling == pytest.approx(2.0)
    lin = nn.Linear(8, 6)
    layer = LoRALinear.from_linear(lin, cfg)
    assert layer.scaling == pytest.approx(8.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 8)
    expected = lin(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 8.0
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_dropout_train_vs_eval():
    lin = nn.Linear(16, 16)
    layer = LoRALinear.from_linear(lin, LoRAConfig(r=4, dropout=0.5))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    layer.train()
    t1, t2 = layer(x), layer(x)
    assert not torch.equal(t1, e1) and not torch.equal(t1, t2)


def test_all_linear_excludes_head(folders):
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    names = set(lora_layers(model))
    assert len(names) == 2 * 7 and "lm_head" not in names
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2, target_modules=["all-linear"]))  # what `--target all-linear` passes
    assert set(lora_layers(model)) == names
    with pytest.raises(ValueError, match="give it alone"):
        LoRAConfig(r=2, target_modules=["all-linear", "q_proj"])
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert set(lora_layers(model)) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"}


def test_bad_target_and_config_errors(folders):
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"c_attn.*named: .*down_proj.*q_proj"):
        inject_lora(model, LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'wte'"):
        inject_lora(model, LoRAConfig(r=2, modules_to_save=["wte"]))
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(r=2))
    for kwargs, msg in [
        (dict(r=0), "r must be a positive integer"),
        (dict(alpha=0), "alpha must be a positive"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(bias="all"), "bias must be 'none'"),
        (dict(init="pissa"), "init must be one of"),
        (dict(target_modules=[]), "target_modules"),
    ]:
        with pytest.raises(ValueError, match=msg):
            LoRAConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown lora keys: rank"):
        LoRAConfig.from_dict({"rank": 4})
    cfg = LoRAConfig(r=4, alpha=8.0, use_dora=True, modules_to_save=["lm_head"])
    assert LoRAConfig.from_dict(cfg.to_dict()) == cfg


def test_state_dict_keys_and_unload(folders):
    ids, mask = padded_batch()
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    base = logits(model, ids, mask)
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True,
                                  modules_to_save=["lm_head"]))  # fmt: skip
    sd = lora_state_dict(model)
    expected = {f"model.layers.{i}.self_attn.{p}.{t}" for i in range(2) for p in ("q_proj", "v_proj")
                for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")} | {"lm_head.weight"}  # fmt: skip
    assert set(sd) == expected
    randomize(model)
    adapted = logits(model, ids, mask)
    merge_lora(model)
    unload_lora(model)
    assert not lora_layers(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(model, ids, mask), adapted, rtol=0, atol=1e-5)
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2))
    randomize(model)
    unload_lora(model)  # unmerged: back to the base
    torch.testing.assert_close(logits(model, ids, mask), base, rtol=0, atol=0)


def test_phi3_parts_share_lora_A(folders):
    model = load_model(folders["phi3"], dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A
    assert mlp.gate_proj.lora_A is mlp.up_proj.lora_A and mlp.down_proj.lora_A is not mlp.up_proj.lora_A
    assert attn.o_proj.lora_A is not attn.q_proj.lora_A


def test_fused_swiglu_down_matches_plain_autograd(tmp_path, monkeypatch):
    """The MLP path that recomputes silu(gate) * up in backward gives the same output and gradients."""
    from nomoat.lora import LoRAConfig, inject_lora, layers, lora_parameters
    from nomoat.models.checkpoint import load_model

    from hf_models import make_hf_model

    # Count the fused path's forward and backward passes, so the test fails when it does not run.
    calls = {"forward": 0, "backward": 0}
    fn = layers._SwiGLUDownLoRA
    real_forward, real_backward = fn.forward, fn.backward

    def counted(kind, real):
        return staticmethod(lambda *a: calls.__setitem__(kind, calls[kind] + 1) or real(*a))

    monkeypatch.setattr(fn, "forward", counted("forward", real_forward))
    monkeypatch.setattr(fn, "backward", counted("backward", real_backward))

    make_hf_model("llama_bias", tmp_path)  # MLP biases too
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.05)
    model.train()
    ids = torch.randint(3, 500, (2, 12))
    n_layers = len(model.model.layers)
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        for layer in model.model.layers:
            if not fused:
                layer.mlp.down_proj.swiglu_forward = lambda gate, up: None  # force the plain path
        out = model(ids)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in lora_parameters(model).items()}))
        # The fused path ran in every layer, forward and backward, and only when it was not switched off.
        assert calls == {"forward": n_layers, "backward": n_layers}, (fused, calls)
    (out_f, g_f), (out_p, g_p) = results
    torch.testing.assert_close(out_f, out_p, atol=1e-6, rtol=1e-5)
    assert g_f.keys() == g_p.keys()
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_p[name], atol=1e-7, rtol=1e-4)


def test_one_delta_function_serves_the_training_layer_and_the_bank(monkeypatch):
    """`LoRALinear` and the bank's per-row layer both add `lora_delta` (the same numbers), and it is the textbook
    `scaling * x A^T B^T`; `delta_weight` is `scaling * B A`, the update merging adds."""
    import nomoat.lora.bank as bank_mod
    import nomoat.lora.layers as layers_mod
    from nomoat.lora.delta import delta_weight, lora_delta

    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRALinear.from_linear(base, LoRAConfig(r=3, alpha=6))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    a, b, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    x = torch.randn(5, 12)
    ref = (x.double() @ a.double().t() @ b.double().t() * s).float()
    torch.testing.assert_close(lora_delta(x, a, b, s), ref, rtol=1e-5, atol=1e-6)
    out = base(x)
    assert lora_delta(x, a, b, s, out=out) is out  # in place
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(delta_weight(a, b, s), (b @ a) * s)
        torch.testing.assert_close(layer.delta_weight(), delta_weight(a, b, s))
    calls = []
    for mod in (layers_mod, bank_mod):
        monkeypatch.setattr(mod, "lora_delta", lambda *args, _f=lora_delta, **kw: calls.append(1) or _f(*args, **kw))
    with torch.no_grad():
        y_layer = layer(x)
    bank = bank_mod.AdapterBank(nn.Sequential(base))
    bank.tensors["t"] = {"0": (a.detach().clone(), b.detach().t().contiguous(), s)}
    wrapped = bank._wrap("0")
    wrapped.rebuild()
    monkeypatch.setattr(bank_mod, "GROUPED_MM", False)
    with torch.no_grad(), bank.plan([(slice(0, 5), (("t", 1.0),))]):
        y_bank = bank.model(x)
    assert len(calls) == 2  # one call from each
    torch.testing.assert_close(y_bank, y_layer, rtol=1e-6, atol=1e-6)
