"""`nomoat train --method dpo|...` on a tiny model: it trains, saves an adapter, the margin grows, resume is exact."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
from rich.console import Console

from nomoat.config.train import TrainConfig
from nomoat.data import DataError
from nomoat.train.preference import PreferenceRecipe
from nomoat.train.sft import SFTRecipe
from nomoat.util.errors import UsageError

from train_utils import recipe_config

QUIET = Console(quiet=True)


def _pairs(path: Path, n: int = 8, conversational: bool = False) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(10, 500)}" for _ in range(3))
        chosen, rejected = "w20 w21 w22", " ".join(f"w{rng.randrange(100, 500)}" for _ in range(3))
        if conversational:
            rec = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": chosen}],
                   "rejected": [{"role": "assistant", "content": rejected}]}  # fmt: skip
        else:
            rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, name: str, method: str = "dpo", **kw) -> TrainConfig:  # noqa: ANN003
    base = dict(method=method, max_steps=6, batch_size=4, lr=5e-3, warmup_steps=0, seq_len=64, seed=1)
    return recipe_config(tmp_path, name, "pairs.jsonl", lambda path: _pairs(path, conversational=True), **(base | kw))


def _records(tmp_path: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_dpo_trains_an_adapter_and_the_margin_grows(tmp_path):
    result = PreferenceRecipe(_config(tmp_path, "dpo"), console=QUIET, progress=False).run()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    records = _records(tmp_path, "dpo")
    assert len(records) == 6
    for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "pairs"):
        assert key in records[0]
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # B = 0 at init: policy == reference
    assert records[-1]["margin"] > records[1]["margin"] > 0
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("method", ["ipo", "simpo", "orpo"])
def test_other_methods_lower_their_loss(tmp_path, method):
    PreferenceRecipe(_config(tmp_path, method, method=method), console=QUIET, progress=False).run()
    records = _records(tmp_path, method)
    assert records[-1]["loss"] < records[0]["loss"]


class _Interrupted(PreferenceRecipe):
    """Sends itself SIGINT during step 4 (the loop finishes that step, checkpoints it, then stops)."""

    def loss(self, batch):  # noqa: ANN001, ANN201
        if self.step == 3 and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().loss(batch)


def test_resume_after_a_kill_reproduces_the_losses(tmp_path):
    whole = PreferenceRecipe(_config(tmp_path, "whole", save_every=2), console=QUIET, progress=False).run()
    cut = _Interrupted(_config(tmp_path, "cut", save_every=2), console=QUIET, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert len(cut.losses) < len(whole.losses)
    rest = PreferenceRecipe(_config(tmp_path, "cut", save_every=2, resume=True), console=QUIET, progress=False).run()
    assert cut.losses + rest.losses == whole.losses
    assert [r["loss"] for r in _records(tmp_path, "cut")] == whole.losses


def test_sft_on_pairs_says_use_a_preference_method(tmp_path):
    cfg = _config(tmp_path, "sft", method="sft", model=str(tmp_path / "no-model-needed"))
    with pytest.raises(UsageError) as err:
        SFTRecipe(cfg, console=QUIET, progress=False).run()
    assert "--method dpo" in (err.value.hint or "")
    assert "pairs.jsonl" in str(err.value)


def test_precomputed_reference_gives_the_same_run_and_resumes(tmp_path):
    plain = PreferenceRecipe(_config(tmp_path, "plain", max_steps=6), console=QUIET, progress=False).run()
    cfg = _config(tmp_path, "pre", max_steps=6, save_every=2, precompute_ref=True)
    cut = _Interrupted(cfg, console=QUIET, progress=False)
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    assert (tmp_path / "runs" / "pre" / "reference_logps.pt").is_file()
    rest = PreferenceRecipe(_config(tmp_path, "pre", max_steps=6, save_every=2, precompute_ref=True, resume=True),
                            console=QUIET, progress=False).run()  # fmt: skip
    assert cut.losses + rest.losses == pytest.approx(plain.losses, rel=1e-6, abs=1e-7)


def test_a_pair_with_one_answer_twice_is_refused_before_the_model_loads(tmp_path):
    data = tmp_path / "same.jsonl"
    data.write_text(json.dumps({"prompt": "w10", "chosen": "w20", "rejected": "w30"}) + "\n"
                    + json.dumps({"prompt": "w11", "chosen": "w20", "rejected": "w20"}) + "\n")  # fmt: skip
    cfg = _config(tmp_path, "same", data=[str(data)], model=str(tmp_path / "no-model-needed"))
    with pytest.raises(DataError) as err:
        PreferenceRecipe(cfg, console=QUIET, progress=False).run()
    assert "same.jsonl:2" in str(err.value) and "same answer" in str(err.value)


def both_layouts(recipe: PreferenceRecipe) -> tuple[dict, dict]:
    """The first batch twice: one row per pair (the prompt once, as the recipe trains) and one row per answer."""
    stream = recipe.stream
    units = stream.share(stream.batches(0)[0])
    packed = stream.collate_units(units)
    stream.share_prefix = False
    try:
        rows = stream.collate_units(units)
    finally:
        stream.share_prefix = True
    assert packed["input_ids"].shape[0] == len(units) and rows["input_ids"].shape[0] == 2 * len(units)
    assert int((packed["segment_ids"] > 0).sum()) < int((rows["segment_ids"] > 0).sum())  # the prompts are shared
    return packed, rows


def test_log_probabilities_in_chunks_equal_those_of_the_full_logits(tmp_path):
    """The recipe's per-answer log-probabilities (one row per pair, its prompt once; chunked, no full-vocabulary
    logits) and their gradients equal `sequence_logps` over the whole logits of one row per answer, the function
    the TRL comparisons check."""
    import torch

    from nomoat.train import preference_loss as pl

    recipe = PreferenceRecipe(_config(tmp_path, "chunks", loss_chunk=3), console=QUIET, progress=False)
    recipe.setup()
    packed, rows = both_layouts(recipe)
    logps, counts = recipe._logps(packed)
    params = [p for p in recipe.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(logps.sum(), params)
    logits = recipe.model(rows["input_ids"], position_ids=rows["position_ids"], segment_ids=rows["segment_ids"])
    want, want_counts = pl.sequence_logps(logits, rows["labels"])
    want_grads = torch.autograd.grad(want.sum(), params)
    assert counts.tolist() == want_counts.tolist() and min(counts.tolist()) > 3  # more than one chunk per row
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
