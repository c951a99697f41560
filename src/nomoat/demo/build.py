r"""Rebuild the embedded demo model end to end: data, tokenizer, pretraining, evaluation.

The shipped model is built in two seeded stages, with data only from `nomoat.demo.tasks` (no outside text):

    # stage 1, from scratch, core tasks (slow on a CPU: use a GPU)
    python -m nomoat.demo.build --out /tmp/demo-stage1 --steps 6500 --chats 200000 --device cuda
    # stage 2, continued from stage 1, adds the office-memo task
    python -m nomoat.demo.build --base /tmp/demo-stage1 --out src/nomoat/demo/model --steps 1200 --chats 40000 \
        --batch-size 32 --lr 1e-3 --device cpu

Each stage generates its data (`make_data`), trains a byte-level BPE tokenizer with digits split one by one
(`train_tokenizer`; stage 2 keeps stage 1's), trains every weight of a small Llama (`nomoat.train.pretrain`), and
scores held-out items of every task into `accuracy.json`. Every step is seeded, so a rebuild on the same device and
software gives the same model (GPU kernels may differ in the last bits between devices and library versions).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from nomoat.demo import tasks
from nomoat.util.files import read_json

SEED = 0
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}
VOCAB_SIZE = 2048


def make_data(folder: Path, n_chats: int, seed: int = SEED, mix: str = "core") -> tuple[Path, Path]:
    """Write `chat.jsonl` (single tasks and multi-task conversations) and `text.jsonl` (atlas paragraphs)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    chat, text = folder / "chat.jsonl", folder / "text.jsonl"
    items = tasks.generate_items(n_chats, seed=seed, mix=mix)
    with chat.open("w", encoding="utf-8") as f:
        for i, item in enumerate(items):
            record = {"messages": item.messages}
            if i % 4 == 3:  # a quarter are longer chats: several tasks in a row, then this one
                turns = tasks.multi_task_chat(rng, rng.randint(1, 3), mix)["messages"]
                head = [m for m in item.messages if m["role"] == "system"]
                record = {"messages": head + turns + [m for m in item.messages if m["role"] != "system"]}
            f.write(json.dumps(record) + "\n")
    with text.open("w", encoding="utf-8") as f:
        for _ in range(20):  # the paragraphs are few: repeat them so the text half is not negligible
            for paragraph in tasks.atlas_texts():
                f.write(json.dumps({"text": paragraph}) + "\n")
    return chat, text


def _corpus(chat: Path, text: Path) -> list[str]:
    out = []
    for line in chat.open(encoding="utf-8"):
        out += [m["content"] for m in json.loads(line)["messages"]]
    out += [json.loads(line)["text"] for line in text.open(encoding="utf-8")]
    return out


def train_tokenizer(corpus: list[str], folder: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer and write the tokenizer files of a Hugging Face model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # Digits one by one: with a learnt merge like "47" arithmetic would be a lookup table of opaque tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIALS}  # fmt: skip
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos, pad = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": pad}) + "\n")
    return folder


def model_config(tokenizer_dir: Path) -> dict[str, Any]:
    """The Hugging Face `config.json` of the demo model, with the tokenizer's vocabulary and special ids."""
    tok = read_json(tokenizer_dir / "tokenizer.json")
    vocab = len(tok["model"]["vocab"])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    return {**MODEL_CONFIG, "vocab_size": vocab, "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}  # fmt: skip


def build(out: Path, n_chats: int = 300_000, steps: int = 6000, batch_size: int = 128, lr: float = 2e-3,
          device: str = "auto", eval_items: int = 100, seed: int = SEED, work: Path | None = None,
          resume: bool = False, base: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Build the demo model into `out` and return its record (timings, accuracies).

    Args:
        out: The model folder to write.
        n_chats: Generated pretraining conversations.
        steps: Optimizer steps.
        batch_size: Conversations per step.
        lr: Peak learning rate.
        device: `auto`, `cpu` or `cuda`.
        eval_items: Held-out items per task for the final scores.
        seed: Seed of everything.
        work: Folder for the data, tokenizer and checkpoints (a temporary one by default).
        resume: Continue an interrupted run in `work` from its newest checkpoint.
        base: Continue training this model folder (its tokenizer is kept) instead of starting from scratch; the
            data is then drawn with seed `seed + 1`, so it is new data.
    """
    from nomoat.train.pretrain import PretrainConfig, PretrainRecipe

    t0 = time.perf_counter()
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="nomoat-demo-build-"))
    # Stage 1 (from scratch) learns the core tasks; stage 2 (--base) adds the office memos on new data.
    chat, text = make_data(work / "data", n_chats, seed + 1 if base else seed, "office" if base else "core")
    t_data = time.perf_counter()
    tok_dir = Path(base) if base else train_tokenizer(_corpus(chat, text), work / "tokenizer")
    t_tok = time.perf_counter()
    start = {"model": str(base)} if base else {"model_config": model_config(tok_dir), "tokenizer": str(tok_dir)}
    cfg = PretrainConfig(**start, data=[str(chat), str(text)],
                         output=str(out), run_dir=str(work / "run"), seq_len=256, batch_size=batch_size,
                         max_steps=steps, lr=lr, warmup_steps=min(200, steps // 10), weight_decay=0.1, seed=seed,
                         device=device, save_every=500, log_every=50, resume=resume)  # fmt: skip
    recipe = PretrainRecipe(cfg)
    recipe.run()
    t_train = time.perf_counter()
    from nomoat.demo.score import evaluate_model

    scores = evaluate_model(str(out), n_per_task=eval_items)
    record = {
        "base": str(base) if base else None, "seed": seed, "n_chats": n_chats, "steps": steps,
        "batch_size": batch_size, "lr": lr,
        "device": str(recipe.device), "final_loss": recipe.losses[-1] if recipe.losses else None,
        "seconds": {"data": round(t_data - t0, 1), "tokenizer": round(t_tok - t_data, 1),
                    "pretrain": round(t_train - t_tok, 1), "eval": round(time.perf_counter() - t_train, 1)},
        "accuracy": scores,
    }  # fmt: skip
    (Path(out) / "accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    """Command line of `python -m nomoat.demo.build`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / "model"), help="model folder to write")
    p.add_argument("--chats", type=int, default=300_000, help="generated pretraining conversations")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-items", type=int, default=100, help="held-out items per task for the scores")
    p.add_argument("--work", default=None, help="folder for data, tokenizer and checkpoints (kept)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build in --work")
    p.add_argument("--base", default=None, help="continue training this model folder instead of starting from scratch")
    a = p.parse_args(argv)
    record = build(Path(a.out), a.chats, a.steps, a.batch_size, a.lr, a.device, a.eval_items, work=a.work,
                   resume=a.resume, base=Path(a.base) if a.base else None)  # fmt: skip
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
