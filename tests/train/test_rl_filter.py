"""GRPO's group filtering (`--filter-groups`, DAPO's dynamic sampling) and refilling (`--refill-rounds`) on a tiny
model: the groups left in the loss, the step's normaliser, the refill from the next prompts and the `flat_groups`
metric, each checked against what is recomputed from the rollouts themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nomoat.cli.train import engine_sampler
from nomoat.config.train import ConfigError, TrainConfig
from nomoat.train.rl import RLRecipe, token_logps

from train_utils import recipe_config

QUIET = Console(quiet=True)


def half_flat(completions, prompts, **columns):  # noqa: ANN001, ANN003, ANN201
    """Prompts with an even first word score 1 whatever the completion (a flat group); others reward an even word."""
    out = []
    for c, p in zip(completions, prompts):
        words = c.split()
        even = bool(words) and words[0][1:].isdigit() and int(words[0][1:]) % 2 == 0
        out.append(1.0 if int(p.split()[0][1:]) % 2 == 0 else float(even))
    return out


def constant(completions, prompts, **columns):  # noqa: ANN001, ANN003, ANN201
    return [1.0] * len(completions)


def _prompts(path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": f"w{30 + i} w{60 + i}"}) + "\n" for i in range(16)))


def _config(tmp_path: Path, name: str, **kw) -> TrainConfig:  # noqa: ANN003
    base = dict(method="grpo", reward=[f"{__name__}:half_flat"], max_steps=3, batch_size=4, num_generations=8,
                max_new_tokens=3, lr=3e-2, warmup_steps=0, seq_len=32, seed=1, lora={"r": 8, "alpha": 16})  # fmt: skip
    return recipe_config(tmp_path, name, "prompts.jsonl", _prompts, **(base | kw))


def _recipe(cfg: TrainConfig) -> RLRecipe:
    recipe = RLRecipe(cfg, console=QUIET, progress=False, sampler=engine_sampler)
    recipe.setup()
    return recipe


def _rollouts(recipe: RLRecipe) -> list[dict]:
    return [json.loads(x) for x in (recipe.run_dir / "rollouts.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo"])
def test_filtering_leaves_out_the_flat_groups_and_normalises_over_the_rest(tmp_path, loss_type):
    recipe = _recipe(_config(tmp_path, f"filter-{loss_type}", filter_groups=True, loss_type=loss_type))
    (batch,) = recipe.prepare_step([recipe._next_batch()])
    rollouts = _rollouts(recipe)
    assert len(rollouts) == 4 * 8
    groups = [rollouts[i : i + 8] for i in range(0, 32, 8)]
    teaching = [g for g in groups if len({r["reward"] for r in g}) > 1]
    assert 0 < len(teaching) < 4  # the data makes the even prompts' groups flat
    assert len(batch["advantages"]) == 8 * len(teaching)
    grouped = batch["advantages"].view(-1, 8)
    assert (grouped.abs().amax(1) > 0).all()
    for adv, g in zip(grouped, teaching):  # each kept group's advantages are those of its own rewards
        r = torch.tensor([x["reward"] for x in g])
        torch.testing.assert_close(adv, (r - r.mean()) / (r.std() + 1e-4))
    mask = batch["labels"][:, 1:] != -100
    expected = {"dapo": int(mask.sum()), "dr_grpo": 8 * len(teaching) * 3, "grpo": 8 * len(teaching)}[loss_type]
    assert recipe.units(batch) == expected
    assert batch["num_label_tokens"] == int(mask.sum())
    with torch.no_grad():
        logps, m = token_logps(recipe._logits(batch), batch["labels"])
    assert torch.equal(m, mask) and mask.any(1).all()  # every kept row has its completion


def test_the_filtered_loss_sum_equals_the_unfiltered_one(tmp_path):
    """Flat groups have zero advantages: leaving them out changes the normaliser, not the summed loss."""
    full = _recipe(_config(tmp_path, "full"))
    filtered = _recipe(_config(tmp_path, "filtered", filter_groups=True))
    (a,) = full.prepare_step([full._next_batch()])
    (b,) = filtered.prepare_step([filtered._next_batch()])
    assert len(b["advantages"]) < len(a["advantages"])
    with torch.no_grad():
        loss_a, _ = full.loss_step(a)
        loss_b, _ = filtered.loss_step(b)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)


def test_refilling_draws_the_next_prompts_until_the_step_is_full(tmp_path):
    recipe = _recipe(_config(tmp_path, "refill", filter_groups=True, refill_rounds=3))
    batches = recipe.prepare_step([recipe._next_batch()])
    rollouts = _rollouts(recipe)
    groups = [rollouts[i : i + 8] for i in range(0, len(rollouts), 8)]
    assert len(groups) > 4  # more prompts were sampled than one batch holds
    assert len({r["source"] for r in rollouts}) == len(groups)  # each a prompt of its own, in stream order
    teaching = sum(len({r["reward"] for r in g}) > 1 for g in groups)
    kept = sum(len(b["advantages"]) // 8 for b in batches)
    assert kept == min(4, teaching)
    assert len(groups) <= 4 * (1 + 3)


def test_flat_groups_metric_and_a_step_without_teaching_groups(tmp_path):
    recipe = RLRecipe(_config(tmp_path, "metric", filter_groups=True, refill_rounds=1), console=QUIET, progress=False,
                      sampler=engine_sampler)  # fmt: skip
    result = recipe.run()
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(x) for x in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    for m in metrics:  # the share of the step's sampled groups whose rewards are all equal
        step = [r for r in rollouts if r["step"] == m["step"]]
        groups = [step[i : i + 8] for i in range(0, len(step), 8)]
        assert m["flat_groups"] == pytest.approx(sum(len({r["reward"] for r in g}) == 1 for g in groups) / len(groups))
    flat = RLRecipe(_config(tmp_path, "flat", filter_groups=True, reward=[f"{__name__}:constant"], max_steps=2),
                    console=QUIET, progress=False, sampler=engine_sampler).run()  # fmt: skip
    records = [json.loads(x) for x in (flat.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["flat_groups"] for r in records] == [1.0, 1.0] and all(r["grad_norm"] == 0 for r in records)


def test_refill_rounds_must_not_be_negative(tmp_path):
    with pytest.raises(ConfigError, match="refill_rounds"):
        _config(tmp_path, "bad", refill_rounds=-1)
