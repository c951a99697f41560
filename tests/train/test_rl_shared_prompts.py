"""The completions of one prompt in one packed row with the prompt once (`share_prefixes`): log-probabilities and
LoRA gradients equal those of one row per completion (the prompt repeated), and the recipe's pass equals plain
torch's log-softmax of full logits."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from nomoat.cli.train import engine_sampler
from nomoat.config.train import TrainConfig
from nomoat.data import IGNORE_INDEX, Row, collate
from nomoat.lora import lora_state_dict
from nomoat.models.segments import share_prefixes
from nomoat.train.logps import label_logps
from nomoat.train.rl import RLRecipe, grpo_loss, token_logps

from train_utils import make_chat_model, random_lora_model


def test_share_prefixes_lays_each_prefix_out_once():
    rows = [([1, 2, 3, 4, 5], 3), ([1, 2, 3, 6], 3), ([1, 2, 3], 3), ([7, 8], 0), ([1, 2, 9], 2), ([1, 2, 8], 2)]
    batch = collate([Row(ids, [0] * len(ids), list(range(len(ids))), [1] * len(ids)) for ids, _ in rows])
    out = share_prefixes(batch["input_ids"], batch["position_ids"], [len(r) for r, _ in rows], [p for _, p in rows])
    assert out.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 9, 8]]
    assert out.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 0, 1, 2, 2]]
    assert out.segment_ids.tolist() == [[1, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 7]]
    assert out.prefix_ids.tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 5, 5]]
    for n, (ids, _) in enumerate(rows):  # every token of every row is found where it was laid out
        assert out.input_ids[0, out.index[n, : len(ids)]].tolist() == ids


def _rows(seed: int) -> list[Row]:
    """Two prompts (5 and 3 tokens) with 3 completions each of 1-7 tokens, and a row of its own prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt_len, lengths in ((5, (7, 1, 4)), (3, (2, 6, 6)), (4, (3,))):
        prompt = torch.randint(5, 500, (prompt_len,), generator=g).tolist()
        for n in lengths:
            ids = prompt + torch.randint(5, 500, (n,), generator=g).tolist()
            rows.append(Row(ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:], list(range(len(ids))),
                            [1] * len(ids)))  # fmt: skip
    return rows


def _grads(model, value):
    return torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("family", ["llama3", "gemma2"])  # gemma2: soft-capped scores, the per-example fallback
def test_shared_prompts_give_the_logps_and_gradients_of_one_row_each(tmp_path, family):
    model = random_lora_model(tmp_path / family, family)
    batch = collate(_rows(1), 0)
    labels = batch["labels"]
    lengths = (batch["segment_ids"] != 0).sum(1)
    prompts = (labels != IGNORE_INDEX).int().argmax(1)
    rows = share_prefixes(batch["input_ids"], batch["position_ids"], lengths.tolist(), prompts.tolist())
    assert rows.input_ids.shape[1] == 5 + 12 + 3 + 14 + 4 + 3  # each prompt once
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                   return_hidden=True)  # fmt: skip
    want, want_mask = label_logps(model, hidden, labels, 0.7, chunk=5)
    shared = model(rows.input_ids, position_ids=rows.position_ids, segment_ids=rows.segment_ids,
                   prefix_ids=rows.prefix_ids, return_hidden=True)  # fmt: skip
    got, mask = label_logps(model, shared, labels, 0.7, chunk=5, index=rows.index)
    assert torch.equal(mask, want_mask) and int(mask.sum()) == 29
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(2))  # any upstream gradient
    for g_got, g_want in zip(_grads(model, (got * weights).sum()), _grads(model, (want * weights).sum())):
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)


def test_the_recipe_loss_equals_full_logits_of_one_row_per_completion(tmp_path):
    make_chat_model(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{30 + i} w{60 + i} w{90 + i}" * (1 + i % 3)}) + "\n"
                            for i in range(8)))  # fmt: skip
    cfg = TrainConfig(model=str(tmp_path / "model"), data=[str(data)], output_dir=str(tmp_path / "runs"), name="s",
                      method="grpo", reward=["length=12"], max_steps=1, batch_size=3, num_generations=4,
                      max_new_tokens=6, temperature=0.8, warmup_steps=0, seq_len=64, seed=3,
                      lora={"r": 8, "alpha": 16}, loss_type="dapo")  # fmt: skip
    recipe = RLRecipe(cfg, console=Console(quiet=True), progress=False, sampler=engine_sampler)
    recipe.setup()
    with torch.no_grad():
        for name, t in lora_state_dict(recipe.model).items():
            if "lora_B" in name:
                t.add_(torch.randn_like(t) * 0.05)
    batch = recipe.prepare_step([recipe._next_batch()])[0]
    advantages = torch.randn(len(batch["labels"]), generator=torch.Generator().manual_seed(4))
    got, mask = recipe._token_logps(batch)
    want, want_mask = token_logps(recipe._logits(batch), batch["labels"])
    assert torch.equal(mask, want_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    losses = [grpo_loss(lp, lp.detach(), None, advantages, mask, 0.0, 0.2, "dapo", 6)[0] for lp in (got, want)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for g_got, g_want in zip(_grads(recipe.model, losses[0]), _grads(recipe.model, losses[1])):
        torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-4)
