"""`nomoat synth` against a real `nomoat serve` of the embedded demo model, over a loopback socket.

The pairs written through the server equal those of the same model as a local teacher (one engine, the same seeds),
each pair's answers are among the samples the official openai client gets with those seeds, and the exact-match
scores are recomputed here.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nomoat.cli import app
from nomoat.demo.tasks import generate_items
from nomoat.synth.output import provenance_path
from nomoat.synth.teacher import ask_seed
from nomoat.util.files import sha256_file
from processes import NomoatServer

KEY = "synth-test-key"
runner = CliRunner()
SETTINGS = ["--mode", "pairs", "--reward", "exact_match", "--samples", "4", "--max-tokens", "8", "--seed", "1",
            "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`nomoat serve demo` (the embedded model by its name) on a free loopback port, with an API key."""
    root = tmp_path_factory.mktemp("synth_serve")
    # `demo` by name, as everywhere; the first start may compile the kernels
    home = {"NOMOAT_HOME": str(root / "home")}
    srv = NomoatServer(["serve", "demo", "--api-key", KEY], root / "server.log", env=home, timeout=300)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth_prompts") / "sub.jsonl"
    items = generate_items(8, seed=77, tasks=("sub",), system_prompts=False)
    path.write_text("".join(json.dumps({"messages": it.prompt, "answer": it.answer}) + "\n" for it in items))
    return path


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_through_the_server_equal_the_local_teacher(server, prompts, tmp_path):
    remote, local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    args = ["synth", "--teacher-url", server, "--api-key-env", "SYNTH_TEST_KEY", "--prompts", str(prompts), "--out",
            str(remote), "--concurrency", "3", *SETTINGS]  # fmt: skip
    result = runner.invoke(app, args, env={"SYNTH_TEST_KEY": KEY})
    assert result.exit_code == 0, result.output
    records = _records(remote)
    assert records, result.output
    for r in records:  # exact match, recomputed: the chosen answer is right, the rejected one wrong
        assert r["chosen"].strip() == r["answer"] and r["rejected"].strip() != r["answer"]
        assert (r["score_chosen"], r["score_rejected"]) == (1.0, 0.0)
    prov = json.loads(provenance_path(remote).read_text())
    assert prov["teacher"] == {"kind": "remote", "url": server, "model": "demo"}
    assert prov["inputs"]["sha256"] == sha256_file(prompts) and prov["settings"]["seed"] == 1
    assert KEY not in provenance_path(remote).read_text()

    result = runner.invoke(app, ["synth", "demo", "--prompts", str(prompts), "--out", str(local), *SETTINGS])
    assert result.exit_code == 0, result.output
    assert _records(local) == records  # one engine, the same seeds: the same samples and the same pairs


def test_pairs_are_among_the_samples_of_the_openai_client(server, prompts, tmp_path):
    from openai import OpenAI

    out = tmp_path / "pairs.jsonl"
    args = ["synth", "--teacher-url", server, "--prompts", str(prompts), "--out", str(out), *SETTINGS]
    assert runner.invoke(app, args, env={"OPENAI_API_KEY": KEY}).exit_code == 0
    client = OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    record = _records(out)[0]
    assert isinstance(record["prompt"], str)  # one user turn: the plain-string form
    messages = [{"role": "user", "content": record["prompt"]}]
    samples = [client.chat.completions.create(model="demo", messages=messages, temperature=1.0, max_tokens=8,
                                              seed=ask_seed(1, record["id"], j)).choices[0].message.content
               for j in range(4)]  # fmt: skip
    assert record["chosen"] in samples and record["rejected"] in samples


def test_instructions_through_the_server(server, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    tasks = [it.prompt[-1]["content"] for it in generate_items(6, seed=3, system_prompts=False)]
    seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in tasks))
    out = tmp_path / "inst.jsonl"
    args = ["synth", "--teacher-url", server, "--mode", "instructions", "--seeds", str(seeds), "--out", str(out),
            "--num", "3", "--max-tokens", "16", "--min-words", "2", "--no-progress"]  # fmt: skip
    result = runner.invoke(app, args, env={"OPENAI_API_KEY": KEY})
    assert result.exit_code in (0, 1), result.output
    records = _records(out) if out.exists() else []
    prov = json.loads(provenance_path(out).read_text())
    assert prov["records"] == len(records) and prov["status"] == ("complete" if result.exit_code == 0 else "incomplete")
    assert len(records) == 3 or "incomplete" in result.output
    for r in records:
        assert r["instruction"] not in tasks and len(r["instruction"].split()) >= 2 and r["output"].strip()
