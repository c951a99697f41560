"""A user's whole path as processes: `nomoat train`, `nomoat adapters import`, then the adapter by its registry name
in `nomoat generate` and in `nomoat serve` under the official openai client, each equal to transformers + peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nomoat.tokenizer import Tokenizer
from processes import NomoatServer

from train_utils import make_chat_model, write_chat_data

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "w3 w17 w42 w4"
NEW = 10


def _run(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "nomoat.cli", *args], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny chat model, an adapter trained on it by `nomoat train`, imported into a registry as `flow`."""
    root = tmp_path_factory.mktemp("train_serve")
    model = make_chat_model(root / "model")
    data = write_chat_data(root / "chat.jsonl", n=32, max_words=30)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "NOMOAT_HOME": str(root / "home")}
    _run(["train", str(model), "--data", str(data), "--output-dir", str(root / "runs"), "--name", "flow",
          "--seq-len", "128", "--batch-size", "2", "--lr", "1e-2", "--rank", "4", "--max-steps", "8",
          "--no-progress"], env)  # fmt: skip
    _run(["adapters", "import", str(root / "runs" / "flow" / "adapter"), "--name", "flow"], env)
    return root, model, env


def _peft_greedy(model: Path, adapter: Path | None) -> list[int]:
    import peft
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    net = peft.PeftModel.from_pretrained(hf, adapter).eval() if adapter else hf.eval()
    ids = torch.tensor([Tokenizer.from_dir(model).encode(PROMPT)])
    out = net.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=2)
    out = out[0, ids.shape[1] :].tolist()
    return out[: out.index(2)] if 2 in out else out


def test_trained_adapter_by_name_in_generate_equals_peft(trained):
    root, model, env = trained
    registered = root / "home" / "adapters" / "flow"
    assert (registered / "adapter_config.json").is_file()
    want, base = _peft_greedy(model, registered), _peft_greedy(model, None)
    assert want != base  # training changed the model's answer
    args = ["generate", str(model), "-p", PROMPT, "--max-tokens", str(NEW), "--temperature", "0", "--json"]
    got = json.loads(_run([*args, "--adapter", "flow"], env).strip().splitlines()[-1])["token_ids"]
    merged = json.loads(_run([*args, "--adapter", "flow", "--merge"], env).strip().splitlines()[-1])["token_ids"]
    assert got == want and merged == want


def test_trained_adapter_served_by_name_equals_peft(trained, tmp_path):
    from openai import OpenAI

    root, model, env = trained
    want = Tokenizer.from_dir(model).decode(_peft_greedy(model, root / "home" / "adapters" / "flow"))
    srv = NomoatServer(["serve", str(model), "--adapter", "flow"], tmp_path / "server.log", env=env)
    try:
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        assert {"flow"} <= {m.id for m in client.models.list().data}
        out = client.completions.create(model="flow", prompt=PROMPT, max_tokens=NEW, temperature=0)
        assert out.choices[0].text.strip() == want.strip()
    finally:
        srv.stop()
