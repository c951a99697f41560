"""A DoRA adapter cannot be applied per request: the server refuses it when it loads, with the reason and the remedy."""

from __future__ import annotations

import pytest
import torch

import nomoat
from nomoat.config import LoRAConfig
from nomoat.lora import AdapterError
from nomoat.lora.bank import AdapterBank
from nomoat.lora.inject import inject_lora
from nomoat.lora.peft_format import save_adapter


def test_dora_adapter_is_refused_at_load_with_reason_and_remedy(tmp_path):
    model, _ = nomoat.load("demo", dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=2, alpha=4, use_dora=True))
    folder = save_adapter(model, tmp_path / "dora", LoRAConfig(r=2, alpha=4, use_dora=True), "demo")
    base, _ = nomoat.load("demo", dtype=torch.float32, device="cpu")
    with pytest.raises(AdapterError, match="DoRA adapter cannot be applied per request") as e:
        AdapterBank(base).add("dora", folder)
    assert "magnitude vector" in str(e.value)  # the reason
    assert e.value.hint and f"nomoat export BASE --adapter {folder} --out DIR" in e.value.hint  # the remedy
    assert "nomoat serve DIR" in e.value.hint
