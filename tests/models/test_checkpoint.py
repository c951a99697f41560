"""Checkpoint IO: sharded loads, tied/untied heads, saving for transformers, legacy configs, pickle refusal."""

from __future__ import annotations

import json

import pytest
import torch

from nomoat.models.checkpoint import (
    CheckpointError,
    convert_pickle_checkpoint,
    iter_safetensors,
    load_model,
    save_model,
)
from nomoat.models.families import UnsupportedModelError, config_from_hf

from hf_models import make_hf_model, padded_batch


def _logits(model, ids, mask):
    """Logits at real tokens, for a nomoat model or a transformers one (given the same positions)."""
    with torch.no_grad():
        if isinstance(model, torch.nn.Module) and hasattr(model, "config") and hasattr(model.config, "family"):
            out = model(ids, attention_mask=mask)
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    return out[mask.bool()]


def test_sharded_load(tmp_path):
    hf = make_hf_model("qwen3", tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(load_model(tmp_path, "float32", "cpu"), ids, mask), _logits(hf, ids, mask),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama_tied_mqa", "llama3"])
def test_tied_and_untied(name, tmp_path):
    hf = make_hf_model(name, tmp_path)
    ours = load_model(tmp_path, "float32", "cpu")
    tied = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert tied == hf.config.tie_word_embeddings
    keys = {name for name, _ in iter_safetensors(tmp_path / "model.safetensors")}
    assert ("lm_head.weight" in keys) == (not tied)


@pytest.mark.parametrize("name", ["phi3", "gemma2", "llama_tied_mqa", "qwen2"])
def test_save_reloads_in_transformers(name, tmp_path):
    from hf_models import load_hf

    make_hf_model(name, tmp_path / "src")
    ours = load_model(tmp_path / "src", "float32", "cpu")
    with torch.no_grad():  # change the weights so the saved file cannot be the original one copied
        ours.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
        ours.model.layers[1].mlp.up_proj.weight.mul_(0.5)
    save_model(ours, tmp_path / "out")
    keys = {k for k, _ in iter_safetensors(tmp_path / "out" / "model.safetensors")}
    if name == "phi3":  # fused back into the checkpoint layout of the family
        assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
        assert not any("q_proj" in k or "gate_proj" in k for k in keys)
    hf = load_hf(tmp_path / "out")
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(hf, ids, mask), _logits(ours, ids, mask), atol=1e-5, rtol=1e-5)


def test_save_sharded_roundtrip(tmp_path):
    make_hf_model("llama3", tmp_path / "src")
    ours = load_model(tmp_path / "src", "float32", "cpu")
    save_model(ours, tmp_path / "out", max_shard_bytes=100_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    again = load_model(tmp_path / "out", "float32", "cpu")
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(again, ids, mask), _logits(ours, ids, mask), atol=0, rtol=0)


def test_save_bf16_writes_bf16(tmp_path):
    make_hf_model("llama3", tmp_path / "src")
    save_model(load_model(tmp_path / "src", "bfloat16", "cpu"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for _, t in iter_safetensors(tmp_path / "out" / "model.safetensors")} == {torch.bfloat16}


def test_legacy_rope_config_format(tmp_path):
    """Hub checkpoints carry `rope_theta` + `rope_scaling` (transformers 4 format), not `rope_parameters`."""
    from hf_models import load_hf

    make_hf_model("llama3", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if "type" in params else "rope_type": params.pop("rope_type"), **params}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(load_model(tmp_path, "float32", "cpu"), ids, mask),
                               _logits(load_hf(tmp_path), ids, mask), atol=1e-5, rtol=1e-5)


def test_pickle_refused_then_converted(tmp_path):
    hf = make_hf_model("llama3", tmp_path)
    state = load_model(tmp_path, "float32", "cpu").state_dict()
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle.*--trust-pickle"):
        load_model(tmp_path, "float32", "cpu")
    convert_pickle_checkpoint(tmp_path, tmp_path / "converted")
    ids, mask = padded_batch()
    torch.testing.assert_close(_logits(load_model(tmp_path / "converted", "float32", "cpu"), ids, mask),
                               _logits(hf, ids, mask), atol=1e-5, rtol=1e-5)


def test_pickle_conversion_refuses_code(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        convert_pickle_checkpoint(tmp_path)


def test_unknown_family_names_supported():
    with pytest.raises(UnsupportedModelError, match="llama.*mistral.*phi3.*qwen2"):
        config_from_hf({"model_type": "gpt2", "vocab_size": 10})


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_model(tmp_path)


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama3", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks model.layers.1.mlp.down_proj.weight"):
        load_model(tmp_path, "float32", "cpu")
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path, "float32", "cpu")


def test_a_truncated_download_says_download_again(tmp_path):
    """Every loader (not only training) names a file cut short as such, not by its offsets."""
    from nomoat.util.errors import ModelError

    make_hf_model("llama3", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    with pytest.raises(ModelError, match="truncated or corrupt") as err:
        load_model(tmp_path, "float32", "cpu")
    assert "download it again" in err.value.hint


def test_inference_only_models_refuse_to_save(tmp_path):
    from nomoat.models.packed import pack_model
    from nomoat.models.quantize import quantize_model

    make_hf_model("llama3", tmp_path / "src")
    for change in (pack_model, lambda m: quantize_model(m, "int8")):
        model = load_model(tmp_path / "src", "float32", "cpu")
        change(model)
        with pytest.raises(CheckpointError, match="inference-only"):
            save_model(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()
