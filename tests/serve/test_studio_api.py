"""The studio's API (`/v1/studio`): folder confinement, uploads, origin and key checks, jobs, preview, registry, docs.

The server runs in process (FastAPI's TestClient) over a stub engine: these routes never generate. Jobs are real
child processes (`python -m nomoat ...`, or a stand-in interpreter script where a test needs a job that waits).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from nomoat.config.lora import LoRAConfig
from nomoat.config.train import TrainConfig
from nomoat.data import load_dataset, summarize, tokenize_example
from nomoat.demo import MODEL_DIR
from nomoat.lora.registry import Registry
from nomoat.serve.app import ServeSettings, create_app
from nomoat.serve.studio import StudioSettings
from nomoat.tokenizer import Tokenizer

from train_utils import random_adapter

KEY = "sk-studio-test"
ORIGIN = {"Origin": "http://testserver", "Authorization": f"Bearer {KEY}"}
AUTH = {"Authorization": f"Bearer {KEY}"}
CHATS = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                       {"role": "assistant", "content": str(2 * a)}]} for a in range(1, 9)]  # fmt: skip


class StubEngine:
    """What the server needs of an engine when nothing is generated."""

    max_seq_len, max_running, max_queue, num_running, num_waiting = 256, 4, 8, 0, 0

    def __init__(self) -> None:
        self.tokenizer = Tokenizer.from_dir(MODEL_DIR)
        self.adapters: dict[str, str] = {}

    def submit(self, *args, **kwargs):
        raise AssertionError("the studio routes never generate")

    def add_adapter(self, name, folder):
        self.adapters[name] = str(folder)

    def remove_adapter(self, name):
        self.adapters.pop(name)

    def start(self):
        pass


@pytest.fixture
def world(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (data / "broken.jsonl").write_text(json.dumps(CHATS[0]) + "\n{not json\n")
    secret = tmp_path / "secret.jsonl"
    secret.write_text(json.dumps(CHATS[0]) + "\n")
    (data / "link.jsonl").symlink_to(secret)  # points outside the allowed folder
    studio = StudioSettings(home=tmp_path / "studio", data_dirs=[data], models={"demo": str(MODEL_DIR)},
                            max_upload_bytes=4096)  # fmt: skip
    settings = ServeSettings(model_name="demo", api_key=KEY, registry_home=str(tmp_path / "home"), studio=studio)
    app = create_app(StubEngine(), settings)
    with TestClient(app) as client:
        yield client, app, tmp_path
    app.state.studio.close()


def test_every_studio_route_needs_the_key(world):
    client, _, _ = world
    for method, path in [("get", "/v1/studio/info"), ("get", "/v1/studio/data"), ("get", "/v1/studio/jobs"),
                         ("get", "/v1/studio/adapters"), ("post", "/v1/studio/jobs/train"),
                         ("put", "/v1/studio/data/uploads/x.jsonl"), ("delete", "/v1/studio/adapters/x")]:  # fmt: skip
        r = client.request(method, path, headers={"Origin": "http://testserver"})
        assert r.status_code == 401, (method, path, r.status_code)
    assert client.get("/v1/studio/info", headers=AUTH).status_code == 200


def test_info_has_the_cli_defaults(world):
    client, _, _ = world
    info = client.get("/v1/studio/info", headers=AUTH).json()
    train = TrainConfig.__dataclass_fields__
    assert info["defaults"]["lr"] == train["lr"].default and info["defaults"]["seq_len"] == train["seq_len"].default
    assert info["defaults"]["batch_size"] == train["batch_size"].default
    lora = {f.name: f.default for f in dataclasses.fields(LoRAConfig)}
    assert (info["defaults"]["rank"], info["defaults"]["alpha"]) == (lora["r"], lora["alpha"])
    assert info["models"] == {"demo": str(MODEL_DIR)} and info["max_upload_bytes"] == 4096


ESCAPES = [("0", "../secret.jsonl"), ("0", "sub/../../secret.jsonl"), ("0", "/etc/passwd"), ("0", "link.jsonl"),
           ("uploads", "../data/sub/chat.jsonl"), ("7", "chat.jsonl"), ("..", "secret.jsonl")]


@pytest.mark.parametrize("root, path", ESCAPES)
def test_paths_outside_the_allowed_folders_are_refused(world, root, path):
    client, _, _ = world
    body = {"root": root, "path": path, "model": str(MODEL_DIR)}
    r = client.post("/v1/studio/data/preview", json=body, headers=ORIGIN)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "path_not_allowed"
    r = client.post("/v1/studio/jobs/train", json={**body, "name": "x"}, headers=ORIGIN)
    assert r.status_code == 403, r.text
    assert client.get("/v1/studio/jobs", headers=AUTH).json()["data"] == []


def test_listing_shows_allowed_files_only(world):
    client, _, _ = world
    files = client.get("/v1/studio/data", headers=AUTH).json()["data"]
    assert sorted((f["root"], f["path"]) for f in files) == [("0", "broken.jsonl"), ("0", "sub/chat.jsonl")]


def test_uploads_are_bounded_and_named_safely(world):
    client, _, tmp_path = world
    ok = json.dumps(CHATS[0]).encode() + b"\n"
    for bad in ["../x.jsonl", ".hidden.jsonl", "x.exe", "a b.jsonl"]:
        r = client.put(f"/v1/studio/data/uploads/{bad}", content=ok, headers=ORIGIN)
        assert r.status_code >= 400, (bad, r.status_code)  # (a `..` never even reaches the route)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "studio" in p.parts) == []
    r = client.put("/v1/studio/data/uploads/big.jsonl", content=ok * 200, headers=ORIGIN)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    r = client.put("/v1/studio/data/uploads/mine.jsonl", content=ok, headers=ORIGIN)
    assert r.status_code == 200, r.text
    assert (tmp_path / "studio" / "uploads" / "mine.jsonl").read_bytes() == ok
    assert not (tmp_path / "studio" / "uploads" / "big.jsonl").exists()
    files = client.get("/v1/studio/data", headers=AUTH).json()["data"]
    assert {"root": "uploads", "path": "mine.jsonl"}.items() <= next(f for f in files if f["root"] == "uploads").items()


def test_state_changes_from_another_origin_are_refused(world):
    client, _, _ = world
    evil = {**AUTH, "Origin": "http://evil.example"}
    ok = json.dumps(CHATS[0]).encode()
    assert client.put("/v1/studio/data/uploads/a.jsonl", content=ok, headers=evil).status_code == 403
    assert client.put("/v1/studio/data/uploads/a.jsonl", content=ok,
                      headers={**AUTH, "Origin": "http://testserver:81"}).status_code == 403  # fmt: skip
    assert client.put("/v1/studio/data/uploads/a.jsonl", content=ok,
                      headers={**AUTH, "Sec-Fetch-Site": "cross-site"}).status_code == 403  # fmt: skip
    assert client.delete("/v1/studio/adapters/a", headers=evil).status_code == 403
    assert client.post("/v1/studio/jobs/x/stop", headers=evil).status_code == 403
    assert client.get("/v1/studio/jobs", headers=evil).status_code == 200  # reading is not a state change
    assert client.put("/v1/studio/data/uploads/a.jsonl", content=ok, headers=AUTH).status_code == 200  # no Origin


def test_preview_matches_the_data_library(world):
    client, _, tmp_path = world
    body = {"root": "0", "path": "sub/chat.jsonl", "model": "demo", "seq_len": 64, "examples": 2}  # an offered name
    out = client.post("/v1/studio/data/preview", json=body, headers=ORIGIN).json()
    tok = Tokenizer.from_dir(MODEL_DIR)
    ds = load_dataset(tmp_path / "data" / "sub" / "chat.jsonl")
    seqs = [t for e in ds.examples for t in tokenize_example(e, tok, 64)]
    assert out["summary"]["trainable_tokens"] == summarize(ds, seqs, 64).trainable_tokens
    assert out["summary"]["examples"] == len(CHATS) and len(out["examples"]) == 2
    first = out["examples"][0]
    assert "".join(s["text"] for s in first["segments"]) == tok.decode(seqs[0].input_ids)
    assert "".join(s["text"] for s in first["segments"] if s["trained"]).startswith("2")
    assert first["trained_tokens"] == seqs[0].num_label_tokens
    bad = client.post("/v1/studio/data/preview", json={**body, "path": "broken.jsonl"}, headers=ORIGIN).json()
    assert "broken.jsonl:2" in bad["error"]


def _adapter(out: Path, seed: int) -> Path:
    return random_adapter(MODEL_DIR, out, seed, scale=0.01, r=2, alpha=4,
                          provenance={"metrics": {"final_loss": 0.5, "steps": 3}, "training": {"method": "sft"}})


def test_registry_table_load_and_delete(world):
    client, app, tmp_path = world
    Registry(tmp_path / "home").import_adapter(_adapter(tmp_path / "ad", 0), name="ad")
    rows = client.get("/v1/studio/adapters", headers=AUTH).json()["data"]
    table = [(r["name"], r["method"], r["metrics"]["final_loss"], r["loaded"]) for r in rows]
    assert table == [("ad", "sft", 0.5, False)]
    assert client.get("/v1/studio/adapters/ad", headers=AUTH).json()["provenance"]["metrics"]["steps"] == 3
    assert client.get("/v1/studio/adapters/nope", headers=AUTH).status_code == 404
    assert client.post("/v1/studio/adapters/ad/load", headers=ORIGIN).json() == {"id": "ad", "loaded": True}
    assert "ad" in app.state.manager.loaded
    assert "ad" in [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert client.delete("/v1/studio/adapters/ad", headers=ORIGIN).json()["deleted"] is True
    assert "ad" not in app.state.manager.loaded and "ad" not in Registry(tmp_path / "home")
    assert client.delete("/v1/studio/adapters/ad", headers=ORIGIN).status_code == 404


def test_docs_work_offline(world):
    client, _, _ = world
    page = client.get("/docs").text
    assert "/vendor/swagger-ui-bundle.js" in page and "/vendor/swagger-ui.css" in page
    assert "http" not in page.replace("http-equiv", "")  # nothing loads from another host
    assert client.get("/vendor/swagger-ui-bundle.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/v1/studio/jobs/train"]


def _wait(client, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/studio/jobs/{job_id}", headers=AUTH).json()
        if job["status"] not in ("queued", "running", "stopping"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end: {job}")


def test_jobs_run_in_order_in_child_processes(world, tmp_path):
    client, app, _ = world
    queue = app.state.studio
    # A stand-in interpreter: waits until it gets SIGINT, then exits 130 like `nomoat train` after its checkpoint.
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\nimport signal, sys, time\n"
                      "print('args', sys.argv[1:], flush=True)\n"
                      "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
                      "time.sleep(0.3) if 'quick' in sys.argv else time.sleep(120)\n")  # fmt: skip
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    queue.python = str(script)
    from nomoat.serve.studio.jobs import Job

    slow = queue.submit(Job(id="slow", kind="merge", title="slow", argv=["wait"]))
    quick = queue.submit(Job(id="quick", kind="merge", title="quick", argv=["quick"]))
    deadline = time.monotonic() + 30
    while client.get("/v1/studio/jobs/slow", headers=AUTH).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.get("/v1/studio/jobs/quick", headers=AUTH).json()["status"] == "queued"  # one at a time
    time.sleep(0.5)  # the stand-in installs its SIGINT handler
    assert client.post("/v1/studio/jobs/slow/stop", headers=ORIGIN).json()["status"] == "stopping"
    assert _wait(client, "slow")["status"] == "stopped"
    assert _wait(client, "quick")["status"] == "done"
    assert "args ['-m', 'nomoat', 'quick']" in client.get("/v1/studio/jobs/quick/log", headers=AUTH).text
    assert slow.returncode == 130 and quick.returncode == 0
    queue.python = sys.executable
    failing = queue.submit(Job(id="bad", kind="train", title="bad", argv=["train", str(tmp_path / "nope")]))
    job = _wait(client, failing.id)
    assert job["status"] == "failed" and job["error"].startswith("error:"), job
    # Records survive a restart; a job that was running then is marked stopped.
    assert json.loads((tmp_path / "studio" / "jobs" / "bad.json").read_text())["status"] == "failed"
    assert os.path.exists(queue.log_path(failing))


def test_a_training_job_stops_resumes_and_lands_in_the_registry(world):
    client, _, tmp_path = world
    body = {"root": "0", "path": "sub/chat.jsonl", "model": "demo", "name": "sum", "max_steps": 24, "seq_len": 64,
            "batch_size": 2, "lr": 1e-3}  # fmt: skip
    job = client.post("/v1/studio/jobs/train", json=body, headers=ORIGIN).json()
    assert job["argv"][:2] == ["train", str(MODEL_DIR)] and job["status"] in ("queued", "running")
    assert client.post("/v1/studio/jobs/train", json=body, headers=ORIGIN).status_code == 409  # name being trained
    metrics = Path(job["run_dir"]) / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and client.get(f"/v1/studio/jobs/{job['id']}", headers=AUTH).json()[
            "status"] == "running", client.get(f"/v1/studio/jobs/{job['id']}/log", headers=AUTH).text  # fmt: skip
        time.sleep(0.1)
    client.post(f"/v1/studio/jobs/{job['id']}/stop", headers=ORIGIN)
    stopped = _wait(client, job["id"], timeout=300)
    assert stopped["status"] == "stopped", stopped
    steps_then = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 2 <= steps_then[-1] < 24 and "sum" not in Registry(tmp_path / "home")
    resumed = client.post(f"/v1/studio/jobs/{job['id']}/resume", headers=ORIGIN).json()
    assert resumed["argv"][-1] == "--resume"
    done = _wait(client, job["id"], timeout=300)
    assert done["status"] == "done" and done["output"] == "sum", done
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 25))  # the resumed run continued where the checkpoint was, to the end
    assert "sum" in Registry(tmp_path / "home")
    row = client.get("/v1/studio/adapters", headers=AUTH).json()["data"][0]
    assert row["name"] == "sum" and row["metrics"]["steps"] == 24 and row["data"] == ["chat.jsonl"]
