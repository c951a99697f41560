"""The command line: `nomoat info`, `nomoat convert`, help text on every command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nomoat.cli import app

from hf_models import make_hf_model

runner = CliRunner()


def test_info_json(tmp_path):
    hf = make_hf_model("gemma2", tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["family"] == "gemma2"
    assert report["parameters"] == sum(p.numel() for p in hf.parameters())  # tied head counted once, like torch
    assert report["dtype"] == "F32"
    assert report["context_length"] == hf.config.max_position_embeddings
    assert report["vocab_size"] == hf.config.vocab_size
    assert report["chat_template"] is False and "tokenizer" in report["tokenizer_error"]


def test_info_text_with_chat_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    make_hf_model("qwen2", tmp_path)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "qwen2" in result.output and "chat template   yes" in result.output


def test_info_not_a_model(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a Hugging Face model folder" in result.output


def test_info_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "supports: gemma2, gemma3_text, llama" in result.output


def test_convert_needs_trust(tmp_path):
    make_hf_model("llama3", tmp_path)
    from nomoat.models.checkpoint import load_model

    torch.save(load_model(tmp_path, "float32", "cpu").state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    refused = runner.invoke(app, ["convert", str(tmp_path)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output
    assert not (tmp_path / "model.safetensors").exists()
    done = runner.invoke(app, ["convert", str(tmp_path), "--trust-pickle"])
    assert done.exit_code == 0, done.output
    assert runner.invoke(app, ["info", str(tmp_path), "--json"]).exit_code == 0


@pytest.mark.parametrize("command", [[], ["info"], ["convert"], ["version"]])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
