"""Hand-off to vLLM: the `vllm serve` command that serves a base model with nomoat's adapters as LoRA modules.

vLLM reads PEFT adapter folders, which is what nomoat writes, so the hand-off is a command line: `--enable-lora`,
`--lora-modules NAME=PATH ...`, `--max-lora-rank` (the largest adapter rank, rounded up to a rank vLLM allows) and
`--max-loras` (adapters batched together). What vLLM cannot serve is refused with the reason and the way round it:
DoRA, trained full modules (`modules_to_save`), a rank above vLLM's largest, and an adapter scaled by a weight or
stacked with others (vLLM applies one unscaled LoRA per request); the alternatives are `nomoat merge` (one adapter)
and `nomoat export` (a merged model folder that vLLM serves as a plain model).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nomoat.lora.peft_format import CONFIG_FILE
from nomoat.util.errors import InputError, NomoatError
from nomoat.util.files import read_json

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class VLLMUnsupportedError(NomoatError):
    """An adapter vLLM cannot serve as it is; the message says why and the hint what to do instead."""


@dataclass
class ServedAdapter:
    """One adapter to serve, as requests will name it.

    Attributes:
        name: The name clients put in the `model` field of a request.
        parts: `(folder, weight)` pairs: one with weight 1 is servable; several (a stack) or a weight is not.
    """

    name: str
    parts: list[tuple[Path, float]]


@dataclass
class VLLMCommand:
    """The `vllm serve` command for a base model and its adapters.

    Attributes:
        base: The base model (folder or Hub id), as vLLM is given it.
        modules: (name, adapter folder, rank) of each LoRA module, in order.
        max_lora_rank: `--max-lora-rank`: the largest rank, rounded up to one vLLM allows.
        max_loras: `--max-loras`: adapters that can be active in one batch.
        notes: Remarks printed above the command (an adapter trained on another base, say).
    """

    base: str
    modules: list[tuple[str, Path, int]]
    max_lora_rank: int
    max_loras: int
    notes: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        """The arguments after `vllm serve` (what vLLM's own parser reads)."""
        out = [self.base]
        if self.modules:
            out += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path, _ in self.modules),
                    "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]  # fmt: skip
        return out

    def argv(self) -> list[str]:
        """The whole command: `vllm serve BASE ...`."""
        return ["vllm", "serve", *self.args()]

    def script(self) -> str:
        """A POSIX shell script: the LoRA module list and notes as comments, then the command."""
        lines = ["#!/bin/sh", "# Serve the base model with its LoRA adapters on vLLM (OpenAI-compatible API).",
                 "# A request picks an adapter by putting its name in the `model` field."]  # fmt: skip
        lines += [f"#   {name}: rank {r}, {path}" for name, path, r in self.modules]
        lines += [f"# note: {n}" for n in self.notes]
        args = [shlex.quote(a) for a in self.args()]
        body, i = [f"vllm serve {args[0]}"], 1
        while i < len(args):  # one option (with its values) per line
            j = i + 1
            while j < len(args) and not args[j].startswith("--"):
                j += 1
            body.append(" ".join(args[i:j]))
            i = j
        lines.append(" \\\n  ".join(body))
        return "\n".join(lines) + "\n"


def vllm_rank(r: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that covers rank `r`.

    Raises:
        VLLMUnsupportedError: `r` is above vLLM's largest (512).
    """
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise VLLMUnsupportedError(f"rank {r} is above vLLM's largest LoRA rank ({VLLM_LORA_RANKS[-1]})")


def _adapter_rank(config: dict) -> int:
    ranks = [int(config.get("r", 8))] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def _problems(adapter: ServedAdapter) -> list[tuple[str, str]]:
    """(reason, kind) of each thing vLLM cannot serve in `adapter`; kind picks the alternative."""
    out: list[tuple[str, str]] = []
    if len(adapter.parts) > 1:
        out.append((f"{adapter.name}: a stack of {len(adapter.parts)} adapters (vLLM applies one per request)",
                    "stack"))  # fmt: skip
    elif adapter.parts[0][1] != 1.0:
        out.append((f"{adapter.name}: weight {adapter.parts[0][1]:g} (vLLM applies an adapter unscaled)", "stack"))
    for folder, _ in adapter.parts:
        config = read_json(folder / CONFIG_FILE, error=InputError)
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            out.append((f"{folder}: peft_type {config.get('peft_type')} is not LoRA", "merge"))
        if config.get("use_dora"):
            out.append((f"{folder}: DoRA (vLLM serves plain LoRA only)", "merge"))
        if config.get("modules_to_save"):
            mods = ", ".join(config["modules_to_save"])
            out.append((f"{folder}: fully trained modules ({mods}; vLLM serves LoRA matrices only)", "merge"))
        r = _adapter_rank(config)
        if r > VLLM_LORA_RANKS[-1]:
            out.append((f"{folder}: rank {r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})", "rank"))
    return out


def _hint(kinds: set[str], base: str, refused: Sequence[ServedAdapter]) -> str:
    hints = []
    if "stack" in kinds:
        hints.append("combine a stack or a weighted adapter into one with `nomoat merge ADAPTER:WEIGHT ... --name NEW` "
                     "and deploy NEW")  # fmt: skip
    if "rank" in kinds:
        hints.append("reduce the rank with `nomoat merge ADAPTER --method svd --rank 512 --name NEW`")
    merged = []
    for a in refused:
        specs = " ".join(f"--adapter {shlex.quote(str(f))}:{w:g}" for f, w in a.parts)
        merged.append(f"`nomoat export {shlex.quote(base)} {specs} --out MERGED`")
    hints.append(f"or merge into the base and serve the folder as a plain model: {' and '.join(merged)}, then "
                 "`vllm serve MERGED`")  # fmt: skip
    return "; ".join(hints)


def vllm_command(base: str | Path, adapters: Sequence[ServedAdapter], max_loras: int | None = None) -> VLLMCommand:
    """The `vllm serve` command for `base` with `adapters`, or the refusal saying what vLLM cannot serve.

    Args:
        base: The base model folder (made absolute) or a Hub id.
        adapters: The adapters, each under the name requests will use.
        max_loras: Adapters active in one batch (default: all of them).

    Returns:
        The command.

    Raises:
        VLLMUnsupportedError: An adapter is DoRA, has fully trained modules, a rank above 512, a weight, or is a
            stack; the message lists every such problem, the hint the alternatives.
        InputError: Two adapters share a name, or an adapter folder cannot be read.
    """
    base_s = str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else str(base)
    names = [a.name for a in adapters]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"two adapters are named {dupes[0]!r}", hint="name them apart: NAME=ADAPTER")
    found = {a.name: _problems(a) for a in adapters}
    problems = [p for a in adapters for p in found[a.name]]
    if problems:
        refused = [a for a in adapters if found[a.name]]
        raise VLLMUnsupportedError("vLLM cannot serve " + "; ".join(reason for reason, _ in problems),
                                   hint=_hint({kind for _, kind in problems}, base_s, refused))  # fmt: skip
    modules, notes = [], []
    for a in adapters:
        folder = a.parts[0][0].expanduser().resolve()
        config = read_json(folder / CONFIG_FILE, error=InputError)
        modules.append((a.name, folder, _adapter_rank(config)))
        trained_on = config.get("base_model_name_or_path")
        if trained_on and Path(str(trained_on)).expanduser().exists() and base_s != str(
                Path(str(trained_on)).expanduser().resolve()):  # fmt: skip
            notes.append(f"{a.name} was trained on {trained_on}, not on {base_s}")
    max_rank = vllm_rank(max((r for _, _, r in modules), default=1))
    k = max_loras if max_loras is not None else max(1, len(modules))
    return VLLMCommand(base=base_s, modules=modules, max_lora_rank=max_rank, max_loras=k, notes=notes)


__all__ = ["VLLM_LORA_RANKS", "ServedAdapter", "VLLMCommand", "VLLMUnsupportedError", "vllm_command", "vllm_rank"]
