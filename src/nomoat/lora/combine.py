"""Combine several LoRA adapters into one new adapter, with the semantics of peft's `add_weighted_adapter`.

`combine_adapters(parents, method)` returns a `CombinedAdapter` (tensors under PEFT keys, config, provenance),
`save_combined` writes it as an adapter folder, `combine` does both (`nomoat merge`). Every method computes, module by
module, what peft 0.21 computes in the same order (equal to the last bit; SVD to float rounding):

- linear, ties, dare_linear, dare_ties, magnitude_prune mix the A and B matrices separately, with `sqrt(|w_i s_i|)`
  folded into both and its sign into A only (`s_i`: parent i's scaling). Cross terms `B_i A_j` appear, so the delta
  is NOT the weighted sum of the parents' deltas; all parents need the same rank.
- cat: `A = concat_i(w_i s_i A_i)`, `B = concat_i(B_i)`: exactly `sum_i w_i s_i B_i A_i`, of rank the sum of ranks.
- svd and the `*_svd` forms mix the full deltas `s_i B_i A_i`, then truncate to `rank` by SVD (`B = U S`, `A = Vh`).

The result has `lora_alpha = r` (scaling 1); with one parent every method is linear, and a module that only some
parents adapt is combined from those alone (both peft's rules). DARE with a given seed draws exactly peft's masks.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nomoat import __version__
from nomoat.config.lora import LoRAConfig
from nomoat.lora.peft_format import (
    CONFIG_FILE,
    PEFT_PREFIX,
    PROVENANCE_FILE,
    WEIGHTS_FILE,
    AdapterError,
    _normalise_peft_key,
    _peft_config,
    read_adapter_config,
    read_provenance,
    weights_file,
)
from nomoat.util.files import atomic_dir, read_json, sha256_file

# peft's combination types. Those mixing A and B separately need equal ranks; the *_svd ones mix full deltas.
AB_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*AB_METHODS, "cat", *SVD_METHODS)
DENSITY_METHODS = tuple(m for m in METHODS if m.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties",
                                                                          "magnitude_prune"))  # fmt: skip
RANDOM_METHODS = tuple(m for m in METHODS if m.startswith("dare_"))
SIGN_METHODS = ("total", "frequency")

# Definition order of Hugging Face decoder modules among their siblings, so that modules are visited in
# `model.named_modules()` order (the order peft draws DARE's random masks in) without loading the model.
_MODULE_RANK = {
    "model": 0, "embed_tokens": 0, "layers": 1, "norm": 2, "lm_head": 1,
    "self_attn": 0, "mlp": 1,
    "q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "qkv_proj": 4,  # Phi-3 defines o_proj before qkv_proj
    "gate_proj": 0, "gate_up_proj": 0, "up_proj": 1, "down_proj": 2,
}  # fmt: skip


class CombineError(AdapterError):
    """Adapters that cannot be combined as asked (the message says why and what to do instead)."""


@dataclass(frozen=True)
class Parent:
    """One adapter to combine.

    Attributes:
        path: The PEFT adapter folder.
        weight: Its weight in the combination (may be negative, to subtract).
        name: How the user named it (a registry name), recorded in the provenance; default the folder's name.
    """

    path: Path
    weight: float = 1.0
    name: str | None = None


@dataclass
class CombinedAdapter:
    """The result of `combine_adapters`: tensors under PEFT keys, `adapter_config.json` and provenance contents."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    provenance: dict[str, Any]
    lora_config: LoRAConfig
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Loaded:
    parent: Parent
    cfg: LoRAConfig
    raw_config: dict[str, Any]
    provenance: dict[str, Any]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r)), fp32
    sha256: str


# ---- validation -------------------------------------------------------------------------------------------------


def check_method(method: str) -> str:
    """Return `method` if it is one of `METHODS`.

    Raises:
        CombineError: an unknown method; the message suggests the closest known one.
    """
    if method in METHODS:
        return method
    close = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise CombineError(f"unknown merge method {method!r}{hint} (known: {', '.join(METHODS)})")


def _check_options(method: str, n: int, density: float | None, rank: int | None, seed: int | None,
                   majority_sign: str, svd_clamp: float | None) -> None:  # fmt: skip
    """Refuse options the method would silently ignore, and values out of range."""
    if method in DENSITY_METHODS:
        if density is None:
            raise CombineError(f"method {method!r} needs a density (the fraction of values kept, 0 < density <= 1), "
                               "e.g. --density 0.5")  # fmt: skip
    elif density is not None:
        raise CombineError(f"density has no effect with method {method!r}; it is for {', '.join(DENSITY_METHODS)}")
    if density is not None and (isinstance(density, bool) or not 0.0 < float(density) <= 1.0):
        raise CombineError(f"density must be in (0, 1] (the fraction of values kept), got {density!r}")
    if rank is not None:
        if method not in SVD_METHODS:
            raise CombineError(f"rank has no effect with method {method!r}: it is the target rank of "
                               f"{', '.join(SVD_METHODS)} (cat's rank is the sum of the parents', the others keep "
                               "the parents' rank)")  # fmt: skip
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CombineError(f"rank must be a positive integer, got {rank!r}")
    if seed is not None and method not in RANDOM_METHODS:
        raise CombineError(f"seed has no effect with method {method!r}; only {', '.join(RANDOM_METHODS)} are random")
    if majority_sign not in SIGN_METHODS:
        raise CombineError(f"majority_sign must be one of {', '.join(SIGN_METHODS)}, got {majority_sign!r}")
    if svd_clamp is not None and (method not in SVD_METHODS or not 0.0 < svd_clamp <= 1.0):
        raise CombineError(f"svd_clamp is a quantile in (0, 1] for {', '.join(SVD_METHODS)}; got {svd_clamp!r} "
                           f"with method {method!r}")  # fmt: skip
    if n < 1:
        raise CombineError("no adapters to combine: give at least one")


def _load(parent: Parent) -> _Loaded:
    """Read one parent folder; refuse what peft's combination cannot express (DoRA, modules_to_save, embeddings)."""
    path = Path(parent.path).expanduser()
    cfg = read_adapter_config(path)
    if cfg.use_dora:
        raise CombineError(f"{path}: a DoRA adapter cannot be combined (its magnitude vector does not mix); merge it "
                           "into the base instead (`nomoat export --adapter`)")  # fmt: skip
    if cfg.modules_to_save:
        raise CombineError(f"{path}: the adapter trains {cfg.modules_to_save} in full (modules_to_save); such "
                           "layers cannot be combined, only replaced. Merge it into the base instead "
                           "(`nomoat export --adapter`)")  # fmt: skip
    file = weights_file(path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            name = _normalise_peft_key(key)
            for marker in ("A", "B"):
                if name.endswith(f".lora_{marker}.weight"):
                    pairs.setdefault(name[: -len(f".lora_{marker}.weight")], {})[marker] = f.get_tensor(key).float()
                    break
            else:
                raise CombineError(f"{file}: tensor {key} is not a LoRA A/B matrix (only plain LoRA layers combine)")
    modules = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"} or ab["A"].dim() != 2 or ab["B"].shape[1:] != ab["A"].shape[:1]:
            raise CombineError(f"{file}: module {module} lacks lora_A or lora_B, or their shapes do not fit")
        if ab["A"].shape[0] != cfg.r:
            raise CombineError(f"{file}: {module} has rank {ab['A'].shape[0]}, the config says r={cfg.r}")
        modules[module] = (ab["A"], ab["B"])
    if not modules:
        raise CombineError(f"{file}: holds no LoRA tensors")
    raw = read_json(path / CONFIG_FILE, error=AdapterError)
    return _Loaded(Parent(path, float(parent.weight), parent.name or path.name), cfg, raw, read_provenance(path),
                   modules, sha256_file(file))  # fmt: skip


def _base_of(p: _Loaded) -> tuple[str | None, str | None]:
    """(base path or name, base content hash or None) of a parent."""
    base = p.provenance.get("base_model")
    sha = base.get("sha256") if isinstance(base, dict) else None
    path = base.get("path") if isinstance(base, dict) else base
    return (p.raw_config.get("base_model_name_or_path") or path), sha


def _check_same_base(parents: list[_Loaded], allow_different_bases: bool) -> list[str]:
    """Refuse parents trained on provably different bases; warn when only their recorded names differ.

    A content hash (nomoat's provenance) is proof, so a mismatch is an error. A differing `base_model_name_or_path`
    is not: the same model is often known by a hub name in one adapter and a local path in another.
    """
    warnings = []
    first_path, first_sha = _base_of(parents[0])
    for p in parents[1:]:
        path, sha = _base_of(p)
        if first_sha and sha and sha != first_sha and not allow_different_bases:
            raise CombineError(
                f"{parents[0].parent.path} and {p.parent.path} were trained on different base models (content "
                f"sha256 {first_sha[:12]}... vs {sha[:12]}...; {first_path} vs {path}). Their updates do not add up "
                "to anything meaningful; if the bases are the same weights in another dtype or layout, pass "
                "--allow-different-bases"
            )
        if first_path != path and not (first_sha and sha == first_sha):
            warnings.append(f"{parents[0].parent.path} names its base {first_path!r}, {p.parent.path} names "
                            f"{path!r}; combining them as if they were the same model")  # fmt: skip
    shapes: dict[str, tuple[int, int, Path]] = {}
    for p in parents:  # the same module with other sizes: another architecture, whatever the names say
        for module, (a, b) in p.modules.items():
            io = (a.shape[1], b.shape[0])
            seen = shapes.setdefault(module, (*io, p.parent.path))
            if seen[:2] != io:
                raise CombineError(f"{module} is {seen[1]}x{seen[0]} in {seen[2]} but {io[1]}x{io[0]} in "
                                   f"{p.parent.path}: the adapters belong to different base models")  # fmt: skip
    return warnings


def _module_sort_key(module: str) -> tuple:
    """Sort key that puts module paths in Hugging Face's `named_modules()` order (numbers numerically)."""
    key = []
    for part in module.split("."):
        key.append((0, int(part), "") if part.isdigit() else (1, _MODULE_RANK.get(part, 99), part))
    return tuple(key)


def _target_modules(parents: list[_Loaded], modules: list[str]) -> list[str] | str:
    """The union of the parents' target lists (peft's rule); for regex targets, an exact regex of the modules."""
    targets = [p.cfg.target_modules for p in parents]
    if all(isinstance(t, list) for t in targets):
        return sorted({name for t in targets for name in t})
    # peft joins string targets with `|`; the modules the parents adapted are exactly what that regex selects, and
    # an explicit list of them also works when the parents mix lists and regexes (which peft refuses).
    return "(" + "|".join(re.escape(m) for m in modules) + ")"


# ---- the arithmetic of peft.utils.merge_utils, op for op -----------------------------------------------------


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def _random_prune(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density  # rescaled so that the expected value is unchanged (DARE)


def _disjoint_merge(stacked: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    mask = sign == torch.where(magnitude >= 0, 1, -1)
    return (_weighted(stacked, weights) * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _mix(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None, majority_sign: str,
         gen: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """One of peft's `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` on a list of tensors."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, gen) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    if kind in ("ties", "dare_ties"):
        return _disjoint_merge(stacked, weights, majority_sign)
    return _weighted(stacked, weights).sum(dim=0)


def _replay_peft_init(shapes: list[tuple[int, int]], rank: int, init: Any, gen: torch.Generator) -> None:
    """Draw the random numbers peft's `add_weighted_adapter` draws while creating the new adapter's layers.

    Per module, in order: `nn.Linear(in, r)` and `nn.Linear(r, out)` initialise their weights, then peft's
    `reset_lora_parameters` re-initialises A (Kaiming-uniform, or normal for "gaussian"; nothing for False).
    """
    for in_f, out_f in shapes:
        a = torch.empty(rank, in_f)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        torch.nn.init.kaiming_uniform_(torch.empty(out_f, rank), a=math.sqrt(5), generator=gen)
        if init is True:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.nn.init.normal_(a, std=1 / rank, generator=gen)


def _combine_ab(kind: str, present: list[_Loaded], module: str, density: float | None, majority_sign: str,
                gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mirror of peft's `_generalized_task_arithmetic_weighted_adapter` for one module."""
    wa, wb = [], []
    for p in present:
        ws = p.parent.weight * p.cfg.scaling
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign goes on A only, else it cancels
        wb.append(math.sqrt(abs(ws)))
    a = _mix(kind, [p.modules[module][0] for p in present], torch.tensor(wa), density, majority_sign, gen)
    b = _mix(kind, [p.modules[module][1] for p in present], torch.tensor(wb), density, majority_sign, gen)
    return a, b


def _combine_cat(present: list[_Loaded], module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror of peft's `cat`: stacked ranks, weight and scaling on A, zero-padded to the total rank."""
    a_parts = [p.modules[module][0] * p.parent.weight * p.cfg.scaling for p in present]
    b_parts = [p.modules[module][1] for p in present]
    a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)  # (r_sum, in), (out, r_sum)
    a = torch.zeros(rank, a_cat.shape[1])
    b = torch.zeros(b_cat.shape[0], rank)
    a[: a_cat.shape[0]] = a_cat
    b[:, : b_cat.shape[1]] = b_cat
    return a, b


def _combine_svd(kind: str, present: list[_Loaded], module: str, rank: int, density: float | None,
                 majority_sign: str, gen: torch.Generator | None, clamp: float | None,
                 full_matrices: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Mirror of peft's `_svd_generalized_task_arithmetic_weighted_adapter` for one module."""
    deltas = [(p.modules[module][1] @ p.modules[module][0]) * p.cfg.scaling for p in present]  # (out, in)
    weights = torch.tensor([p.parent.weight for p in present])
    delta = _mix("linear" if kind == "svd" else kind.removesuffix("_svd"), deltas, weights, density, majority_sign,
                 gen)  # fmt: skip
    if rank > min(delta.shape):
        raise CombineError(f"rank {rank} is larger than {module}'s smaller side ({min(delta.shape)}); choose "
                           f"--rank {min(delta.shape)} or less")  # fmt: skip
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices)
    u = u[:, :rank] @ torch.diag(s[:rank])  # (out, rank)
    vh = vh[:rank, :]  # (rank, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return vh, u


# ---- public API -------------------------------------------------------------------------------------------------


def combine_adapters(
    parents: Sequence[Parent | tuple[str | os.PathLike, float]],
    method: str = "linear",
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int | None = None,
    majority_sign: str = "total",
    svd_clamp: float | None = None,
    full_matrices: bool = False,
    allow_different_bases: bool = False,
) -> CombinedAdapter:
    """Combine PEFT LoRA adapters into one, as peft's `add_weighted_adapter` would (see the module docstring).

    Args:
        parents: The adapters, as `Parent`s or `(folder, weight)` pairs, in order (the order matters for DARE's
            random draws and for `cat`'s layout).
        method: One of `METHODS`.
        density: Fraction of values kept, in (0, 1]: required by ties, dare_*, magnitude_prune (and their _svd
            forms), refused by the others.
        rank: Target rank of the svd methods (default: the largest parent rank, as peft).
        seed: DARE's seed (default 0); refused by the non-random methods.
        majority_sign: TIES sign election, "total" (sum of values) or "frequency" (count of signs).
        svd_clamp: Quantile at which the svd methods clamp the factors (peft's `svd_clamp`); default none.
        full_matrices: Passed to `torch.linalg.svd`. peft defaults to True; False gives the same factors without
            building an out x out matrix (which for a LoRA on the output head would not fit in memory).
        allow_different_bases: Combine even when the parents' recorded base-model hashes differ.

    Returns:
        The combined adapter (float32 tensors under PEFT keys, config and provenance), not yet written.

    Raises:
        CombineError: an unknown method, a bad or meaningless option, a DoRA or modules_to_save parent, ranks that
            differ for a method that needs them equal, or parents from different base models.
        AdapterError: a folder is not a readable PEFT LoRA adapter.
    """
    check_method(method)
    items = [p if isinstance(p, Parent) else Parent(Path(p[0]), float(p[1])) for p in parents]
    _check_options(method, len(items), density, rank, seed, majority_sign, svd_clamp)
    for p in items:
        if not math.isfinite(p.weight):
            raise CombineError(f"weight of {p.path} is {p.weight}; weights must be finite numbers")
    loaded = [_load(p) for p in items]
    warnings = _check_same_base(loaded, allow_different_bases)
    effective = "linear" if len(loaded) == 1 else method  # peft: one adapter can only be mixed linearly
    if effective != method:
        warnings.append(f"with one adapter every method is linear (peft's rule), so {method!r} acts as 'linear'")
    ranks = [p.cfg.r for p in loaded]
    if effective in AB_METHODS and len(set(ranks)) != 1:
        listing = ", ".join(f"{p.parent.name} r={p.cfg.r}" for p in loaded)
        raise CombineError(f"method {effective!r} mixes the A and B matrices elementwise, so all adapters need the "
                           f"same rank ({listing}); use --method cat (exact, rank {sum(ranks)}) or --method svd "
                           "(--rank R)")  # fmt: skip
    new_rank = sum(ranks) if effective == "cat" else (rank or max(ranks)) if effective in SVD_METHODS else ranks[0]
    modules = sorted({m for p in loaded for m in p.modules}, key=_module_sort_key)
    gen = None
    # DARE equals peft run on CPU in fp32 after `torch.manual_seed(seed)` with the parents in the same order: peft
    # first initialises the new adapter's layers (two `nn.Linear` inits and a LoRA reset per module), so those draws
    # are replayed on a private generator (the global one is left alone), then the Bernoulli masks are drawn module
    # by module in `named_modules()` order (`_MODULE_RANK`), A then B, parent by parent, as peft's loops do.
    if effective in RANDOM_METHODS:
        gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
        shapes = [next((p.modules[m][0].shape[1], p.modules[m][1].shape[0]) for p in loaded if m in p.modules)
                  for m in modules]  # fmt: skip
        _replay_peft_init(shapes, new_rank, loaded[0].raw_config.get("init_lora_weights", True), gen)
    tensors: dict[str, torch.Tensor] = {}
    for module in modules:
        present = [p for p in loaded if module in p.modules]
        if effective == "cat":
            a, b = _combine_cat(present, module, new_rank)
        elif effective in SVD_METHODS:
            a, b = _combine_svd(effective, present, module, new_rank, density, majority_sign, gen, svd_clamp,
                                full_matrices)  # fmt: skip
        else:
            a, b = _combine_ab(effective, present, module, density, majority_sign, gen)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    first = loaded[0]
    lora_cfg = LoRAConfig(r=new_rank, alpha=new_rank, dropout=first.cfg.dropout,
                          target_modules=_target_modules(loaded, modules))  # fmt: skip
    base_path, _ = _base_of(first)
    config = _peft_config(lora_cfg, lora_cfg.target_modules, base_path or "")
    provenance = {
        "source": "nomoat merge",
        "method": method,
        "effective_method": effective,
        "weights": [p.parent.weight for p in loaded],
        "density": density,
        "rank": new_rank,
        "seed": (0 if seed is None else int(seed)) if effective in RANDOM_METHODS else None,
        "majority_sign": majority_sign if effective.removesuffix("_svd") in ("ties", "dare_ties") else None,
        "svd_clamp": svd_clamp,
        "base_model": first.provenance.get("base_model") or base_path,
        "parents": [
            {
                "name": p.parent.name,
                "path": str(p.parent.path.resolve()),
                "weights_sha256": p.sha256,
                "weight": p.parent.weight,
                "r": p.cfg.r,
                "lora_alpha": p.cfg.alpha,
                "use_rslora": p.cfg.use_rslora,
                "base_model": _base_of(p)[0],
            }
            for p in loaded
        ],
    }
    return CombinedAdapter(tensors, config, provenance, lora_cfg, warnings)


def save_combined(combined: CombinedAdapter, folder: str | os.PathLike) -> Path:
    """Write a combined adapter as a PEFT adapter folder (config, safetensors, `nomoat.json`), atomically.

    The files go to a temporary sibling folder that is renamed into place; an existing folder is replaced only
    once the new one is complete.

    Args:
        combined: The result of `combine_adapters`.
        folder: The folder to write.

    Returns:
        The folder's path.
    """
    dest = Path(folder).expanduser()
    prov = {
        **combined.provenance,
        "nomoat_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora_config": combined.lora_config.to_dict(),
    }
    with atomic_dir(dest) as tmp:
        save_file(combined.tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(combined.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, default=str) + "\n", encoding="utf-8")
    return dest


def combine(
    parents: Sequence[Parent | tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    method: str = "linear",
    **options: Any,
) -> Path:
    """`combine_adapters` then `save_combined`: write the combination of `parents` to the folder `out`.

    Args:
        parents: The adapters, as for `combine_adapters`.
        out: The folder to write (replaced atomically if it exists).
        method: One of `METHODS`.
        **options: `density`, `rank`, `seed`, `majority_sign`, `svd_clamp`, `full_matrices`,
            `allow_different_bases`, as for `combine_adapters`.

    Returns:
        The written folder.
    """
    return save_combined(combine_adapters(parents, method, **options), out)


__all__ = [
    "METHODS",
    "CombineError",
    "CombinedAdapter",
    "Parent",
    "check_method",
    "combine",
    "combine_adapters",
    "save_combined",
]
