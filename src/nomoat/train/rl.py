"""RL tuning from rewards (`nomoat train --method grpo|rloo --reward ...`): a recipe on the shared training loop.

It owns what is particular to learning from sampled completions: prompt-only data (the record's other columns go to
the reward functions), rollouts (for each prompt `num_generations` completions sampled through nomoat's `Engine`,
whose decode model shares the LoRA layers being trained, so the live adapter samples: an optimizer step writes the
adapter in place, and the engine repacks what changed when it admits the next requests), rewards
(`nomoat.train.rewards`, weighted), advantages (GRPO: group-normalised; RLOO: leave-one-out baseline), the clipped
policy-gradient losses with TRL's normalisations and KL estimates, the per-step metrics, and `rollouts.jsonl` in the
run folder (every sampled completion with its rewards, for reading).

The loss functions are pure (`grpo_loss`, `rloo_loss`, `grpo_advantages`, `rloo_advantages`) and follow TRL 1.16's
`GRPOTrainer` / `RLOOTrainer`. One policy update per generation batch: the old policy is the current one, so the
ratio is 1 with the gradient of the log-probability (as TRL with `num_iterations=1`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nomoat.data import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, BatchStream, DataError, Row, collate
from nomoat.data.formats import Prompt
from nomoat.models.segments import share_prefixes
from nomoat.train import rewards as rw
from nomoat.train.logps import label_logps
from nomoat.train.preference import InitAdapterMixin
from nomoat.train.sft import SFTRecipe
from nomoat.util.errors import UsageError

DEFAULT_BETA = {"grpo": 0.0, "rloo": 0.05}  # TRL 1.16's GRPOConfig and RLOOConfig defaults

# What samples the rollouts: (prompt ids, seed) per request, temperature, max new tokens -> per request the
# completion's token ids (a stop token dropped), its text and the finish reason ("stop" or "length").
Sampler = Callable[[list[tuple[list[int], int]], float, int], list[tuple[list[int], str, str]]]
# Makes the sampler over the trained model (with its live LoRA layers): (model, tokenizer, rows, max_seq_len).
SamplerFactory = Callable[[torch.nn.Module, Any, int, int], Sampler]


# ---- pure functions ---------------------------------------------------------------------------------------------


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the label tokens and their mask.

    Args:
        logits: (N, T, V) next-token logits.
        labels: (N, T) token ids, `IGNORE_INDEX` outside the completions.

    Returns:
        `(logps, mask)`, both (N, T-1): log p(token t+1) and whether it is a completion token.
    """
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    return logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask, mask


def grpo_advantages(rewards: torch.Tensor, group: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's std + 1e-4 when `scale`.

    Args:
        rewards: (N,) total rewards, groups of `group` consecutive completions of one prompt.
        group: Completions per prompt.
        scale: Divide by the group's standard deviation (TRL's `scale_rewards="group"`).
    """
    grouped = rewards.view(-1, group)  # (P, G)
    mean = grouped.mean(1, keepdim=True)
    adv = grouped - mean
    if scale:
        adv = adv / (grouped.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def completion_units(cfg: Any, mask: torch.Tensor) -> int:
    """The units a batch of completions adds to the step's normaliser.

    Completions (RLOO, GRPO's `grpo`), completions x `max_new_tokens` (`dr_grpo`) or completion tokens (`dapo`);
    `mask` is (N, T) over completion tokens.
    """
    if cfg.method == "rloo" or cfg.loss_type == "grpo":
        return int(mask.shape[0])
    return int(mask.shape[0]) * cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else int(mask.sum())


def rloo_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO's advantages: each reward minus the mean of the other completions of its prompt (N,)."""
    grouped = rewards.view(-1, group)  # (P, G)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).reshape(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon: float,
    loss_type: str,
    max_new_tokens: int,
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """GRPO's clipped objective with the k3 KL estimate, summed for the loop to normalise.

    Args:
        logps: (N, T) per-token log-probabilities of the policy (with grad).
        old_logps: (N, T) those of the policy that sampled (detached).
        ref_logps: (N, T) those of the reference, or None when `beta` is 0.
        advantages: (N,) one per completion.
        mask: (N, T) completion tokens.
        beta: KL weight.
        epsilon: Clipping range of the ratio.
        loss_type: `grpo` (each completion's token mean, then over completions), `dr_grpo` (token sum over
            completions x `max_new_tokens`) or `dapo` (token sum over the step's completion tokens).
        max_new_tokens: The completion length budget (Dr. GRPO's constant).

    Returns:
        `(loss_sum, units, stats)`: the sum the loop divides by the step's units, this batch's units, and the
        detached per-token KL and clipped flags.
    """
    m = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv)
    kl = None
    if beta != 0.0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    stats = {"kl": (kl if kl is not None else torch.zeros_like(logps)).detach(), "clipped": clipped}
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(), logps.shape[0], stats
    if loss_type == "dr_grpo":
        return (per_token * m).sum(), logps.shape[0] * max_new_tokens, stats
    return (per_token * m).sum(), int(mask.sum()), stats


def rloo_loss(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """RLOO's clipped objective on sequence log-probabilities (the KL is in the reward), summed over completions.

    Args:
        logps: (N, T) per-token log-probabilities of the policy (with grad).
        old_logps: (N, T) those of the policy that sampled (detached).
        advantages: (N,) leave-one-out advantages.
        mask: (N, T) completion tokens.
        epsilon: Clipping range of the ratio.

    Returns:
        `(loss_sum, completions, stats)`.
    """
    m = mask.to(logps.dtype)
    ratio = torch.exp((logps * m).sum(-1) - (old_logps * m).sum(-1))  # (N,)
    losses = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return losses.sum(), logps.shape[0], {"clipped": clipped}


# ---- the recipe -------------------------------------------------------------------------------------------------


class PromptStream(BatchStream):
    """A `BatchStream` of prompt indices: each batch is `{"prompts": [index, ...]}`, this process's share."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        batches = self.batches(self.epoch)
        while self.index < len(batches):
            rank, world = self.shard
            batch = batches[self.index]
            self.index += 1
            yield {"prompts": batch[len(batch) * rank // world : len(batch) * (rank + 1) // world]}
        self.epoch, self.index = self.epoch + 1, 0


class RLRecipe(InitAdapterMixin, SFTRecipe):
    """GRPO or RLOO with LoRA: prompts in, sampled completions scored by reward functions, the policy updated.

    `batch_size` counts prompts per micro-batch; each brings `num_generations` completions. The rollouts come from
    `sampler` (training sits below generation in the layers, so the caller hands in the engine: `nomoat train` passes
    `nomoat.cli.train.engine_sampler`).

    Example:
        >>> RLRecipe(TrainConfig(model="m", data=["q.jsonl"], method="grpo", reward=["numeric_match"]),
        ...          sampler=engine_sampler).run()
    """

    def __init__(self, config: Any, console: Any = None, progress: bool = True,
                 sampler: SamplerFactory | None = None) -> None:  # fmt: skip
        super().__init__(config, console, progress)
        if sampler is None:
            raise UsageError("RL tuning needs a sampler for its rollouts (e.g. nomoat.cli.train.engine_sampler)")
        self.sampler_factory = sampler

    @property
    def beta(self) -> float:
        """The KL weight (`--beta`, else TRL's default for the method)."""
        return self.cfg.beta if self.cfg.beta is not None else DEFAULT_BETA[self.cfg.method]

    def build(self) -> None:
        """Prompt-only data by default, and reward functions resolved before anything loads."""
        if not self.cfg.reward:
            raise UsageError(f"--method {self.cfg.method} needs a reward", hint="pass --reward NAME or MODULE:FUNC")
        if self.cfg.reward_weights and len(self.cfg.reward_weights) != len(self.cfg.reward):
            raise UsageError(f"{len(self.cfg.reward_weights)} reward weights for {len(self.cfg.reward)} rewards")
        self.rewards = [rw.load_reward(spec) for spec in self.cfg.reward]
        if self.cfg.format == "auto":
            self.cfg.format = "prompt"
        super().build()

    def check_dataset(self) -> None:
        """Prompts only."""
        if any(not isinstance(e, Prompt) for e in self.dataset.examples):
            raise DataError(f"--method {self.cfg.method} needs prompt records (prompt or messages, with any other "
                            "columns for the rewards)")  # fmt: skip

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.load_init_adapter()
        template = None if self.tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE
        self.prompt_ids = [list(self.tokenizer.apply_chat_template(e.prompt, add_generation_prompt=True,
                                                                    tokenize=True, chat_template=template))
                           for e in self.dataset.examples]  # fmt: skip
        too_long = [str(e.source) for e, ids in zip(self.dataset.examples, self.prompt_ids) if len(ids) >= cfg.seq_len]
        if too_long:
            raise DataError([f"{s}: the prompt does not fit in --seq-len {cfg.seq_len}" for s in too_long[:10]])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        lengths = [len(ids) for ids in self.prompt_ids]
        self.console.print(f"[bold]data[/bold] {len(lengths)} prompts, {min(lengths)}-{max(lengths)} tokens; "
                           f"{cfg.num_generations} completions of up to {cfg.max_new_tokens} tokens each")  # fmt: skip
        self.summary = _Summary({"prompts": len(lengths), "min_length": min(lengths), "max_length": max(lengths)})
        self.stream = PromptStream(list(range(len(self.prompt_ids))), cfg.batch_size * self.dist.world_size,
                                   seed=cfg.seed, shard=self.dist.shard)  # fmt: skip
        per_epoch = max(1, len(self.stream) // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        rows = cfg.batch_size * cfg.num_generations
        self.sampler = self.sampler_factory(self.model, self.tokenizer, rows, cfg.seq_len)
        self.model.train()  # an engine sets eval mode; its decode twin keeps its own
        self._acc: dict[str, Any] = {}

    # ---- rollouts -------------------------------------------------------------------------------------------------

    def sample(self, prompts: list[int]) -> list[tuple[list[int], str, str]]:
        """`num_generations` completions of each prompt (by index) from the live adapter, groups in prompt order.

        Each request's seed comes from the run's seed, the step and its place, so a resumed run samples the same.
        """
        cfg = self.cfg
        requests = [(self.prompt_ids[i], hash((cfg.seed, self.step, i, g)) % (2**31))
                    for i in prompts for g in range(cfg.num_generations)]  # fmt: skip
        self.model.eval()  # no adapter dropout while sampling
        try:
            return self.sampler(requests, cfg.temperature, cfg.max_new_tokens)
        finally:
            self.model.train()

    def prepare_step(self, micro: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sample, score and batch the rollouts of every micro-batch of the step (no grad).

        With `filter_groups`, the groups whose advantages are all 0 are left out, and up to `refill_rounds` rollout
        batches of the next prompts per micro-batch refill the step with groups that teach (DAPO's dynamic
        sampling); a step where no group teaches keeps its batches as they are (no gradient, but a valid step).
        """
        batches = [self._rollout_batch(m["prompts"]) for m in micro]
        if not self.cfg.filter_groups:
            return batches
        G = self.cfg.num_generations
        wanted = sampled = sum(len(b["advantages"]) // G for b in batches if not b.get("empty"))
        kept, have = [], 0
        for b in batches:  # sharded ranks run one forward pass per micro-batch alike: a flat one stays
            teaching = self._teaching_groups(b)
            have += 0 if teaching is None else len(teaching["advantages"]) // G
            kept += [teaching] if teaching is not None else [b] if self.sharded else []
        for _ in range(0 if self.sharded else self.cfg.refill_rounds * len(micro)):
            if have >= wanted:
                break
            extra = self._rollout_batch(self._next_batch()["prompts"])
            sampled += 0 if extra.get("empty") else len(extra["advantages"]) // G
            teaching = self._teaching_groups(extra, limit=wanted - have)
            if teaching is not None:
                kept.append(teaching)
                have += len(teaching["advantages"]) // G
        self._acc["flat_groups"] = self._acc.get("flat_groups", 0) + sampled - have
        self._acc["groups"] = self._acc.get("groups", 0) + sampled
        return kept or batches

    def _teaching_groups(self, batch: dict[str, Any], limit: int | None = None) -> dict[str, Any] | None:
        """`batch` without its groups whose advantages are all 0, at most `limit` groups; None when none is left."""
        if batch.get("empty"):
            return None
        G = self.cfg.num_generations
        teaching = batch["advantages"].view(-1, G).abs().amax(1) > 1e-6  # (P,)
        groups = teaching.nonzero().flatten()[:limit]
        if len(groups) == 0:
            return None
        rows = (groups.unsqueeze(1) * G + torch.arange(G)).flatten()  # (P' x G,)
        out = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = out["labels"][:, 1:] != IGNORE_INDEX  # (N', T-1)
        out["num_label_tokens"] = int(mask.sum())
        out["units"] = completion_units(self.cfg, mask)
        return out

    def _rollout_batch(self, prompts: list[int]) -> dict[str, Any]:
        cfg, G = self.cfg, self.cfg.num_generations
        if not prompts:  # this process's share of a short last batch is empty
            batch = collate([Row([self.pad_id], [IGNORE_INDEX], [0], [1])], self.pad_id)
            return {**batch, "advantages": torch.zeros(1), "units": 0, "empty": True}
        samples = self.sample(prompts)
        eos = self.tokenizer.eos_token_ids[:1]
        rows, texts = [], []
        for n, (token_ids, text, reason) in enumerate(samples):
            prompt = self.prompt_ids[prompts[n // G]]
            completion = list(token_ids) + (eos if reason == "stop" else [])  # the stop token is learnt too
            ids = (prompt + completion)[: cfg.seq_len]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[: cfg.seq_len]
            rows.append(Row(ids, labels, list(range(len(ids))), [1] * len(ids)))
            texts.append(text)
        batch = collate(rows, self.pad_id)
        examples = [self.dataset.examples[i] for i in prompts for _ in range(G)]
        columns = {k: [e.columns.get(k) for e in examples] for k in examples[0].columns}
        prompt_values = [e.prompt[-1]["content"] if len(e.prompt) == 1 else e.prompt for e in examples]
        per_fn = torch.tensor(rw.score(self.rewards, texts, prompt_values, columns), dtype=torch.float32)  # (F, N)
        weights = torch.tensor(cfg.reward_weights or [1.0] * len(self.rewards)).unsqueeze(1)  # (F, 1)
        total = (per_fn * weights).nansum(0)  # (N,)
        dev = self.device
        b = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        old = ref = None  # one update per generation batch: the sampling policy is the one `loss` runs
        with torch.no_grad(), self.autocast_context():
            if self.beta != 0.0:
                with self.reference():
                    ref = self._token_logps(b)[0]
                if cfg.method == "rloo":  # RLOO's reward penalty needs the sampling policy's log-probabilities now
                    old = self._token_logps(b)[0]
        mask = b["labels"][:, 1:] != IGNORE_INDEX
        shaped = total.clone()
        if cfg.method == "rloo":
            if old is not None and ref is not None:  # RLOO's KL is a reward penalty: beta x the sequence's log-ratio
                shaped = shaped - self.beta * ((old - ref) * mask).sum(-1).cpu()
            advantages = rloo_advantages(shaped, G)
        else:
            advantages = grpo_advantages(total, G)
        self._record(prompts, examples, texts, per_fn, total, mask)
        units = len(rows) if cfg.method == "rloo" or cfg.loss_type == "grpo" else (
            len(rows) * cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else int(mask.sum()))  # fmt: skip
        return {**batch, "advantages": advantages, "old_logps": None if old is None else old.cpu(), "units": units,
                "ref_logps": None if ref is None else ref.cpu()}  # fmt: skip

    def _token_logps(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, T-1) log-probabilities of the label tokens at the sampling temperature, and their mask.

        Those of `token_logps(self._logits(batch), labels)`, with the output head run only on completion tokens, a
        chunk of `loss_chunk` at a time (`nomoat.train.logps`): full-vocabulary logits never exist for a whole row.
        The completions of one prompt run as one packed row with the prompt once (`share_prefixes`): each attends to
        the prompt's keys and values as in its own row, and the prompt's gradients sum over its completions.
        """
        labels = batch["labels"]  # (N, T)
        if batch.get("empty") or self.cfg.num_generations < 2:
            hidden = self.model(batch["input_ids"], position_ids=batch["position_ids"],
                                segment_ids=batch["segment_ids"], return_hidden=True)  # fmt: skip  # (N, T, D)
            return label_logps(self.model, hidden, labels, self.cfg.temperature, self.cfg.loss_chunk)
        lengths = (batch["segment_ids"] != 0).sum(1)  # (N,)
        labelled = labels != IGNORE_INDEX  # (N, T)
        prompts = torch.where(labelled.any(1), labelled.int().argmax(1), lengths)  # (N,) tokens before the first label
        rows = share_prefixes(batch["input_ids"], batch["position_ids"], lengths.tolist(), prompts.tolist())
        hidden = self.model(rows.input_ids, position_ids=rows.position_ids, segment_ids=rows.segment_ids,
                            prefix_ids=rows.prefix_ids, return_hidden=True)  # fmt: skip  # (1, S, D)
        return label_logps(self.model, hidden, labels, self.cfg.temperature, self.cfg.loss_chunk, index=rows.index)

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """(N, T, V) logits divided by the sampling temperature.

        Their log-probabilities are those of the distribution the rollouts were sampled from, as in TRL's trainers
        (for the policy, the old policy and the reference alike).
        """
        logits = self.model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
        t = self.cfg.temperature
        return logits / t if t > 0 and t != 1.0 else logits

    def _record(self, prompts: list[int], examples: list[Prompt], texts: list[str], per_fn: torch.Tensor,
                total: torch.Tensor, mask: torch.Tensor) -> None:  # fmt: skip
        """Collect the step's reward metrics and write its completions to `rollouts.jsonl` (rank 0)."""
        acc = self._acc
        acc.setdefault("per_fn", []).append(per_fn)
        acc.setdefault("total", []).append(total)
        acc.setdefault("lengths", []).append(mask.sum(-1).float().cpu())
        if self.dist.is_main:
            names = [name for name, _ in self.rewards]
            with open(self.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
                for n, (e, text) in enumerate(zip(examples, texts)):
                    f.write(json.dumps({"step": self.step + 1, "source": str(e.source), "completion": text,
                                        "rewards": dict(zip(names, per_fn[:, n].tolist())),
                                        "reward": float(total[n])}) + "\n")  # fmt: skip

    # ---- the loss -------------------------------------------------------------------------------------------------

    def units(self, batch: dict[str, Any]) -> int:
        """Completions (GRPO's `grpo`, RLOO), completion tokens (`dapo`) or completions x max_new_tokens."""
        return int(batch["units"])

    def tokens(self, batch: dict[str, Any]) -> int:
        """Prompt and completion tokens of the micro-batch."""
        return int((batch["segment_ids"] != 0).sum())

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """The summed policy-gradient loss of one micro-batch of rollouts."""
        logps, mask = self._token_logps(batch)
        if batch.get("empty"):
            return logps.sum() * 0, 0
        cfg = self.cfg
        # The policy that sampled is this one (no update in between): its log-probabilities are these, detached, and
        # the ratio is 1 with the log-probability's gradient, as TRL computes it with num_iterations=1.
        old = batch["old_logps"] if batch.get("old_logps") is not None else logps.detach()
        if cfg.method == "rloo":
            loss, n, stats = rloo_loss(logps, old, batch["advantages"], mask, cfg.epsilon)
        else:
            loss, n, stats = grpo_loss(logps, old, batch["ref_logps"], batch["advantages"], mask,
                                       self.beta, cfg.epsilon, cfg.loss_type, cfg.max_new_tokens)  # fmt: skip
            kl = stats["kl"]
            self._acc["kl"] = self._acc.get("kl", 0.0) + float((kl * mask).sum())
            self._acc["kl_tokens"] = self._acc.get("kl_tokens", 0) + int(mask.sum())
        self._acc["clipped"] = self._acc.get("clipped", 0) + int(stats["clipped"].sum())
        return loss, n

    def step_metrics(self, micro: list[dict[str, Any]], units: int) -> dict[str, Any]:
        """Reward mean and std (in all and per function), KL, completion length and clip fraction of the step."""
        acc, self._acc = self._acc, {}
        if "total" not in acc:
            return {}
        per_fn, total, lengths = torch.cat(acc["per_fn"], 1), torch.cat(acc["total"]), torch.cat(acc["lengths"])
        out: dict[str, Any] = {"reward": round(float(total.mean()), 6), "reward_std": round(float(total.std()), 6)}
        for (name, _), values in zip(self.rewards, per_fn):
            out[f"reward/{name}"] = round(float(values.nanmean()), 6)
            out[f"reward_std/{name}"] = round(float(values[~values.isnan()].std()) if values.numel() > 1 else 0.0, 6)
        if "kl_tokens" in acc:
            out["kl"] = round(acc["kl"] / max(acc["kl_tokens"], 1), 6)
        if "groups" in acc:
            out["flat_groups"] = round(acc["flat_groups"] / max(acc["groups"], 1), 6)
        out["completion_length"] = round(float(lengths.mean()), 2)
        seqs = len(lengths) if self.cfg.method == "rloo" else max(int(lengths.sum()), 1)
        out["clip_fraction"] = round(acc.get("clipped", 0) / seqs, 6)
        out["epoch"] = round(self.stream.epoch + self.stream.index / len(self.stream), 4)
        return out


class _Summary:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)


__all__ = ["DEFAULT_BETA", "PromptStream", "RLRecipe", "completion_units", "grpo_advantages", "grpo_loss",
           "rloo_advantages", "rloo_loss", "token_logps"]  # fmt: skip
