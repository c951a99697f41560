"""`nomoat train --method kto`: unpaired feedback end to end, the loss of a recipe batch equal to TRL 1.16's KTOTrainer.

TRL's `KTOTrainer._compute_loss` runs on a stand-in trainer (as in test_preference_loss) over the same model. Its KL
rows are built here from the batch's examples by TRL's rule (each prompt with the previous example's completion),
and its reference log-probabilities come from the same model with the adapter off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_preference_loss import _stub, _TrlModel

from nomoat.config.train import TrainConfig
from nomoat.data import DataError, load_dataset
from nomoat.lora import disable_lora
from nomoat.train.preference import KTORecipe

from train_utils import recipe_config

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl", minversion="1.16")
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

QUIET = Console(quiet=True)


def _feedback(path: Path, n: int = 8) -> Path:
    lines = []
    for i in range(n):
        good = i % 3 != 1
        completion = "w20 w21 w22" if good else f"w{100 + i} w{200 + i}"
        lines.append(json.dumps({"prompt": f"w{30 + i} w{40 + i}", "completion": completion, "label": good}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, name: str, **kw) -> TrainConfig:  # noqa: ANN003
    base = dict(method="kto", max_steps=6, batch_size=4, lr=5e-3, warmup_steps=0, seq_len=64, seed=1, beta=0.2,
                desirable_weight=1.0, undesirable_weight=1.5)  # fmt: skip
    return recipe_config(tmp_path, name, "feedback.jsonl", _feedback, **(base | kw))


def test_kto_format_reads_labels_and_refuses_bad_ones(tmp_path):
    ds = load_dataset(_feedback(tmp_path / "f.jsonl"))
    assert ds.format == "kto" and [e.desirable for e in ds.examples][:3] == [True, False, True]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "completion": "w2", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r'bad\.jsonl:1: field "label" must be true or false'):
        load_dataset(bad)


def _trl_inputs(batch: dict, n: int, model: torch.nn.Module) -> dict:
    """TRL's KTO inputs for the batch's n examples: KL rows by TRL's cycling, reference log-probs adapter off."""
    ids, labels = batch["input_ids"][:n], batch["labels"][:n]
    mask = (labels != -100).long()
    prompts, completions = [], []
    for r in range(n):
        first = int(mask[r].nonzero()[0])
        end = int((batch["segment_ids"][r] != 0).sum())
        prompts.append(ids[r, :first].tolist())
        completions.append(ids[r, first:end].tolist())
    kl_completions = completions[-1:] + completions[:-1]
    rows = [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, kl_completions)]
    T = max(len(x) for x, _ in rows)
    kl_ids = torch.tensor([x + [0] * (T - len(x)) for x, _ in rows])
    kl_mask = torch.tensor([m + [0] * (T - len(m)) for _, m in rows])
    wrapped = _TrlModel(model)
    with torch.no_grad(), disable_lora(model):
        ref = wrapped(ids, labels=ids.masked_fill(mask == 0, -100)).log_probs.sum(-1)
        ref_kl = wrapped(kl_ids, labels=kl_ids.masked_fill(kl_mask == 0, -100)).log_probs.sum(-1)
    return {"input_ids": ids, "attention_mask": (batch["segment_ids"][:n] != 0).long(), "completion_mask": mask,
            "KL_input_ids": kl_ids, "KL_attention_mask": (kl_mask >= 0).long(), "KL_completion_mask": kl_mask,
            "label": batch["desirable"], "ref_logps": ref, "ref_KL_logps": ref_kl}  # fmt: skip


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


def test_a_kto_batch_has_trls_loss_and_gradients(tmp_path):
    recipe = KTORecipe(_config(tmp_path, "kto-trl", batch_size=4), console=QUIET, progress=False)
    recipe.setup()
    for _ in range(2):  # move the adapter away from the reference
        recipe.train_step()
    batch = next(iter(recipe.stream))
    n = int(batch["units"])
    params = list(recipe.params.values())
    loss_sum, count = recipe.loss(batch)
    ours = loss_sum / count
    ours.backward()
    ours_grads = [p.grad.clone() for p in params]
    recipe.optimizer.zero_grad(set_to_none=True)
    module = _Logits(recipe.model)
    cfg = recipe.cfg
    stub = _stub(module, calculate_KL=True, loss_type="kto", beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                 undesirable_weight=cfg.undesirable_weight)  # fmt: skip
    stub._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(stub, m, b)
    inputs = _trl_inputs(batch, n, module)
    assert bool(inputs["label"].any()) and not bool(inputs["label"].all())
    theirs = KTOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, p in zip(ours_grads, params, strict=True):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    kl_ours = (recipe._logps({k: batch[k][n:] for k in ("input_ids", "position_ids", "segment_ids", "labels")})[0])
    assert kl_ours.shape == (n,)


def test_kto_trains_and_separates_desirable_from_undesirable(tmp_path):
    result = KTORecipe(_config(tmp_path, "kto"), console=QUIET, progress=False).run()
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "kl", "examples"):
        assert key in records[0]
    assert records[0]["margin"] == pytest.approx(0.0, abs=1e-6)  # B = 0 at init: policy == reference
    assert records[-1]["margin"] > 0 and records[-1]["loss"] < records[0]["loss"]


def test_kto_on_pairs_is_refused_before_the_model_loads(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "w10", "chosen": "w20", "rejected": "w30"}) + "\n")
    cfg = _config(tmp_path / "x", "refused", data=[str(data)], model=str(tmp_path / "no-model"))
    with pytest.raises(DataError, match="--method kto needs unpaired feedback"):
        KTORecipe(cfg, console=QUIET, progress=False).run()
