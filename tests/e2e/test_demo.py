"""The embedded demo model, its task generator, the pretraining recipe and `nomoat demo --quick`."""

from __future__ import annotations

import json

import pytest
import torch

import nomoat
from nomoat.demo import MODEL_DIR
from nomoat.demo import tasks as T
from nomoat.demo.build import CHAT_TEMPLATE, make_data, model_config, train_tokenizer
from nomoat.demo.score import evaluate_model

# Accuracies measured on 100 held-out items per task are in MODEL_DIR/accuracy.json; the test scores 40 items per
# task on CPU, so it allows a margin for the smaller sample and for CPU vs GPU (and fp32 vs bf16) rounding.
MARGIN = 0.15


def _recorded() -> dict:
    return json.loads((MODEL_DIR / "accuracy.json").read_text())


def test_shipped_model_files_and_size():
    files = {p.name for p in MODEL_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total < 25 * 2**20
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == CHAT_TEMPLATE


def test_shipped_model_matches_transformers():
    import transformers  # a development dependency: the reference must be there, never skipped
    model, tok = nomoat.load(str(MODEL_DIR), dtype="float32", device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of " + T.WORLD.countries[0].name + "?"}]  # fmt: skip
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(ids) == list(hf_ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    # Greedy generation answers the atlas question the model was trained on.
    out = hf.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    assert T.is_correct(tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True),
                        T.WORLD.countries[0].capital)  # fmt: skip


def test_shipped_model_scores_on_its_tasks():
    recorded = _recorded()["accuracy"]
    scores = evaluate_model(MODEL_DIR, n_per_task=40)
    low = {t: (scores[t], recorded[t]) for t in T.SCORED if scores[t] < recorded[t] - MARGIN}
    assert not low, f"tasks below the recorded accuracy minus {MARGIN}: {low}"
    assert scores["mean"] >= recorded["mean"] - 0.05


def test_generator_is_deterministic():
    a = T.generate_items(200, seed=7)
    b = T.generate_items(200, seed=7)
    assert [x.messages for x in a] == [x.messages for x in b]
    assert [x.messages for x in T.generate_items(200, seed=8)] != [x.messages for x in a]
    assert T.make_world() == T.make_world()
    assert [x.messages for x in T.handbook_items("eval")] == [x.messages for x in T.handbook_items("eval")]


def test_generator_items_are_well_formed():
    for item in T.generate_items(500, seed=3):
        assert item.messages[-1] == {"role": "assistant", "content": item.answer}
        assert item.prompt[-1]["role"] == "user"
        assert item.task in T.TASKS
    seen = {x.task for x in T.generate_items(2000, seed=3)}
    assert seen == set(T.TASKS)


def test_handbook_splits_share_facts_not_phrasings():
    train, held = T.handbook_items("train"), T.handbook_items("eval")
    assert {x.task for x in held} == {"handbook"}
    assert {x.answer for x in train if x.task == "handbook"} == {x.answer for x in held}
    assert not {x.prompt[-1]["content"] for x in train} & {x.prompt[-1]["content"] for x in held}
    # The facts never appear in the pretraining mix (the memo task uses random values).
    facts = {(o["city"], o["wifi"]) for o in T.WORLD.offices}
    for item in T.generate_items(3000, seed=0, tasks=("memo",)):
        text = item.prompt[-1]["content"]
        assert not any(city in text and wifi in text for city, wifi in facts)


def test_normalize():
    assert T.is_correct(" Tarsin. ", "tarsin")
    assert T.is_correct("apple,bread , chair", "apple, bread, chair")
    assert not T.is_correct("12", "13")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    chat, text = make_data(root / "data", 300, seed=1)
    tok_dir = train_tokenizer([json.loads(line)["text"] for line in text.open()] * 3 +
                              [m["content"] for line in chat.open() for m in json.loads(line)["messages"]],
                              root / "tok", vocab_size=400)  # fmt: skip
    cfg = {**model_config(tok_dir), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    return root, chat, text, tok_dir, cfg


def test_pretrain_loss_decreases_and_saves_a_loadable_model(tiny_setup):
    from nomoat.train.pretrain import pretrain

    root, chat, text, tok_dir, cfg = tiny_setup
    out = root / "model"
    res = pretrain(progress=False, model_config=cfg, tokenizer=str(tok_dir), data=[str(chat), str(text)],
                   output=str(out), max_steps=30, batch_size=16, lr=3e-3, warmup_steps=3, device="cpu",
                   save_dtype="float32")  # fmt: skip
    assert res.steps == 30
    first, last = sum(res.losses[:3]) / 3, sum(res.losses[-3:]) / 3
    assert last < first - 1.0, (first, last)
    model, tok = nomoat.load(str(out), device="cpu")
    assert model.config.num_layers == 2 and tok.chat_template == CHAT_TEMPLATE
    # Continued training from the folder (full-parameter) works too.
    res2 = pretrain(progress=False, model=str(out), data=[str(chat)], output=str(root / "model2"), max_steps=3,
                    batch_size=8, lr=1e-4, warmup_steps=1, device="cpu")  # fmt: skip
    assert res2.steps == 3 and (root / "model2" / "tokenizer.json").is_file()


def test_pretrain_resume_reproduces_the_uninterrupted_run(tiny_setup):
    from nomoat.train.pretrain import PretrainConfig, PretrainRecipe

    root, chat, text, tok_dir, cfg = tiny_setup
    common = dict(model_config=cfg, tokenizer=str(tok_dir), data=[str(chat), str(text)], batch_size=8, lr=3e-3,
                  warmup_steps=2, device="cpu", save_dtype="float32")  # fmt: skip
    full = PretrainRecipe(PretrainConfig(**common, output=str(root / "full"), max_steps=8), progress=False).run()
    part = PretrainRecipe(PretrainConfig(**common, output=str(root / "part"), max_steps=8), progress=False)
    part.setup()
    part.total_steps = 4  # stop half-way, as a killed run would after its checkpoint
    part.train()
    resumed = PretrainRecipe(PretrainConfig(**common, output=str(root / "part"), max_steps=8, resume=True),
                             progress=False)  # fmt: skip
    res = resumed.run()
    assert resumed.losses and len(resumed.losses) == 4
    torch.testing.assert_close(torch.tensor(part.losses + res.losses), torch.tensor(full.losses), rtol=1e-4,
                               atol=1e-4)  # fmt: skip


def test_demo_quick_end_to_end(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nomoat.cli import app
    from nomoat.lora.registry import Registry

    monkeypatch.setenv("NOMOAT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["demo", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["base_accuracy"] <= 0.2
    assert record["tuned_accuracy"] >= record["base_accuracy"] + 0.5
    assert "demo-handbook" in Registry(tmp_path / "home").names()
    assert "nomoat chat" in result.output and "curl" in result.output and "openai" in result.output
