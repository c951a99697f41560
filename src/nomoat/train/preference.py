"""Preference tuning (`nomoat train --method dpo|ipo|simpo|orpo|kto`): recipes on the shared training loop.

It reuses the SFT recipe's model, LoRA and adapter saving, and owns what is particular to learning from pairs: the
data (prompt + chosen and prompt + rejected, trained only on the answers), batches with one row per pair (its prompt
computed once, both answers attending to it: `models.segments`), the reference (the same model under
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

from nomoat.data import IGNORE_INDEX, BatchStream, DataError, Preference, Row, collate, tokenize_preference
from nomoat.data.formats import Feedback
from nomoat.lora import disable_lora, load_adapter, lora_state_dict, read_adapter_config
from nomoat.train import preference_loss as pl
from nomoat.train.loss import token_loss_sum
from nomoat.train.sft import SFTRecipe
from nomoat.util.errors import UsageError
from nomoat.util.files import atomic_write_bytes

DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
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
        self._make_stream([[(Row.single(c), Row.single(r)) for c, r in batch] for batch in self._batches_of(pairs)])

    def _batches_of(self, items: list[Any]) -> list[list[Any]]:
        """Global batches (batch size x processes) of `items` in a seeded order, fixed for the whole run."""
        order = list(range(len(items)))
        random.Random(self.cfg.seed).shuffle(order)
        k = self.cfg.batch_size * self.dist.world_size
        return [[items[i] for i in order[s : s + k]] for s in range(0, len(order), k)]

    def _make_stream(self, batches: list[list[tuple[Row, Row]]]) -> None:
        """The stream of unit batches, the precomputed reference (if asked) and the step count."""
        cfg = self.cfg
        self.pad_id = pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stream = UnitStream(batches, 1, seed=cfg.seed, pad_id=pad, shard=self.dist.shard)
        self.stream.share_prefix = self.method in pl.PAIRED_METHODS  # KTO slices its batches' rows
        self._ref: dict[bytes, torch.Tensor] = {}
        if cfg.precompute_ref and self.method in pl.NEEDS_REFERENCE:
            self._precompute_ref([self.stream.collate_units(self.stream.share(b)) for b in batches])
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        self._acc: dict[str, float] = {}

    def _precompute_ref(self, batches: list[dict[str, Any]]) -> None:
        """Reference log-probabilities of every batch, computed once (or read from the run folder on resume)."""
        rank, world = self.dist.shard  # each process keeps the reference of its own share
        path = self.run_dir / ("reference_logps.pt" if world == 1 else f"reference_logps.{rank}-of-{world}.pt")
        if path.is_file():
            self._ref = torch.load(path, weights_only=True)
            return
        for batch in batches:
            with self.reference():
                ids = batch["input_ids"]
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                self._ref[_key(ids)] = self._logps(batch)[0].float().cpu()
        buffer = io.BytesIO()
        torch.save(self._ref, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _reference(self, batch: dict[str, Any]) -> torch.Tensor:
        """(2P,) reference log-probabilities: precomputed, or the model with its adapter off (or the init adapter)."""
        known = self._ref.get(_key(batch["input_ids"])) if self._ref else None
        if known is not None:
            return known.to(batch["input_ids"].device)
        with self.reference():
            return self._logps(batch)[0]

    def _print_summary(self, pairs: list[tuple[Any, ...]], noun: str = "pairs") -> None:
        lengths = [len(t) for pair in pairs for t in pair]
        truncated = sum(t.truncated for pair in pairs for t in pair)
        self.summary = self._summary_record(len(pairs), lengths, truncated)
        self.console.print(f"[bold]data[/bold] {len(pairs)} {noun} ({self.dataset.format}), sequence length "
                           f"{min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
                           f"{truncated} sequences truncated at {self.cfg.seq_len}")  # fmt: skip

    def _summary_record(self, pairs: int, lengths: list[int], truncated: int) -> Any:
        class _Summary:
            def to_dict(self) -> dict[str, Any]:
                return {"pairs": pairs, "min_length": min(lengths), "max_length": max(lengths), "truncated": truncated}

        return _Summary()

    def units(self, batch: dict[str, Any]) -> int:
        """Pairs (KTO: examples) in the micro-batch."""
        return int(batch["units"])

    def _logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each answer's summed log-probability of its label tokens and their count, both (N,).

        An answer is a row, or a `slot` of a row that holds a whole pair (`UnitStream.share_prefix`). Its
        log-probability is minus its summed next-token cross-entropy, computed in chunks of `loss_chunk` label tokens
        (`token_loss_sum`): full-vocabulary logits never exist for a whole row.
        """
        hidden = self.model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                            prefix_ids=batch.get("prefix_ids"), return_hidden=True)  # fmt: skip  # (B, T, D)
        labels = batch["labels"]
        slots = batch.get("slots") or [(b, 0, labels.shape[1], None) for b in range(labels.shape[0])]
        logps, counts = [], []
        for b, start, end, first in slots:
            pred = torch.arange(start - 1, end - 1, device=labels.device)  # the position predicting each token
            targets = labels[b, start:end]
            if first is None:  # the slot's first token is predicted by nothing (a row's first token)
                pred, targets = pred[1:], targets[1:]
            else:
                pred[0] = first  # the last token of the shared prompt
            keep = targets != IGNORE_INDEX
            logps.append(-token_loss_sum(self.model, hidden[b, pred[keep]], targets[keep], self.cfg.loss_chunk))
            counts.append(int(keep.sum()))
        return torch.stack(logps), torch.tensor(counts, device=labels.device)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed pair losses of one micro-batch (chosen rows first, then rejected) and the number of pairs."""
        reference = self._reference(batch) if self.method in pl.NEEDS_REFERENCE else None  # before the policy pass
        logps, counts = self._logps(batch)
        if not batch["units"]:  # this process's share of a short last batch is empty
            return logps.sum() * 0, 0
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


class KTORecipe(PreferenceRecipe):
    """KTO on unpaired feedback (prompt, completion, label): `nomoat train --method kto`.

    Each batch holds its examples, then for each one a KL row: its prompt with the previous example's completion
    (TRL's cycling of completions within a batch). The KL rows' policy-minus-reference log-ratio, averaged over the
    batch (all processes) and clamped at 0, is the reference point of the loss; the reference is the adapter off
    (or the init adapter). Losses of desirable and undesirable completions are weighted by `desirable_weight` and
    `undesirable_weight`; the loop normalises by examples.
    """

    def check_dataset(self) -> None:
        """Unpaired feedback only."""
        if any(not isinstance(e, Feedback) for e in self.dataset.examples):
            raise DataError(f"{self.dataset.format} data has no prompt/completion/label records: --method kto needs "
                            "unpaired feedback (label true or false)")  # fmt: skip

    def _setup_data(self) -> None:
        self.load_init_adapter()
        kept, tokenized = [], []
        for e in self.dataset.examples:
            tok = self._tokenize(e.prompt, e.completion, e)
            if tok.num_label_tokens:
                row = Row.single(tok)
                row.desirable = e.desirable  # collated into the batch's `desirable` by UnitStream
                kept.append((e, row))
                tokenized.append(tok)
        if len(kept) < 2:
            raise DataError("KTO needs at least 2 examples with trainable tokens (the KL estimate pairs each prompt "
                            "with another example's completion): check the data and --seq-len")  # fmt: skip
        self._print_summary([(t,) for t in tokenized], "examples")
        batches = []
        for batch in self._batches_of(kept):
            shifted = batch[-1:] + batch[:-1]  # example i's KL row: its prompt, example i-1's completion
            batches.append([(row, Row.single(self._tokenize(e.prompt, other.completion, e)))
                            for (e, row), (other, _) in zip(batch, shifted)])  # fmt: skip
        self._make_stream(batches)

    def _tokenize(self, prompt: list[dict[str, str]], completion: list[dict[str, str]], example: Feedback) -> Any:
        pair = Preference(prompt, completion, completion, example.source)
        return tokenize_preference(pair, self.tokenizer, self.cfg.seq_len)[0]

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed KTO losses of the micro-batch's examples (its KL rows set the reference point)."""
        n = int(batch["units"])
        reference = self._reference(batch)  # (2n,): examples, then KL rows; before the policy pass
        half = {k: batch[k][:n] for k in ("input_ids", "position_ids", "segment_ids", "labels")}
        kl_rows = {k: batch[k][n:] for k in half}
        with torch.no_grad():
            kl_logps = self._logps(kl_rows)[0] if n else torch.zeros(0, device=reference.device)
        kl_sum, count = (kl_logps - reference[n:]).sum().item(), n
        if self.dist.enabled:  # TRL gathers the KL estimate over processes
            kl_sum, count = self.dist.sum_numbers([kl_sum, count], "the KL estimate")
        kl = torch.tensor(max(kl_sum / max(count, 1), 0.0), device=reference.device)
        if not n:
            return self._logps(batch)[0].sum() * 0, 0
        logps, _ = self._logps(half)
        losses, rewards = pl.kto_loss(logps, reference[:n], batch["desirable"], kl, self.beta,
                                      self.cfg.desirable_weight, self.cfg.undesirable_weight)  # fmt: skip
        good = batch["desirable"]
        acc = self._acc
        acc["kl"], acc["kl_n"] = acc.get("kl", 0.0) + kl.item(), acc.get("kl_n", 0) + 1
        for key, mask in (("chosen", good), ("rejected", ~good)):
            acc[key] = acc.get(key, 0.0) + rewards[mask].sum().item()
            acc[f"{key}_n"] = acc.get(f"{key}_n", 0) + int(mask.sum())
        return losses.sum(), n

    def step_metrics(self, micro: list[dict[str, Any]], units: int) -> dict[str, Any]:
        """Examples of the step, mean rewards of desirable and undesirable completions, their margin, the KL."""
        acc, self._acc = self._acc, {}
        chosen = acc.get("chosen", 0.0) / max(acc.get("chosen_n", 0), 1)
        rejected = acc.get("rejected", 0.0) / max(acc.get("rejected_n", 0), 1)
        return {"examples": units, "rewards_chosen": round(chosen, 6), "rewards_rejected": round(rejected, 6),
                "margin": round(chosen - rejected, 6), "kl": round(acc.get("kl", 0.0) / max(acc.get("kl_n", 0), 1), 6),
                "epoch": round(self.stream.epoch + self.stream.index / len(self.stream), 4)}  # fmt: skip


class UnitStream(BatchStream):
    """A `BatchStream` of batches of units (a pair: chosen and rejected rows; KTO: an example and its KL row).

    A batch's rows are every unit's first row, then every unit's second row (one forward pass for both). In a
    data-parallel run each process takes whole units (its contiguous share of the global batch), so a pair is never
    split across processes. Rows may carry `desirable` (KTO's labels, collated as a bool tensor).
    """

    share_prefix = False  # one row per pair, its prompt computed once (`collate_units`)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        batches = self.batches(self.epoch)
        while self.index < len(batches):
            units = self.share(batches[self.index])
            self.index += 1  # counted before yielding, as BatchStream does
            yield self.collate_units(units)
        self.epoch, self.index = self.epoch + 1, 0

    def share(self, units: list[tuple[Row, Row]]) -> list[tuple[Row, Row]]:
        """This process's units of a global batch (possibly none)."""
        rank, world = self.shard
        return units[len(units) * rank // world : len(units) * (rank + 1) // world]

    def collate_units(self, units: list[tuple[Row, Row]]) -> dict[str, Any]:
        """Collated rows (first rows, then second rows), `units` and, for KTO, `desirable` (U,).

        With `share_prefix`, each unit is one row instead (`_pair_row`: the prompt once, then both answers), and
        `slots` says where each answer lies: first answers, then second answers, as the rows would be.
        """
        pad = 0 if self.pad_id is None else self.pad_id
        if self.share_prefix and units:
            packed = [_pair_row(first, second) for first, second in units]
            batch = collate([row for row, _, _ in packed], self.pad_id, self.pad_to)
            batch["prefix_ids"] = torch.tensor([parent + [0] * (batch["input_ids"].shape[1] - len(parent))
                                                for _, parent, _ in packed], dtype=torch.long)  # fmt: skip
            batch["slots"] = [(b, *slots[side]) for side in (0, 1) for b, (_, _, slots) in enumerate(packed)]
        else:
            rows = [u[0] for u in units] + [u[1] for u in units] or [Row([pad], [IGNORE_INDEX], [0], [1])] * 2
            batch = collate(rows, self.pad_id, self.pad_to)
        batch["units"] = len(units)
        if units and hasattr(units[0][0], "desirable"):
            batch["desirable"] = torch.tensor([u[0].desirable for u in units], dtype=torch.bool)
        return batch


Slot = tuple[int, int, "int | None"]  # an answer's (start, end) in its row, and the position predicting its first token


def _pair_row(first: Row, second: Row) -> tuple[Row, list[int], tuple[Slot, Slot]]:
    """One row holding a unit's two single-example rows, their shared unlabelled prefix (the prompt) once.

    The row is `first`, then `second` without the prefix; `second`'s tokens keep their positions and attend to the
    prefix (its `prefix_ids`, returned second). Attention in each is what it would be in its own row, so the answers'
    log-probabilities are the same. Returns the row, its prefix ids and each answer's `Slot`.
    """
    a, b = first.input_ids, second.input_ids
    p, limit = 0, min(len(a), len(b)) - 1  # each answer keeps at least one token of its own
    while p < limit and a[p] == b[p] and first.labels[p] == IGNORE_INDEX and second.labels[p] == IGNORE_INDEX:
        p += 1
    rest = len(b) - p
    row = Row(a + b[p:], first.labels + second.labels[p:], first.position_ids + second.position_ids[p:],
              [1] * p + [2] * (len(a) - p) + [3] * rest if p else [1] * len(a) + [2] * rest,
              first.sources + second.sources)  # fmt: skip
    parent = [0] * p + [1] * (len(a) - p + rest) if p else [0] * len(row.input_ids)
    return row, parent, ((0, len(a), None), (len(a), len(row.input_ids), p - 1 if p else None))


def _key(input_ids: torch.Tensor) -> bytes:
    """A batch's identity: its token ids (the stream always collates a batch the same way)."""
    return input_ids.cpu().numpy().tobytes() + bytes(str(tuple(input_ids.shape)), "ascii")


__all__ = ["DEFAULT_BETA", "InitAdapterMixin", "KTORecipe", "PreferenceRecipe", "UnitStream", "reference_weights"]
