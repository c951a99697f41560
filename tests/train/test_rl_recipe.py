"""`nomoat train --method grpo|rloo` on a tiny model: rollouts through the engine with the live adapter, rewards,
metrics, the completions file, and clear errors for bad rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from nomoat.cli.train import engine_sampler
from nomoat.config.lora import LoRAConfig
from nomoat.config.train import TrainConfig
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora import inject_lora, lora_state_dict, merge_lora
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer
from nomoat.train.rewards import RewardError
from nomoat.train.rl import RLRecipe, token_logps
from nomoat.util.errors import UsageError

from train_utils import make_chat_model, recipe_config

QUIET = Console(quiet=True)


def even_first_word(completions, prompts, **columns):  # noqa: ANN001, ANN003, ANN201
    """1 when the completion's first word is w + an even number (about half of the tiny vocabulary)."""
    out = []
    for c in completions:
        words = c.split()
        out.append(float(bool(words) and words[0][1:].isdigit() and int(words[0][1:]) % 2 == 0))
    return out


def broken(completions, prompts, **columns):  # noqa: ANN001, ANN003, ANN201
    raise KeyError("no such thing")


def short(completions, prompts, **columns):  # noqa: ANN001, ANN003, ANN201
    return [1.0]


def _prompts(path: Path) -> None:
    path.write_text("".join(json.dumps({"prompt": f"w{30 + i} w{60 + i}", "answer": f"w{i}"}) + "\n"
                            for i in range(8)))  # fmt: skip


def _config(tmp_path: Path, name: str, **kw) -> TrainConfig:  # noqa: ANN003
    base = dict(method="grpo", reward=[f"{__name__}:even_first_word"], max_steps=6, batch_size=2, num_generations=4,
                max_new_tokens=4, lr=3e-2, warmup_steps=0, seq_len=32, seed=1, lora={"r": 8, "alpha": 16})  # fmt: skip
    return recipe_config(tmp_path, name, "prompts.jsonl", _prompts, **(base | kw))


def _model_with_lora(tmp_path: Path) -> tuple[torch.nn.Module, Tokenizer]:
    make_chat_model(tmp_path / "model")
    model = load_model(tmp_path / "model", dtype=torch.float32, device="cpu")
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    return model, Tokenizer.from_dir(tmp_path / "model")


def test_rollouts_equal_the_engine_used_directly(tmp_path):
    model, tok = _model_with_lora(tmp_path)
    with torch.no_grad():
        for name, t in lora_state_dict(model).items():
            if "lora_B" in name:
                t.add_(torch.randn_like(t) * 0.3)
    sampler = engine_sampler(model, tok, 8, 32)
    requests = [([3, 40, 41, 4], 11), ([3, 50, 4], 12), ([3, 40, 41, 4], 13)]
    ours = sampler(requests, 1.0, 6)
    merged = load_model(tmp_path / "model", dtype=torch.float32, device="cpu")  # the same weights, adapter merged
    inject_lora(merged, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, t in lora_state_dict(merged).items():
            t.copy_(lora_state_dict(model)[name])
    merge_lora(merged)
    direct = Engine(merged, tok, max_running=2, max_seq_len=32)
    for (ids, seed), (token_ids, _, _) in zip(requests, ours):
        assert direct.generate(ids, SamplingParams(temperature=1.0, max_new_tokens=6, seed=seed)).token_ids == token_ids


def test_the_trained_adapter_is_live_in_the_next_rollout(tmp_path):
    model, tok = _model_with_lora(tmp_path)
    engine = Engine(model, tok, max_running=2, max_seq_len=32)  # the model under training itself, no view of it
    prompt = [3, 40, 41, 4]
    params = SamplingParams(temperature=0.0, max_new_tokens=1, logprobs=True, top_logprobs=5)

    def first_logprobs() -> list[tuple[int, float]]:
        return engine.generate(prompt, params).logprobs[0].top

    def model_logprobs() -> list[tuple[int, float]]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
        top = lp.topk(5)
        return list(zip(top.indices.tolist(), top.values.tolist()))

    before = first_logprobs()
    with torch.no_grad():  # an optimizer step writes the adapter in place
        for name, t in lora_state_dict(model).items():
            if "lora_B" in name:
                t.add_(torch.randn_like(t))
    after = first_logprobs()
    assert after != before
    for (i, a), (j, b) in zip(after, model_logprobs()):
        assert i == j and a == pytest.approx(b, abs=1e-4)


def test_one_grpo_step_raises_the_rewarded_completions(tmp_path):
    cfg = _config(tmp_path, "direction", max_new_tokens=2, num_generations=8, batch_size=4, lr=5e-2)
    recipe = RLRecipe(cfg, console=QUIET, progress=False, sampler=engine_sampler)
    recipe.setup()
    batch = recipe.prepare_step([recipe._next_batch()])[0]
    adv = batch["advantages"]
    assert (adv > 0).any() and (adv < 0).any()
    assert batch["old_logps"] is None  # one update per generation: the sampling policy is the one the loss runs
    with torch.no_grad():
        old, _ = token_logps(recipe._logits(batch), batch["labels"])
    loss_sum, units = recipe.loss_step(batch)
    (loss_sum / units).backward()
    recipe.optimizer.step()
    with torch.no_grad():
        new, mask = token_logps(recipe._logits(batch), batch["labels"])
    change = ((new - old) * mask).sum(-1)  # (N,) log-probability change of each completion
    assert change[adv > 0].mean() > 0 > change[adv < 0].mean()


def test_log_probabilities_are_those_of_the_sampling_temperature(tmp_path):
    """As TRL's trainers: the policy's log-probabilities come from the logits divided by the temperature."""
    recipe = RLRecipe(_config(tmp_path, "temperature", temperature=0.5, max_new_tokens=3), console=QUIET,
                      progress=False, sampler=engine_sampler)  # fmt: skip
    recipe.setup()
    batch = recipe.prepare_step([recipe._next_batch()])[0]
    with torch.no_grad():
        logits = recipe.model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        policy, _ = token_logps(recipe._logits(batch), batch["labels"])  # what the loss and the reference use
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = torch.log_softmax(logits[:, :-1].float() / 0.5, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert mask.any()
    torch.testing.assert_close(policy[mask], expected[mask], atol=1e-5, rtol=1e-5)
    untempered = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert not torch.allclose(policy[mask], untempered[mask], atol=1e-3)


def test_grpo_trains_writes_metrics_and_rollouts(tmp_path):
    result = RLRecipe(_config(tmp_path, "grpo", max_steps=8), console=QUIET, progress=False,
                      sampler=engine_sampler).run()  # fmt: skip
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8
    name = f"{__name__}:even_first_word"
    for key in ("loss", "reward", "reward_std", f"reward/{name}", "completion_length", "clip_fraction"):
        assert key in records[0]
    rollouts = [json.loads(x) for x in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 8 * 2 * 4 and set(rollouts[0]) >= {"step", "completion", "rewards", "reward"}


def test_rloo_with_kl_runs(tmp_path):
    result = RLRecipe(_config(tmp_path, "rloo", method="rloo", max_steps=2, beta=0.05), console=QUIET,
                      progress=False, sampler=engine_sampler).run()  # fmt: skip
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_grpo_with_kl_reports_it(tmp_path):
    result = RLRecipe(_config(tmp_path, "kl", max_steps=2, beta=0.1, loss_type="grpo"), console=QUIET,
                      progress=False, sampler=engine_sampler).run()  # fmt: skip
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[1]["kl"] > 0


@pytest.mark.parametrize(("reward", "error", "match"), [
    (f"{__name__}:broken", RewardError, "raised KeyError"),
    (f"{__name__}:short", RewardError, "returned 1 values for 8 completions"),
    ("no_such_module_xyz:fn", UsageError, "cannot import no_such_module_xyz"),
    ("exact_matchh", UsageError, "not a built-in reward"),
])  # fmt: skip
def test_bad_rewards_are_clear_errors(tmp_path, reward, error, match):
    cfg = _config(tmp_path, "bad", reward=[reward], max_steps=1)
    with pytest.raises(error, match=match):
        RLRecipe(cfg, console=QUIET, progress=False, sampler=engine_sampler).run()
    assert not (tmp_path / "runs" / "bad" / "adapter").exists()


def test_a_missing_reward_module_fails_before_the_model_loads(tmp_path):
    cfg = _config(tmp_path, "early", reward=["no_such_module_xyz:fn"], model=str(tmp_path / "no-model"))
    with pytest.raises(UsageError):
        RLRecipe(cfg, console=QUIET, progress=False, sampler=engine_sampler).run()


def test_prompt_records_keep_their_columns_and_are_not_guessed_for_sft(tmp_path):
    from nomoat.data import DataError, detect_format, load_dataset

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "w5"}], "answer": "w7", "id": 3}) + "\n"
                    + json.dumps({"prompt": "w6", "answer": "w8"}) + "\n")  # fmt: skip
    ds = load_dataset(path, format="prompt")
    assert [e.prompt for e in ds.examples] == [[{"role": "user", "content": "w5"}], [{"role": "user", "content": "w6"}]]
    assert ds.examples[0].columns == {"answer": "w7", "id": 3} and ds.examples[1].columns == {"answer": "w8"}
    with pytest.raises(DataError, match="could not detect"):
        detect_format({"prompt": "w6", "answer": "w8"})
