"""Ollama's local store: `ollama:NAME[:TAG]` resolves to the GGUF blob and template a test lays out itself."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import nomoat
from gguf_cases import build
from nomoat.export.gguf import export_gguf
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer
from nomoat.tokenizer.ollama import go_template_to_jinja
from nomoat.util.ollama import OllamaError, resolve

CHATML_GO = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
TURN_GO = "{{ if .System }}<<SYS>>{{ .System }}<</SYS>>\n{{ end }}[INST] {{ .Prompt }} [/INST]"


def _blob(store: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return f"sha256:{digest}"


def lay_out(store: Path, gguf_file: Path, name: str, tag: str = "latest", template: str | None = None,
            system: str | None = None, host: str = "registry.ollama.ai/library") -> None:  # fmt: skip
    """Write a store entry as `ollama pull` leaves it: a manifest naming sha256 blobs by media type."""
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": _blob(store, gguf_file.read_bytes())}]
    for kind, text in (("template", template), ("system", system), ("params", json.dumps({"stop": ["</s>"]}))):
        if text is not None:
            layers.append({"mediaType": f"application/vnd.ollama.image.{kind}", "digest": _blob(store, text.encode())})
    manifest = store / "manifests" / host / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ollama-src")
    model_dir, _ = build(root, "llama_tied")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return export_gguf(model_dir, [], root / "tiny.gguf", outtype="q8_0")


def test_resolves_and_loads_like_the_file(tmp_path: Path, gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    lay_out(tmp_path, gguf_file, "tiny", template=CHATML_GO, system="Be brief.")
    lay_out(tmp_path, gguf_file, "other", tag="q8", host="example.com/me")
    found = resolve("ollama:tiny")
    assert found.gguf.read_bytes() == gguf_file.read_bytes()
    assert (found.system, found.params) == ("Be brief.", {"stop": ["</s>"]})
    assert resolve("ollama:example.com/me/other:q8").gguf == found.gguf
    ids = torch.tensor([[5, 9, 40, 7]])
    model, tok = nomoat.load("ollama:tiny:latest", dtype="float32", device="cpu")
    direct = load_model(gguf_file, dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), direct(ids), rtol=0, atol=0)
    assert tok.encode("hello world") == Tokenizer.from_dir(gguf_file).encode("hello world")
    # The GGUF has no chat template of its own: the Ollama template, converted, is used.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n<|im_start|>assistant\n"
    )


def test_missing_model_lists_the_store(tmp_path: Path, gguf_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))
    lay_out(tmp_path, gguf_file, "tiny", tag="v1")
    with pytest.raises(OllamaError, match=r"'llama3.2:latest' is not in the local store.*tiny:v1") as e:
        load_model("ollama:llama3.2", device="cpu")
    assert "ollama pull" in e.value.hint


def test_go_templates_to_jinja() -> None:
    from nomoat.tokenizer.chat_template import compile_template

    tok_messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    chatml = compile_template(go_template_to_jinja(CHATML_GO)).render(messages=tok_messages)
    assert chatml == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    turn = compile_template(go_template_to_jinja(TURN_GO)).render(messages=tok_messages)
    assert turn == "<<SYS>>S<</SYS>>\n[INST] Q [/INST]"
    with pytest.raises(ValueError):
        go_template_to_jinja("{{ range $i, $m := .Messages }}{{ $m.Content }}{{ end }}")
