"""Preference tuning (`nomoat train --method dpo|ipo|simpo|orpo`): a recipe on the shared training loop.

It reuses the SFT recipe's model, LoRA and adapter saving, and owns what is particular to learning from pairs: the
data (prompt + chosen and prompt + rejected, trained only on the answers), batches that hold the chosen rows of their
pairs followed by the rejected rows (one forward pass for both), the reference (the same model under
`disable_lora` with no grad: no second copy in memory; with `precompute_ref`, its log-probabilities are computed
once and kept in the run folder as `reference_logps.pt`), the pair losses of `nomoat.train.preference_loss`, and the
per-step reward metrics. The loop normalises by pairs (`units`).

With `init_adapter` (an SFT adapter, say), the trained adapter starts as a copy of it and the reference is the base
with that adapter's frozen weights (`reference_weights`: swapped in for the reference pass, a copy of the adapter's
size, never a second model).
"""

from __future__ import annotations

import contextlib
import io
import math
import random
from collections.abc import Iterator
from typing import Any

import torch

from nomoat.data import BatchStream, DataError, Preference, Row, collate, tokenize_preference
from nomoat.lora import disable_lora, load_adapter, lora_state_dict, read_adapter_config
from nomoat.train import preference_loss as pl
from nomoat.train.sft import SFTRecipe
from nomoat.util.errors import UsageError
from nomoat.util.files import atomic_write_bytes

DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}
SIMPO_GAMMA_BETA_RATIO = 0.25  # TRL's CPOConfig default: simpo_gamma 0.5 at beta 2


@contextlib.contextmanager
def reference_weights(model: torch.nn.Module, frozen: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Run the reference inside the block: the adapter off, or (with `frozen`) the adapter's initial weights.

    The frozen tensors are copied into the adapter's parameters and the trained values copied back on exit, so call
    it before the policy's forward pass of a micro-batch (an in-place write after it would break its backward).

    Args:
        model: The model with its LoRA layers.
        frozen: Adapter tensors by `lora_state_dict` name (the initial adapter), or None for the adapter off.
    """
    if not frozen:
        with disable_lora(model):
            yield
        return
    own = lora_state_dict(model)
    with torch.no_grad():
        trained = {k: own[k].clone() for k in frozen}
        for k, v in frozen.items():
            own[k].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in trained.items():
                own[k].copy_(v)


class InitAdapterMixin:
    """`init_adapter` for recipes built on `SFTRecipe`: the trained adapter starts as a copy of a saved one."""

    cfg: Any
    model: torch.nn.Module

    def build(self) -> None:
        """Take the LoRA shape (targets, rank, alpha, DoRA) from `init_adapter` before the model is built."""
        if self.cfg.init_adapter:
            self.cfg.lora = read_adapter_config(self.cfg.init_adapter)
        self._frozen: dict[str, torch.Tensor] | None = None
        super().build()  # type: ignore[misc]

    def load_init_adapter(self) -> None:
        """Copy `init_adapter`'s tensors into the injected layers and keep a frozen copy as the reference."""
        if self.cfg.init_adapter:
            load_adapter(self.model, self.cfg.init_adapter)
            self._frozen = {k: v.detach().clone() for k, v in lora_state_dict(self.model).items()}
            self.console.print(f"[bold]init adapter[/bold] {self.cfg.init_adapter} (also the reference)")  # type: ignore[attr-defined]

    def reference(self) -> contextlib.AbstractContextManager:
        """The reference model inside a `with` block (no grad): the adapter off, or the initial adapter."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(reference_weights(self.model, self._frozen))
        return stack


class PreferenceRecipe(InitAdapterMixin, SFTRecipe):
    """A LoRA preference-tuning run (DPO, IPO, SimPO, ORPO) over prompt/chosen/rejected pairs.

    Example:
        >>> PreferenceRecipe(TrainConfig(model="m", data=["pairs.jsonl"], method="dpo", max_steps=50)).run()
    """

    @property
    def method(self) -> str:
        """The preference method of this run."""
        return self.cfg.method

    @property
    def beta(self) -> float:
        """The method's beta (`--beta`, else the method's usual default)."""
        return self.cfg.beta if self.cfg.beta is not None else DEFAULT_BETA[self.method]

    def check_dataset(self) -> None:
        """Pairs only, and no pair whose two answers are the same (each named by file and line)."""
        if any(not isinstance(e, Preference) for e in self.dataset.examples):
            raise DataError(f"{self.dataset.format} data has no chosen/rejected pairs: --method {self.method} "
                            "needs prompt/chosen/rejected records")  # fmt: skip
        same = [f"{e.source}: chosen and rejected are the same answer" for e in self.dataset.examples
                if e.chosen == e.rejected]  # fmt: skip
        if same:
            raise DataError(same)

    def _setup_data(self) -> None:
        cfg = self.cfg
        if self.method not in pl.PAIRED_METHODS:
            raise UsageError(f"--method {self.method} is not a paired preference method",
                             hint=f"use one of {', '.join(pl.PAIRED_METHODS)}")  # fmt: skip
        self.load_init_adapter()
        pairs = []
        for example in self.dataset.examples:
            chosen, rejected = tokenize_preference(example, self.tokenizer, cfg.seq_len)
            if chosen.num_label_tokens and rejected.num_label_tokens:
                pairs.append((chosen, rejected))
        if not pairs:
            raise DataError("no pair has trainable tokens in both answers: check --seq-len")
        self._print_summary(pairs)
        self.pad_id = pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = list(range(len(pairs)))
        random.Random(cfg.seed).shuffle(order)
        k = cfg.batch_size
        batches = [[Row.single(pairs[i][0]) for i in order[s : s + k]] + [Row.single(pairs[i][1])
                    for i in order[s : s + k]] for s in range(0, len(order), k)]  # fmt: skip
        self.stream = BatchStream(batches, 1, seed=cfg.seed, pad_id=pad)
        self._ref: dict[bytes, torch.Tensor] = {}
        if cfg.precompute_ref and self.method in pl.NEEDS_REFERENCE:
            self._precompute_ref([collate(rows, pad) for rows in batches])
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        self._acc: dict[str, float] = {}

    def _precompute_ref(self, batches: list[dict[str, Any]]) -> None:
        """Reference log-probabilities of every batch, computed once (or read from the run folder on resume)."""
        path = self.run_dir / "reference_logps.pt"
        if path.is_file():
            self._ref = torch.load(path, weights_only=True)
            return
        for batch in batches:
            with self.reference():
                ids = batch["input_ids"]
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self._ref[_key(ids)] = self._logps(batch)[1].float().cpu()
        buffer = io.BytesIO()
        torch.save(self._ref, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _reference(self, batch: dict[str, Any]) -> torch.Tensor:
        """(2P,) reference log-probabilities: precomputed, or the model with its adapter off."""
        if self._ref:
            return self._ref[_key(batch["input_ids"])].to(batch["input_ids"].device)
        with self.reference():
            return self._logps(batch)[1]

    def _print_summary(self, pairs: list[tuple[Any, Any]]) -> None:
        lengths = [len(t) for pair in pairs for t in pair]
        truncated = sum(t.truncated for pair in pairs for t in pair)
        self.summary = self._summary_record(len(pairs), lengths, truncated)
        self.console.print(f"[bold]data[/bold] {len(pairs)} pairs ({self.dataset.format}), sequence length "
                           f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
                           f"{truncated} sequences truncated at {self.cfg.seq_len}")  # fmt: skip

    def _summary_record(self, pairs: int, lengths: list[int], truncated: int) -> Any:
        class _Summary:
            def to_dict(self) -> dict[str, Any]:
                return {"pairs": pairs, "min_length": min(lengths), "max_length": max(lengths), "truncated": truncated}

        return _Summary()

    def units(self, batch: dict[str, Any]) -> int:
        """Pairs in the micro-batch."""
        return batch["input_ids"].shape[0] // 2

    def _logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(batch["input_ids"], position_ids=batch["position_ids"],
                            segment_ids=batch["segment_ids"])  # fmt: skip  # (2P, T, V)
        logps, counts = pl.sequence_logps(logits, batch["labels"])  # (2P,), (2P,)
        return logits, logps, counts

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed pair losses of one micro-batch (chosen rows first, then rejected) and the number of pairs."""
        reference = self._reference(batch) if self.method in pl.NEEDS_REFERENCE else None  # before the policy pass
        logits, logps, counts = self._logps(batch)
        chosen, rejected = logps.chunk(2)
        n_chosen, n_rejected = counts.chunk(2)
        beta, method = self.beta, self.method
        if method in pl.NEEDS_REFERENCE:
            ref_chosen, ref_rejected = reference.chunk(2)
            if method == "dpo":
                losses, r_c, r_r = pl.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
            else:
                losses, r_c, r_r = pl.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta)
        elif method == "simpo":
            losses, r_c, r_r = pl.simpo_loss(chosen / n_chosen, rejected / n_rejected, beta, SIMPO_GAMMA_BETA_RATIO)
        else:  # orpo: the SFT term is each chosen answer's mean token NLL
            losses, r_c, r_r = pl.orpo_loss(chosen / n_chosen, rejected / n_rejected, -chosen / n_chosen, beta)
        self._accumulate(r_c, r_r)
        return losses.sum(), len(losses)

    def _accumulate(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        acc = self._acc
        acc["pairs"] = acc.get("pairs", 0) + len(chosen)
        acc["chosen"] = acc.get("chosen", 0.0) + chosen.sum().item()
        acc["rejected"] = acc.get("rejected", 0.0) + rejected.sum().item()
        acc["correct"] = acc.get("correct", 0) + (chosen > rejected).sum().item()

    def step_metrics(self, micro: list[dict[str, Any]], units: int) -> dict[str, Any]:
        """Pairs of the step, mean rewards of chosen and rejected answers, their margin and the accuracy."""
        acc, self._acc = self._acc, {}
        n = max(acc.get("pairs", 0), 1)
        chosen, rejected = acc.get("chosen", 0.0) / n, acc.get("rejected", 0.0) / n
        return {"pairs": units, "rewards_chosen": round(chosen, 6), "rewards_rejected": round(rejected, 6),
                "margin": round(chosen - rejected, 6), "accuracy": round(acc.get("correct", 0) / n, 4),
                "epoch": round(self.stream.epoch + self.stream.index / len(self.stream), 4)}  # fmt: skip


def _key(input_ids: torch.Tensor) -> bytes:
    """A batch's identity: its token ids (the stream always collates a batch the same way)."""
    return input_ids.cpu().numpy().tobytes() + bytes(str(tuple(input_ids.shape)), "ascii")


__all__ = ["DEFAULT_BETA", "InitAdapterMixin", "PreferenceRecipe", "reference_weights"]
