"""`nomoat export`: base + adapters merged into a Hugging Face folder; transformers loads it with the same logits."""

from __future__ import annotations

import json

import peft
import torch
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.export.merged import export_merged
from nomoat.lora import LoRAConfig, inject_lora, lora_parameters, save_adapter, trainable_parameters
from nomoat.lora.bank import AdapterBank
from nomoat.models.checkpoint import load_model

from hf_models import VOCAB, load_hf, make_hf_model, save_word_tokenizer

IDS = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _adapter(model_dir, out, seed: int, **cfg) -> None:
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    config = LoRAConfig(**{"r": 4, "alpha": 8, **cfg})
    inject_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if "lora_" in name else 0.02))
    save_adapter(model, out, config, base_model_name_or_path=str(model_dir))


def _peft_logits(model_dir, adapter_dir) -> torch.Tensor:
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(load_hf(model_dir), adapter_dir).eval()(IDS).logits


def test_merged_folder_loads_in_transformers_with_peft_logits(tmp_path):
    model_dir = tmp_path / "llama"
    make_hf_model("llama3", model_dir)
    save_word_tokenizer(model_dir)
    _adapter(model_dir, tmp_path / "a", seed=1)
    out = export_merged(model_dir, [(tmp_path / "a", 1.0)], tmp_path / "merged")
    with torch.no_grad():
        got = load_hf(out)(IDS).logits
    torch.testing.assert_close(got, _peft_logits(model_dir, tmp_path / "a"), atol=2e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_trained_head_on_a_tied_model_is_written_untied(tmp_path):
    model_dir = tmp_path / "qwen2"  # tied embeddings
    make_hf_model("qwen2", model_dir)
    save_word_tokenizer(model_dir)
    _adapter(model_dir, tmp_path / "a", seed=2, modules_to_save=["lm_head"])
    out = export_merged(model_dir, [(tmp_path / "a", 1.0)], tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        got = load_hf(out)(IDS).logits
    torch.testing.assert_close(got, _peft_logits(model_dir, tmp_path / "a"), atol=2e-5, rtol=1e-5)


def test_weighted_stack_equals_the_per_request_bank(tmp_path):
    """Merged weights (export) and the engine's unmerged per-row application agree for a weighted stack."""
    model_dir = tmp_path / "phi3"  # fused projections on disk
    make_hf_model("phi3", model_dir)
    save_word_tokenizer(model_dir)
    _adapter(model_dir, tmp_path / "a", seed=3)
    _adapter(model_dir, tmp_path / "b", seed=4, target_modules=["q_proj", "down_proj"])
    stack = [(tmp_path / "a", 1.0), (tmp_path / "b", -0.5)]
    out = export_merged(model_dir, stack, tmp_path / "merged", dtype="float32")
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    bank = AdapterBank(model)
    bank.add("a", tmp_path / "a")
    bank.add("b", tmp_path / "b")
    with torch.no_grad(), bank.plan([(slice(0, 2), (("a", 1.0), ("b", -0.5)))]):
        ref = model(IDS)
    with torch.no_grad():
        got = load_hf(out)(IDS).logits
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert not lora_parameters(model)


def test_export_command(tmp_path):
    model_dir = tmp_path / "llama"
    make_hf_model("llama3", model_dir)
    save_word_tokenizer(model_dir)
    _adapter(model_dir, tmp_path / "a", seed=5)
    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(model_dir), "--adapter", f"{tmp_path / 'a'}:0.5", "--out",
                             str(tmp_path / "m"), "--dtype", "bfloat16"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = runner.invoke(app, ["export", str(model_dir), "--out", str(tmp_path / "m")])
    assert again.exit_code == 2 and "--force" in again.output
    gguf = runner.invoke(app, ["export", str(model_dir), "--out", str(tmp_path / "g.gguf"), "--format", "gguf"])
    assert gguf.exit_code == 2 and "WordLevel" in gguf.output  # the word tokenizer has no llama.cpp equivalent
    bad = runner.invoke(app, ["export", str(model_dir), "--out", str(tmp_path / "x"), "--adapter", "no-such"])
    assert bad.exit_code == 2 and "not found" in bad.output
