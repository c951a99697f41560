"""What the server tests share: a tiny model with PEFT adapters (`world`), and a `nomoat serve` process (`Server`).

The tiny model's end-of-sequence token lies outside its vocabulary, so every generation runs to `max_tokens`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import peft
import pytest
import torch
import transformers

from nomoat.generate.engine import Engine
from nomoat.lora.registry import Registry
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer
from processes import free_port

from hf_models import hf_config, load_hf, save_word_tokenizer
from train_utils import WORD_TEMPLATE

KEY = "sk-test-0123456789"
PROMPT_IDS = [1, 5, 17, 99, 3, 250, 8, 41, 77, 12, 6, 300, 9, 14, 201, 33, 7, 18]
ADAPTERS = ["a", "b", "c", "d"]
ROOT = Path(__file__).resolve().parents[2]


# ---- fixtures: a tiny model, PEFT adapters, the server process -------------------------------------------------------


def _make_model(path: Path) -> Path:
    path.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = hf_config("llama3", max_position_embeddings=4096)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    save_word_tokenizer(path, chat_template=WORD_TEMPLATE)
    # An end-of-sequence token outside the model's 512 logits: generations always run to max_tokens.
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**tok_cfg, "eos_token": "<eos>"}))
    return path


def _make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random non-zero LoRA adapter made and saved by peft itself."""
    hf = load_hf(model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = _make_model(root / "tiny")
    folders = {name: _make_adapter(model_dir, root / name, seed) for seed, name in enumerate([*ADAPTERS, "e", "r"])}
    home = root / "home"
    Registry(home).import_adapter(folders["r"], name="reg")
    return {"root": root, "model": model_dir, "adapters": folders, "home": home}


class Server:
    """A `nomoat serve` process on a free loopback port."""

    def __init__(self, world: dict, *args: str, key: str | None = KEY) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = world["root"] / f"server-{self.port}.log"
        env = {**os.environ, "NOMOAT_HOME": str(world["home"]), "PYTHONUNBUFFERED": "1"}
        env.pop("NOMOAT_API_KEY", None)
        cmd = [sys.executable, "-m", "nomoat.cli", "serve", str(world["model"]), "--port", str(self.port), *args]
        if key:
            cmd += ["--api-key", key]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.time() + 90
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"server not ready:\n{self.log.read_text()}"
            time.sleep(0.2)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        """`name{labels}` -> value from /metrics."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def wait_metric(self, check, timeout: float = 5.0) -> dict[str, float]:
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if check(m):
                return m
            assert time.time() < deadline, f"metrics never satisfied the check: {m}"
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tiny_engine(world: dict, **kw: Any) -> Engine:
    """nomoat's engine on the tiny model, in this process."""
    kw = {"max_running": 2, "max_seq_len": 256, "prefix_cache_bytes": 0, **kw}
    return Engine(load_model(world["model"], dtype=torch.float32, device="cpu"), Tokenizer.from_dir(world["model"]),
                  **kw)  # fmt: skip


@contextmanager
def uvicorn_thread(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn (real sockets, keep-alive) in a thread of this process; yields its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
