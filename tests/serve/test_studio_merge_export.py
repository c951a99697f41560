"""The studio's merge and export jobs run to the end: a merge lands in the registry with the weights `nomoat merge`
writes, and the exported HF folder and GGUF file load back and give the logits of the base with the adapter merged
(peft's `merge_and_unload` on transformers' model, in the checkpoint's dtype: the reference).

The server runs in process (FastAPI's TestClient) over a stub engine; the jobs are real `python -m nomoat` children.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from nomoat.demo import MODEL_DIR
from nomoat.lora.registry import Registry
from nomoat.models.checkpoint import load_model
from nomoat.serve.app import ServeSettings, create_app
from nomoat.serve.studio import StudioSettings
from nomoat.tokenizer import Tokenizer

from train_utils import random_adapter

KEY = "sk-studio-jobs"
ORIGIN = {"Origin": "http://testserver", "Authorization": f"Bearer {KEY}"}
AUTH = {"Authorization": f"Bearer {KEY}"}
IDS = [[1, 17, 42, 99, 7, 3, 250, 11]]


class StubEngine:
    """What the server needs of an engine when nothing is generated."""

    max_seq_len, max_running, max_queue, num_running, num_waiting = 256, 4, 8, 0, 0

    def __init__(self) -> None:
        self.tokenizer = Tokenizer.from_dir(MODEL_DIR)

    def submit(self, *args, **kwargs):
        raise AssertionError("the studio routes never generate")

    def start(self):
        pass


def _adapter(out: Path, seed: int) -> Path:
    return random_adapter(MODEL_DIR, out, seed, scale=0.05, r=2, alpha=4,
                          provenance={"metrics": {"final_loss": 0.5, "steps": 3}, "training": {"method": "sft"}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio-jobs")
    registry = Registry(tmp / "home")
    for name, seed in (("a", 1), ("b", 2)):
        registry.import_adapter(_adapter(tmp / f"src-{name}", seed), name=name)
    studio = StudioSettings(home=tmp / "studio", data_dirs=[], models={"demo": str(MODEL_DIR)})
    settings = ServeSettings(model_name="demo", api_key=KEY, registry_home=str(tmp / "home"), studio=studio)
    app = create_app(StubEngine(), settings)
    with TestClient(app) as client:
        yield client, tmp
    app.state.studio.close()


def _run_job(client, path: str, body: dict) -> dict:
    job = client.post(path, json=body, headers=ORIGIN)
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = client.get(f"/v1/studio/jobs/{job_id}", headers=AUTH).json()
        if job["status"] not in ("queued", "running", "stopping"):
            break
        time.sleep(0.3)
    log = client.get(f"/v1/studio/jobs/{job_id}/log", headers=AUTH).text
    assert job["status"] == "done", (job, log[-3000:])
    return job


def _reference_logits(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the base, and of the base with the adapter merged by peft (fp32, then rounded to the checkpoint's
    dtype as an export in that dtype is), on transformers' model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    saved = transformers.AutoConfig.from_pretrained(MODEL_DIR).torch_dtype or torch.float32
    with torch.no_grad():
        plain = base(torch.tensor(IDS)).logits  # (1, T, V)
        merged = peft.PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
        return plain, merged.to(saved).float()(torch.tensor(IDS)).logits  # (1, T, V)


def _nomoat_logits(path: Path) -> torch.Tensor:
    model = load_model(path, dtype=torch.float32, device="cpu").eval()
    with torch.no_grad():
        return model(torch.tensor(IDS))  # (1, T, V)


def test_merge_job_lands_in_the_registry_with_nomoat_merges_weights(world):
    client, tmp = world
    body = {"adapters": ["a", "b"], "weights": [1.0, 0.5], "method": "linear", "name": "ab"}
    job = _run_job(client, "/v1/studio/adapters/merge", body)
    assert job["output"] == "ab"
    rows = {r["name"]: r for r in client.get("/v1/studio/adapters", headers=AUTH).json()["data"]}
    assert set(rows) == {"a", "b", "ab"} and rows["ab"]["method"] == "merge: linear"
    ref = tmp / "ref-merge"
    env = {**os.environ, "NOMOAT_HOME": str(tmp / "home")}
    out = subprocess.run([sys.executable, "-m", "nomoat", "merge", "a", "b", "--weights", "1,0.5", "--method", "linear",
                          "--out", str(ref)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = load_file(Registry(tmp / "home").path("ab") / "adapter_model.safetensors")
    want = load_file(ref / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    a = load_file(Registry(tmp / "home").path("a") / "adapter_model.safetensors")
    assert any(not torch.equal(got[k], a[k]) for k in a if k in got and got[k].shape == a[k].shape)


def test_export_jobs_write_files_that_load_back(world):
    client, tmp = world
    plain, want = _reference_logits(Registry(tmp / "home").path("a"))
    assert (plain - want).abs().max() > 0.05  # the adapter changes the logits well beyond the tolerances below
    hf = Path(_run_job(client, "/v1/studio/adapters/a/export", {"format": "hf", "model": str(MODEL_DIR)})["output"])
    assert (hf / "config.json").is_file() and any(hf.glob("*.safetensors"))
    transformers = pytest.importorskip("transformers")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.tensor(IDS)).logits, want, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(_nomoat_logits(hf), want, rtol=1e-3, atol=1e-3)
    gguf = Path(_run_job(client, "/v1/studio/adapters/a/export", {"format": "gguf", "model": str(MODEL_DIR)})["output"])
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF"
    got = _nomoat_logits(gguf)  # f16 weights from bf16 ones: close to the reference, not equal
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
