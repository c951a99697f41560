"""lm-evaluation-harness against nomoat: a local multiple-choice task (and a small generation task) run through
lm-eval's `local-completions` against a real `nomoat serve` process, through nomoat's own lm-eval model
(`nomoat.eval.lm_eval`, what `nomoat eval --lm-eval-task` runs), and through lm-eval's `hf` backend (transformers) on
the same tiny model: same accuracy, per-item loglikelihoods within 1e-4, same generations."""

from __future__ import annotations

import json
import random

import pytest

from processes import NomoatServer
from structured_utils import make_structured_model

lm_eval = pytest.importorskip("lm_eval")

N_MC = 24
N_GEN = 6


def _write_tasks(root) -> list:
    rng = random.Random(0)
    words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "apple", "bread"]
    mc = []
    for i in range(N_MC):
        choices = rng.sample(words, 4)
        mc.append({"question": f"Question {i}: which word fits {rng.choice(words)}?", "choices": choices,
                   "answer": rng.randrange(4)})  # fmt: skip
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    gen = [{"q": f"Say {rng.choice(words)} {i}:", "a": rng.choice(words)} for i in range(N_GEN)]
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (root / "nomoat_mc.yaml").write_text(f"""task: nomoat_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (root / "nomoat_gen.yaml").write_text(f"""task: nomoat_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return [root / "nomoat_mc.yaml", root / "nomoat_gen.yaml"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = make_structured_model(root / "tiny", seed=4)
    tasks = _write_tasks(root)
    srv = NomoatServer(["serve", str(model_dir), "--name", "tiny", "--dtype", "float32"], root / "server.log",
                       env={"NOMOAT_HOME": str(root / "home")})  # fmt: skip
    yield srv.url, model_dir, tasks
    srv.stop()


def _evaluate(model, model_args, tasks):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks[0].parent), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["nomoat_mc", "nomoat_gen"],
                                   task_manager=manager, log_samples=True)  # fmt: skip


def _per_item(results, task):
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"] for s in samples]


def test_local_completions_and_nomoat_model_equal_hf(setup, monkeypatch):
    url, model_dir, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    reference = _evaluate("hf", {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}, tasks)
    served = _evaluate("local-completions", {
        "base_url": f"{url}/v1/completions", "model": "tiny", "tokenizer": str(model_dir),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        "add_bos_token": True},  # the tokenizer's own special tokens, as the hf backend encodes by default
        tasks)  # fmt: skip

    import torch

    from nomoat.eval.lm_eval import run_tasks
    from nomoat.generate.engine import Engine
    from nomoat.models.checkpoint import load_model
    from nomoat.tokenizer import Tokenizer

    engine = Engine(load_model(model_dir, dtype=torch.float32, device="cpu"), Tokenizer.from_dir(model_dir))
    local = run_tasks(engine, tasks)
    ref_mc = _per_item(reference, "nomoat_mc")
    assert len(ref_mc) == N_MC
    for other in (served, local):
        assert other["results"]["nomoat_mc"]["acc,none"] == reference["results"]["nomoat_mc"]["acc,none"]
        for want, got in zip(ref_mc, _per_item(other, "nomoat_mc"), strict=True):
            assert len(want) == len(got) == 4
            for (w_ll, w_greedy), (g_ll, g_greedy) in zip(want, got):
                assert abs(w_ll - g_ll) < 1e-4, (want, got)
                assert w_greedy == g_greedy
        assert _per_item(other, "nomoat_gen") == _per_item(reference, "nomoat_gen")


def test_nomoat_eval_runs_lm_eval_task_files(setup, tmp_path, monkeypatch):
    """`nomoat eval MODEL --lm-eval-task FILE -a ADAPTER` scores the base and the adapter column with lm-eval."""
    from typer.testing import CliRunner

    from nomoat.cli import app
    from structured_utils import make_random_adapter

    _, model_dir, tasks = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    adapter = make_random_adapter(model_dir, tmp_path / "ad", seed=5)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--lm-eval-task", str(tasks[0]), "-a", str(adapter),
                                      "--dtype", "float32", "--json", str(out), "--limit", "8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())["lm_eval"]
    assert set(data) == {"base", "ad"}
    assert {col: 0 <= data[col]["nomoat_mc"]["acc,none"] <= 1 for col in data} == {"base": True, "ad": True}
    assert "nomoat_mc\tacc,none\t" in result.output
    bad = CliRunner().invoke(app, ["eval", str(model_dir), "--lm-eval-task", str(tmp_path / "missing.yaml")])
    assert bad.exit_code != 0 and "missing.yaml" in bad.output
