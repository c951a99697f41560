"""`nomoat serve --adapter-dtype`: the choice reaches the engine's adapter bank; a bad value stops before loading."""

from __future__ import annotations

import torch
import transformers
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.generate.engine import Engine
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

from hf_models import hf_config, save_word_tokenizer
from train_utils import random_adapter


def test_bad_adapter_dtype_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = CliRunner().invoke(app, ["serve", str(tmp_path), "--adapter-dtype", "float16"])
    assert result.exit_code != 0
    assert "--adapter-dtype must be auto, float32 or bfloat16" in result.output


def test_engine_bank_takes_the_adapter_dtype(tmp_path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config("llama3")).save_pretrained(tmp_path / "m")
    save_word_tokenizer(tmp_path / "m")
    folder = random_adapter(tmp_path / "m", tmp_path / "a", 1)
    for choice, want in (("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        engine = Engine(load_model(tmp_path / "m", "float32", "cpu"), Tokenizer.from_dir(tmp_path / "m"),
                        max_running=2, adapters={"a": folder}, adapter_dtype=choice)  # fmt: skip
        assert engine.bank.factor_dtype == want
