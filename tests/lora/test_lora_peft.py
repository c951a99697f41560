"""PEFT interop: adapters saved by nomoat load in `peft` with the same logits, and adapters made by `peft` load in
nomoat with the same logits (plain LoRA, rsLoRA, DoRA, modules_to_save; Phi-3's fused projections)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from nomoat.config import LoRAConfig
from nomoat.lora import (
    AdapterError,
    disable_lora,
    inject_lora,
    load_adapter,
    lora_layers,
    read_adapter_config,
    read_provenance,
    save_adapter,
)
from nomoat.models.checkpoint import load_model

from hf_models import load_hf, make_hf_model, padded_batch

FAMILIES = ["llama3", "qwen2", "gemma2", "phi3"]
VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_models")
    out = {}
    for name in FAMILIES:
        make_hf_model(name, root / name)
        out[name] = root / name
    return out


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def compare(ours, theirs):
    ids, mask = padded_batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)
    return got


def randomize_ours(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=g))
        if "lm_head" in getattr(model, "lora_modules_to_save", []):
            model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.05)


def randomize_peft(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_nomoat_adapter_loads_in_peft(folders, tmp_path, family, variant):
    model = load_model(folders[family], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8, **VARIANTS[variant])
    inject_lora(model, cfg)
    randomize_ours(model)
    out = save_adapter(model, tmp_path / "adapter", cfg, str(folders[family]), provenance={"data": "x.jsonl"})
    peft_model = PeftModel.from_pretrained(load_hf(folders[family]), out).eval()
    compare(model, peft_model)
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM" and written["r"] == 4
    prov = read_provenance(out)
    assert prov["data"] == "x.jsonl" and prov["nomoat_version"] and prov["created_utc"].endswith("+00:00")
    # Round trip into a fresh nomoat model.
    again = load_model(folders[family], dtype=torch.float32, device="cpu")
    assert load_adapter(again, out).use_dora == cfg.use_dora
    compare(again, peft_model)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_modules_to_save_lm_head(folders, tmp_path, family):
    """llama3 has an untied head; qwen2's is tied (PEFT trains a copy of the head, so does nomoat)."""
    model = load_model(folders[family], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    inject_lora(model, cfg)
    randomize_ours(model)
    out = save_adapter(model, tmp_path / "a", cfg, str(folders[family]))
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    peft_model = PeftModel.from_pretrained(load_hf(folders[family]), out).eval()
    compare(model, peft_model)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_disable_lora_turns_modules_to_save_off_like_peft(folders, tmp_path, family):
    """With the adapter off (a DPO/GRPO reference model), a head in modules_to_save is the base head again, as in
    peft's `disable_adapter()`; on exit the trained head is back."""
    model = load_model(folders[family], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    inject_lora(model, cfg)
    randomize_ours(model)
    trained_head = model.lm_head.weight
    out = save_adapter(model, tmp_path / "a", cfg, str(folders[family]))
    peft_model = PeftModel.from_pretrained(load_hf(folders[family]), out).eval()
    with peft_model.disable_adapter(), disable_lora(model):
        off = compare(model, peft_model)
    on = compare(model, peft_model)
    assert model.lm_head.weight is trained_head and trained_head.requires_grad
    assert (off - on).abs().max() > 1e-3  # the head (and LoRA) matter, so the check means something
    with disable_lora(model):
        compare(model, load_hf(folders[family]).eval())  # the base model itself


@pytest.mark.parametrize("variant", ["lora", "dora", "lm_head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_nomoat(folders, tmp_path, family, variant):
    hf = load_hf(folders[family])
    kwargs = dict(use_dora=variant == "dora")
    if variant == "lm_head":
        kwargs["modules_to_save"] = ["lm_head"]
    peft_cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **kwargs)
    peft_model = get_peft_model(hf, peft_cfg)
    randomize_peft(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "p")
    peft_model.eval()
    ours = load_model(folders[family], dtype=torch.float32, device="cpu")
    cfg = load_adapter(ours, tmp_path / "p")
    assert cfg.r == 4 and cfg.alpha == 8 and cfg.use_dora == (variant == "dora")
    assert len(lora_layers(ours)) == 2 * 7
    compare(ours, peft_model)
    # ... and saving it again from nomoat gives the same tensors under the same keys (fused again on Phi-3).
    out = save_adapter(ours, tmp_path / "again", cfg, "base")
    mine, theirs = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "p" / "adapter_model.safetensors")
    assert set(mine) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0)


def test_dora_layer_equals_peft_layer():
    """One DoRA layer with bias, eval and train-with-dropout paths, against peft's on the same weights."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from nomoat.lora import LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    ours = LoRALinear.from_linear(base, LoRAConfig(r=4, alpha=6, use_dora=True, dropout=0.0))
    peft_cfg = LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["x"])
    theirs = PeftLinear(torch.nn.Linear(24, 16), "default", r=4, lora_alpha=6, config=peft_cfg)
    with torch.no_grad():
        theirs.base_layer.weight.copy_(base.weight)
        theirs.base_layer.bias.copy_(base.bias)
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        ours.lora_B.weight.normal_(0, 0.3)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        ours.lora_magnitude_vector.mul_(1.1)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    x = torch.randn(5, 24, requires_grad=True)
    y1, y2 = ours(x), theirs(x)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    (g1,) = torch.autograd.grad(y1.square().sum(), [ours.lora_magnitude_vector])
    (g2,) = torch.autograd.grad(y2.square().sum(), [theirs.lora_magnitude_vector["default"].weight])
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def _save_small(folders, tmp_path, **kwargs):
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=2, target_modules=["q_proj"], **kwargs)
    inject_lora(model, cfg)
    return save_adapter(model, tmp_path / "a", cfg, "base")


def _edit_config(folder, **changes):
    file = folder / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


def test_unsupported_and_broken_adapters(folders, tmp_path):
    fresh = lambda: load_model(folders["llama3"], dtype=torch.float32, device="cpu")  # noqa: E731
    out = _save_small(folders, tmp_path)
    _edit_config(out, some_future_field=123)  # unknown fields are ignored
    assert read_adapter_config(out).r == 2
    for change, msg in [
        (dict(peft_type="IA3"), "peft_type is 'IA3'"),
        (dict(fan_in_fan_out=True), "fan_in_fan_out=True is not supported"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
        (dict(target_modules=["c_attn"]), r"c_attn.*match no linear layer"),
    ]:
        out = _save_small(folders, tmp_path)
        _edit_config(out, **change)
        with pytest.raises(AdapterError, match=msg):
            load_adapter(fresh(), out)
    # Shape mismatch names the key and both shapes.
    out = _save_small(folders, tmp_path)
    file = out / "adapter_model.safetensors"
    sd = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = torch.zeros(2, 63)
    save_file(sd, file)
    with pytest.raises(
        AdapterError, match=r"layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \(2, 63\).*\(2, 64\)"
    ):
        load_adapter(fresh(), out)
    # Missing and unexpected tensors.
    out = _save_small(folders, tmp_path)
    sd = load_file(out / "adapter_model.safetensors")
    del sd[key]
    save_file(sd, out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lacks tensors"):
        load_adapter(fresh(), out)
    sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 64)
    sd[key] = torch.zeros(2, 64)
    save_file(sd, out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="no place for"):
        load_adapter(fresh(), out)
    # Embedding LoRA is refused.
    sd = load_file(out / "adapter_model.safetensors")
    del sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    sd["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(2, 512)
    save_file(sd, out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="embedding LoRA"):
        load_adapter(fresh(), out)
    # Pickle only: refused, with the way out.
    (out / "adapter_model.safetensors").rename(out / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle.*safetensors"):
        load_adapter(fresh(), out)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(fresh(), tmp_path / "nowhere")


def test_default_infix_keys_load(folders, tmp_path):
    """Some tools save PEFT keys with the adapter name (`lora_A.default.weight`); they load the same."""
    out = _save_small(folders, tmp_path, use_dora=True)
    file = out / "adapter_model.safetensors"
    sd = load_file(file)
    renamed = {}
    for k, v in sd.items():
        k = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        renamed[k.replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")] = v
    save_file(renamed, file)
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    load_adapter(model, out)
    got = model.model.layers[0].self_attn.q_proj.lora_magnitude_vector
    torch.testing.assert_close(got, sd["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"])


def test_save_replaces_existing_folder_atomically(folders, tmp_path):
    model = load_model(folders["llama3"], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=2, target_modules=["q_proj"])
    inject_lora(model, cfg)
    dest = tmp_path / "adapter"
    save_adapter(model, dest, cfg, "base", provenance={"run": 1})
    (dest / "stale.txt").write_text("old")
    save_adapter(model, dest, cfg, "base", provenance={"run": 2})
    assert read_provenance(dest)["run"] == 2 and not (dest / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary siblings left
    with pytest.raises(AdapterError, match="r=2.*r=8"):
        save_adapter(model, dest, LoRAConfig(r=8, target_modules=["q_proj"]), "base")


def test_phi3_partial_fused_group_saves_exactly(folders, tmp_path):
    """Only q_proj and v_proj targeted on Phi-3: saved as qkv_proj with zero k rows (DoRA factor 1 there)."""
    model = load_model(folders["phi3"], dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    inject_lora(model, cfg)
    randomize_ours(model)
    out = save_adapter(model, tmp_path / "a", cfg, "phi3")
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["qkv_proj"]
    peft_model = PeftModel.from_pretrained(load_hf(folders["phi3"]), out).eval()
    compare(model, peft_model)
