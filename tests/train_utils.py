"""A tiny trainable model folder with a word tokenizer, a chat template and a chat dataset, a LoRA model with a
random adapter and the run config of a recipe test, for training tests."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nomoat.config.lora import LoRAConfig
from nomoat.config.train import TrainConfig
from nomoat.lora import inject_lora
from nomoat.models.checkpoint import load_model

from hf_models import make_hf_model, save_word_tokenizer

# Every piece of the template is a whole word of the word tokenizer (w3 = user, w4 = assistant header), so the
# template renders to words the tokenizer knows and character offsets map cleanly onto tokens.
WORD_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}w5 {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}w3 {{ m['content'] }} "
    "{% else %}w4 {{ m['content'] }} </s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}w4 {% endif %}"
)


def make_chat_model(path: Path, family: str = "llama3", seed: int = 0) -> Path:
    """Save a tiny random `family` model with a word tokenizer and `WORD_TEMPLATE` into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    make_hf_model(family, path, seed=seed)
    save_word_tokenizer(path, chat_template=WORD_TEMPLATE)
    return path


def random_lora_model(path: Path, family: str = "llama3") -> torch.nn.Module:
    """A tiny random `family` model saved to `path`, loaded in fp32 with LoRA (r 4, alpha 8) whose B matrices are
    random (seed 0, scale 0.1), so that the adapter changes the outputs."""
    make_hf_model(family, path)
    m = load_model(path, "float32", "cpu")
    inject_lora(m, LoRAConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def recipe_config(tmp_path: Path, name: str, data_file: str, write_data: Callable[[Path], Any], **fields: Any
                  ) -> TrainConfig:  # fmt: skip
    """The `TrainConfig` of run `name` in tmp_path/runs with `fields`: training the chat model tmp_path/model on
    tmp_path/`data_file`, each made (`make_chat_model`, `write_data(path)`) where it does not exist yet."""
    model = tmp_path / "model"
    if not model.exists():
        make_chat_model(model)
    data = tmp_path / data_file
    if not data.exists():
        write_data(data)
    return TrainConfig(**{"model": str(model), "data": [str(data)], "output_dir": str(tmp_path / "runs"), "name": name,
                          **fields})  # fmt: skip


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(10, 500)}" for _ in range(n))


def write_chat_data(path: Path, n: int = 24, seed: int = 0, max_words: int = 20) -> Path:
    """Write `n` OpenAI-messages conversations of varied length (some with a system prompt, some two-turn)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": _words(rng, rng.randint(1, 4))})
        for _ in range(1 + (i % 2)):
            msgs.append({"role": "user", "content": _words(rng, rng.randint(1, max_words))})
            msgs.append({"role": "assistant", "content": _words(rng, rng.randint(1, max_words))})
        lines.append(json.dumps({"messages": msgs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def random_adapter(model_dir: Path, out: Path, seed: int, scale: float = 0.3, provenance: dict | None = None,
                   **cfg) -> Path:  # noqa: ANN003  # fmt: skip
    """A LoRA adapter over `model_dir` with random A and B (B != 0, so it changes the answers), saved in PEFT format.

    `cfg` are `LoRAConfig` fields (default r 4, alpha 8); `scale` is the factors' standard deviation."""
    import torch

    from nomoat.lora import LoRAConfig, inject_lora, lora_parameters, save_adapter
    from nomoat.models.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    config = LoRAConfig(**{"r": 4, "alpha": 8, **cfg})
    inject_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, out, config, base_model_name_or_path=str(model_dir), provenance=provenance)
    return out
