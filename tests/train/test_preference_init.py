"""`--init-adapter`: preference tuning starts from a saved adapter; the base with its frozen weights is the reference.

The reference log-probabilities are checked against `transformers` + `peft` running the base with that adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_preference_recipe import _config, both_layouts

from nomoat.config.lora import LoRAConfig
from nomoat.lora import inject_lora, lora_state_dict, read_adapter_config, save_adapter
from nomoat.models.checkpoint import load_model
from nomoat.train.preference import PreferenceRecipe
from nomoat.train.preference_loss import sequence_logps

QUIET = Console(quiet=True)


def _init_adapter(tmp_path: Path) -> Path:
    """A rank-4 adapter on q/v with random (non-zero) B, as an SFT run would leave."""
    model_dir = tmp_path / "model"
    _config(tmp_path, "setup")  # writes the model and the pairs
    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    inject_lora(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if "lora_B" in name:
                t.copy_(torch.randn_like(t) * 0.5)
    return save_adapter(model, tmp_path / "sft-adapter", cfg, base_model_name_or_path=str(model_dir))


def _peft_logps(tmp_path: Path, adapter: Path, batch: dict) -> torch.Tensor:
    peft = pytest.importorskip("peft")
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=(batch["segment_ids"] != 0).long()).logits
    return sequence_logps(logits, batch["labels"])[0]


def test_the_reference_is_the_base_with_the_init_adapter(tmp_path):
    adapter = _init_adapter(tmp_path)
    recipe = PreferenceRecipe(_config(tmp_path, "init", init_adapter=str(adapter), max_steps=1), console=QUIET,
                              progress=False)  # fmt: skip
    recipe.setup()
    assert recipe.cfg.lora.r == 4 and recipe.cfg.lora.alpha == 8
    batch, rows = both_layouts(recipe)  # trained on one row per pair; peft reads one row per answer
    ours = recipe._reference(batch)
    torch.testing.assert_close(ours, _peft_logps(tmp_path, adapter, rows), atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the policy starts as the same adapter (trainable), so it equals the reference
        torch.testing.assert_close(recipe._logps(batch)[0], ours, atol=1e-5, rtol=1e-6)
        from nomoat.lora import disable_lora

        with disable_lora(recipe.model):
            base = recipe._logps(batch)[0]
    assert (base - ours).abs().max() > 1e-2  # the adapter matters: the reference is not the bare base


def test_dpo_from_an_init_adapter_trains_it_and_keeps_its_shape(tmp_path):
    adapter = _init_adapter(tmp_path)
    result = PreferenceRecipe(_config(tmp_path, "dpo-init", init_adapter=str(adapter), max_steps=4), console=QUIET,
                              progress=False).run()  # fmt: skip
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # step 1: policy == reference == base + init
    assert records[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    assert records[-1]["margin"] > 0
    saved = read_adapter_config(result.adapter_dir)
    assert (saved.r, saved.alpha, sorted(saved.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    from safetensors.torch import load_file

    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(
        result.adapter_dir / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    moved = max((before[k] - after[k]).abs().max().item() for k in before)
    assert 0 < moved < 1.0  # trained from the init adapter's values, not from a fresh one
