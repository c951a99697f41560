"""The training recipe against a plain torch loop over transformers + peft, packing, accumulation and errors."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from rich.console import Console

from nomoat.config.train import ConfigError, TrainConfig, load_train_config
from nomoat.data import NoTrainableTokensError
from nomoat.lora import save_adapter
from nomoat.train.loop import TrainingDivergedError
from nomoat.train.sft import SFTRecipe

from train_utils import make_chat_model, write_chat_data

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = make_chat_model(root / "model")
    data = write_chat_data(root / "chat.jsonl", n=24)
    return root, model, data


def _cfg(folder, tmp_path, **kw) -> TrainConfig:
    _, model, data = folder
    base = dict(model=str(model), data=[str(data)], output_dir=str(tmp_path / "runs"), name="t", seq_len=64,
                batch_size=2, lr=1e-3, warmup_steps=0, max_steps=10, packing=False,
                lora={"r": 4, "alpha": 8, "dropout": 0.0})  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _reference_losses(model_dir, adapter_dir, batches, grad_accum, cfg: TrainConfig) -> list[float]:
    """A plain torch loop over the transformers model with the peft adapter: the independent reference."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(hf, adapter_dir, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = transformers.get_cosine_schedule_with_warmup(opt, 0, cfg.max_steps)
    losses = []
    for step in range(cfg.max_steps):
        group = batches[step * grad_accum : (step + 1) * grad_accum]
        n_total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        total = 0.0
        for b in group:
            out = model(input_ids=b["input_ids"], attention_mask=(b["segment_ids"] != 0).long(),
                        position_ids=b["position_ids"])  # fmt: skip
            logits = out.logits[:, :-1].float()
            loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")  # fmt: skip
            (loss_sum / n_total).backward()
            total += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total / n_total)
    return losses


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_first_10_losses_match_transformers_peft(folder, tmp_path, grad_accum):
    cfg = _cfg(folder, tmp_path, grad_accum=grad_accum)
    recipe = SFTRecipe(cfg, console=QUIET, progress=False)
    recipe.setup()
    # The batches the recipe is about to see, then rewind the stream to the start.
    start = recipe.stream.state_dict()
    batches = [recipe._next_batch() for _ in range(cfg.max_steps * grad_accum)]
    recipe.stream.load_state_dict(start)
    recipe._batches = None
    # The adapter as initialised (A random, B zero), handed to peft through the PEFT file format.
    save_adapter(recipe.model, tmp_path / "init", cfg.lora, base_model_name_or_path=cfg.model)
    ours = [recipe.train_step()["loss"] for _ in range(cfg.max_steps)]
    ref = _reference_losses(cfg.model, tmp_path / "init", batches, grad_accum, cfg)
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, ref))
    print(f"grad_accum={grad_accum} max relative loss difference vs transformers+peft: {rel:.2e}")
    assert rel < 1e-4, (ours, ref)
    assert ours[-1] < ours[0]  # it learns


def test_packed_batch_loss_equals_unpacked(folder, tmp_path):
    """The summed loss of packed rows equals the sum over the same examples run one by one."""
    packed = SFTRecipe(_cfg(folder, tmp_path, packing=True, name="p", seq_len=128), console=QUIET, progress=False)
    packed.setup()
    batch = packed._next_batch()
    with torch.no_grad():
        loss_packed, n_packed = packed.loss_step(batch)
        total, n = 0.0, 0
        for r in range(batch["input_ids"].shape[0]):
            seg = batch["segment_ids"][r]
            for s in seg.unique().tolist():
                if s == 0:
                    continue
                idx = (seg == s).nonzero().squeeze(1)
                one = {k: batch[k][r : r + 1, idx] for k in ("input_ids", "labels", "position_ids", "segment_ids")}
                ls, c = packed.loss_step(one)
                total, n = total + float(ls), n + c
    assert n == n_packed > 0
    assert float(loss_packed) == pytest.approx(total, rel=1e-5)


def test_train_writes_adapter_metrics_and_summary(folder, tmp_path):
    cfg = _cfg(folder, tmp_path, max_steps=6, packing=True, val_size=4, eval_every=3, save_every=2, name="full")
    result = SFTRecipe(cfg, console=QUIET, progress=False).run()
    run = result.run_dir
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    prov = json.loads((result.adapter_dir / "nomoat.json").read_text())
    assert prov["base_model"]["sha256"] and prov["data"][0]["sha256"]
    assert prov["training"]["lora"]["r"] == 4 and prov["metrics"]["steps"] == 6
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert "val_loss" in lines[2] and "val_loss" in lines[5]
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoints").is_dir() and len(list((run / "checkpoints").iterdir())) == 2  # keep 2
    assert result.val_loss is not None and result.final_loss == lines[-1]["loss"]
    try:  # TensorBoard events are written exactly when tensorboard is importable
        import torch.utils.tensorboard  # noqa: F401

        has_tb = True
    except ImportError:
        has_tb = False
    assert any((run / "tensorboard").glob("events.out.tfevents.*")) == has_tb


def test_no_trainable_label_fails_loudly(folder, tmp_path):
    root, model, _ = folder
    data = root / "system_only.jsonl"  # the assistant answer is cut away by a tiny seq_len
    data.write_text(json.dumps({"messages": [{"role": "user", "content": " ".join(["w7"] * 40)},
                                             {"role": "assistant", "content": "w9"}]}) + "\n")  # fmt: skip
    with pytest.raises(NoTrainableTokensError, match="trainable"):
        SFTRecipe(_cfg(folder, tmp_path, data=[str(data)], seq_len=16), console=QUIET, progress=False).setup()


def test_nan_stops_the_run(folder, tmp_path):
    recipe = SFTRecipe(_cfg(folder, tmp_path, name="nan"), console=QUIET, progress=False)
    recipe.setup()
    with torch.no_grad():
        next(iter(recipe.params.values())).fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="not finite"):
        recipe.train_step()


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'seq_len'"):
        TrainConfig.from_dict({"seq_length": 5}, source="run.yaml")
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="exp")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(bad)
    cfg = load_train_config(None, lr=0.5, lora={"r": 2, "alpha": None})
    assert cfg.lr == 0.5 and cfg.lora.r == 2 and cfg.lora.alpha == 32


@pytest.mark.parametrize("variant", [{"quantize_base": "int8"}, {"quantize_base": "nf4"},
                                     {"lora": {"r": 4, "alpha": 8, "use_dora": True}},
                                     {"grad_checkpointing": True, "packing": True}])  # fmt: skip
def test_variants_learn(folder, tmp_path, variant):
    """QLoRA (int8, NF4 base), DoRA and gradient checkpointing train: the loss falls, only adapters change."""
    recipe = SFTRecipe(_cfg(folder, tmp_path, max_steps=8, lr=3e-3, **variant), console=QUIET, progress=False)
    recipe.setup()
    frozen = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if not p.requires_grad}
    start = recipe.stream.state_dict()
    fixed = recipe._next_batch()
    recipe.stream.load_state_dict(start)
    recipe._batches = None

    def fixed_loss() -> float:
        with torch.no_grad():
            total, n = recipe.loss_step(fixed)
        return float(total) / n

    before = fixed_loss()
    losses = [recipe.train_step()["loss"] for _ in range(8)]
    assert all(map(math.isfinite, losses))
    assert fixed_loss() < before
    for n, p in recipe.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
