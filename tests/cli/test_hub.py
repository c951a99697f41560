"""Models by name: `nomoat pull` from a local fake Hub, resolution from the Hugging Face cache offline, `models`, `rm`.

The fake Hub (tests/fake_hub.py) is an HTTP server answering what huggingface_hub requests, reached through
HF_ENDPOINT; it serves the embedded model. Loading by id is compared with loading the folder itself.
"""

from __future__ import annotations

import errno
import hashlib
import json

import huggingface_hub.constants
import pytest
import torch
from typer.testing import CliRunner

import nomoat
from fake_hub import FakeHub
from nomoat.cli import app
from nomoat.util import hub as hub_mod
from nomoat.util.hub import HubError, HubId, demo_dir, parse_hub_id

runner = CliRunner()
REPO = "nomoat-test/tiny-chat"


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache and registry of this test's own."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def fake_hub(hf_env, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")  # fmt: skip
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.add_folder(REPO, demo_dir(), extra={"pytorch_model.bin": b"not to be fetched", "notes.pkl": b"x"})
        yield hub


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4]]))[0]


def test_parse_hub_id(tmp_path, monkeypatch):
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == HubId("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("ollama:llama3") is None and parse_hub_id("/abs/path") is None
    assert parse_hub_id("a/b/c") is None and parse_hub_id("model.gguf") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_hub_id("org/name") is None  # an existing folder is a path, not an id


def test_pull_then_load_by_id_offline(fake_hub, hf_env):
    result = runner.invoke(app, ["pull", REPO])
    assert result.exit_code == 0, result.output
    fetched = {p for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert not any(p.endswith((".bin", ".pkl")) for p in fetched), fetched  # pickles are never downloaded
    assert any(p.endswith("tokenizer.json") for p in fetched)
    fake_hub.__exit__()  # the Hub is gone: what follows must come from the cache
    model, tok = nomoat.load(REPO)
    want, want_tok = nomoat.load(str(demo_dir()))
    torch.testing.assert_close(logits(model), logits(want), rtol=0, atol=0)
    assert tok.encode("hello world") == want_tok.encode("hello world")
    snapshot = hub_mod.local_path(REPO)
    assert snapshot.parent.parent == hf_env / "models--nomoat-test--tiny-chat"
    assert not list(snapshot.glob("*.bin"))
    # every command takes the id: `nomoat info` here
    info = runner.invoke(app, ["info", REPO, "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["family"] == "llama"


def test_demo_is_a_name_everywhere(hf_env):
    model, _ = nomoat.load("demo")
    assert model.config.family == "llama"
    result = runner.invoke(app, ["info", "demo"])
    assert result.exit_code == 0, result.output
    assert "llama" in result.output


def test_not_cached_names_the_pull_command(hf_env):
    with pytest.raises(HubError, match="not in the Hugging Face cache") as e:
        nomoat.load("someone/not-pulled@v2")
    assert "nomoat pull someone/not-pulled@v2" in e.value.hint
    result = runner.invoke(app, ["info", "someone/not-pulled"])
    assert result.exit_code != 0 and "nomoat pull someone/not-pulled" in result.output


def test_pull_revision_and_unknown_revision(fake_hub, hf_env):
    repo = fake_hub.repos[REPO]
    result = runner.invoke(app, ["pull", f"{REPO}@{repo.commit}"])
    assert result.exit_code == 0, result.output
    assert hub_mod.local_path(f"{REPO}@{repo.commit}").name == repo.commit
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        hub_mod.local_path(REPO)  # `main` was never pulled: its ref is unknown offline
    result = runner.invoke(app, ["pull", REPO, "--revision", "nope"])
    assert result.exit_code != 0 and "has no revision 'nope'" in result.output


def test_pull_errors_gated_404_offline_disk_full(fake_hub, hf_env, monkeypatch):
    fake_hub.add_folder("corp/gated", demo_dir(), gated=True)
    result = runner.invoke(app, ["pull", "corp/gated"])
    assert result.exit_code != 0
    assert "gated model" in result.output and "hf auth login" in result.output and "HF_TOKEN" in result.output
    result = runner.invoke(app, ["pull", "corp/missing"])
    assert result.exit_code != 0 and "not found on the Hub (404)" in result.output
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["pull", REPO])
    assert result.exit_code != 0 and "downloading is off" in result.output and "HF_HUB_OFFLINE" in result.output
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    result = runner.invoke(app, ["pull", REPO])
    assert result.exit_code != 0 and "no space left" in result.output and "resumes" in result.output


def test_pull_resumes_a_dropped_download(fake_hub, hf_env, monkeypatch):
    chunk = 2**20  # huggingface_hub writes whole chunks: a dropped download resumes after the last one
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    data = (demo_dir() / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    fake_hub.cut_once.add(sha)
    result = runner.invoke(app, ["pull", REPO])
    assert result.exit_code == 0, result.output
    blob = hf_env / "models--nomoat-test--tiny-chat" / "blobs" / sha
    assert blob.read_bytes() == data
    assert fake_hub.ranges == [f"bytes={len(data) // 2 // chunk * chunk}-"]  # the rest only, not the whole again


def test_pull_again_fetches_only_what_is_missing(fake_hub, hf_env):
    result = runner.invoke(app, ["pull", REPO, "--include", "*.json"])
    assert result.exit_code == 0, result.output
    before = len(fake_hub.requests)
    assert runner.invoke(app, ["pull", REPO]).exit_code == 0
    fetched = [p for m, p in fake_hub.requests[before:] if m == "GET" and ("/resolve/" in p or "/cdn/" in p)]
    assert len(fetched) == 1 and fetched[0].startswith("/cdn/"), fetched  # model.safetensors, nothing else again


def test_models_lists_and_rm_removes(fake_hub, hf_env):
    assert runner.invoke(app, ["pull", REPO]).exit_code == 0
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) >= {"demo", REPO}
    row = rows[REPO]
    assert (row["family"], row["dtype"], row["where"]) == ("llama", "BF16", "hub cache")
    assert row["parameters"] == rows["demo"]["parameters"] > 0 and row["size_bytes"] > 0
    assert row["path"] == str(hub_mod.local_path(REPO))
    table = runner.invoke(app, ["models"])
    assert REPO in table.output and "demo" in table.output
    no = runner.invoke(app, ["rm", REPO], input="n\n")
    assert no.exit_code != 0 and "nothing removed" in no.output
    assert hub_mod.local_path(REPO).is_dir()
    yes = runner.invoke(app, ["rm", REPO], input="y\n")
    assert yes.exit_code == 0, yes.output
    with pytest.raises(HubError):
        hub_mod.local_path(REPO)
    again = runner.invoke(app, ["rm", REPO, "--yes"])
    assert again.exit_code != 0 and "not in the Hugging Face cache" in again.output


def test_gguf_repository_needs_file_and_loads_by_id(fake_hub, hf_env, tmp_path):
    from nomoat.export.gguf import export_gguf

    gguf_file = export_gguf(demo_dir(), [], tmp_path / "src" / "tiny-f32.gguf", outtype="f32")
    (tmp_path / "src" / "tiny-f16.gguf").write_bytes(b"GGUF other quantization")
    fake_hub.add_folder("nomoat-test/tiny-GGUF", tmp_path / "src")
    result = runner.invoke(app, ["pull", "nomoat-test/tiny-GGUF"])
    assert result.exit_code != 0 and "--file" in result.output and "tiny-f16.gguf" in result.output
    result = runner.invoke(app, ["pull", "nomoat-test/tiny-GGUF", "--file", "tiny-f32.gguf"])
    assert result.exit_code == 0, result.output
    assert not any(p.endswith("tiny-f16.gguf") for m, p in fake_hub.requests if m == "GET")
    model, _ = nomoat.load("nomoat-test/tiny-GGUF")
    want, _ = nomoat.load(str(gguf_file))
    torch.testing.assert_close(logits(model), logits(want), rtol=0, atol=0)


def test_pickle_only_repository_is_refused(fake_hub, hf_env, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text("{}")
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"pickle")
    fake_hub.add_folder("old/pickled", tmp_path / "p")
    result = runner.invoke(app, ["pull", "old/pickled"])
    assert result.exit_code != 0 and "only pickle files (pytorch_model.bin)" in result.output
    assert not any(p.endswith(".bin") for _, p in fake_hub.requests)


def make_adapter(tmp_path):
    """A LoRA adapter on the embedded model with a provenance record like a training run's."""
    from nomoat.config import LoRAConfig
    from nomoat.lora.inject import inject_lora
    from nomoat.lora.peft_format import save_adapter

    model, _ = nomoat.load("demo", dtype=torch.float32, device="cpu")
    cfg = LoRAConfig(r=4, alpha=8)
    inject_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prov = {"base_model": {"path": str(demo_dir()), "sha256": "ab" * 32, "family": "llama"},
            "data": [{"path": "/data/handbook.jsonl", "sha256": "cd" * 32, "records": 96}], "data_format": "messages",
            "training": {"lr": 0.003, "max_steps": 120}, "metrics": {"steps": 120, "final_loss": 0.0421}}  # fmt: skip
    return save_adapter(model, tmp_path / "handbook", cfg, "demo", provenance=prov), model


def test_push_adapter_with_card_then_pull_into_registry(fake_hub, hf_env, tmp_path):
    from nomoat.lora.registry import Registry

    folder, model = make_adapter(tmp_path)
    result = runner.invoke(app, ["push", str(folder), "me/handbook-lora"])
    assert result.exit_code == 0, result.output
    files = fake_hub.repos["me/handbook-lora"].files
    assert {"adapter_config.json", "adapter_model.safetensors", "nomoat.json", "README.md"} <= set(files)
    assert files["adapter_model.safetensors"] == (folder / "adapter_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    for fact in ("library_name: peft", "ab" * 32, "cd" * 32, "handbook.jsonl", "| 96 |", "final_loss", "0.0421",
                 "rank 4, alpha 8", "LoRA", '"lr": 0.003', "nomoat pull me/handbook-lora"):
        assert fact in card, fact
    result = runner.invoke(app, ["pull", "me/handbook-lora"])
    assert result.exit_code == 0, result.output
    registry = Registry()
    assert "handbook-lora" in registry.names()
    pulled = registry.path("handbook-lora")
    assert (pulled / "adapter_model.safetensors").read_bytes() == (folder / "adapter_model.safetensors").read_bytes()
    assert "nomoat chat demo --adapter handbook-lora" in result.output
    again = runner.invoke(app, ["pull", "me/handbook-lora"])
    assert again.exit_code != 0 and "already in the registry" in again.output
    assert runner.invoke(app, ["pull", "me/handbook-lora", "--force"]).exit_code == 0


def test_push_needs_write_access(fake_hub, hf_env, tmp_path, monkeypatch):
    folder, _ = make_adapter(tmp_path)
    fake_hub.add_folder("corp/locked", demo_dir(), gated=True)
    result = runner.invoke(app, ["push", str(folder), "corp/locked"])
    assert result.exit_code != 0 and "hf auth login" in result.output
