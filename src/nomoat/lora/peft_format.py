"""Adapters on disk in PEFT's format, the folder that hands an adapter over between train, generate, serve and export.

`save_adapter` writes what `peft.PeftModel.from_pretrained` loads and `load_adapter` reads it back into a model
(`read_adapter_config`, `read_provenance` read single files). A folder holds:

    adapter_config.json        PEFT 0.21's `LoraConfig` fields (`peft_type` "LORA", `task_type` "CAUSAL_LM", ...).
    adapter_model.safetensors  tensors under `base_model.model.` + module path: `...q_proj.lora_A.weight`,
                               `...q_proj.lora_magnitude_vector` (DoRA), `base_model.model.lm_head.weight` (saved).
    nomoat.json                provenance (what the caller passes), nomoat's version, creation time (UTC).

Phi-3's fused `qkv_proj` / `gate_up_proj` save as PEFT expects (the split parts' `lora_B` rows concatenated under the
fused name; a part without an adapter as zero rows) and load split again, exactly. Writes are atomic (a temporary
sibling folder renamed into place); a pickled `adapter_model.bin` is refused.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nomoat import __version__
from nomoat.config.lora import LoRAConfig
from nomoat.lora.inject import FUSED_GROUPS, has_fused_projections, inject_lora, lora_layers
from nomoat.lora.merge import lora_state_dict
from nomoat.util.errors import InputError
from nomoat.util.files import atomic_dir, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PROVENANCE_FILE = "nomoat.json"
PEFT_PREFIX = "base_model.model."
# adapter_config.json options that change what the weights mean and that nomoat does not implement: a value other
# than these defaults is refused rather than silently giving other outputs than peft.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layers_pattern": None, "layer_replication": None, "exclude_modules": None,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
    "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None, "monteclora_config": None,
}  # fmt: skip


class AdapterError(InputError, ValueError):
    """An adapter folder that cannot be written or loaded: missing files, unsupported options, misfitting tensors."""


# ---- config ---------------------------------------------------------------------------------------------------


def _peft_config(cfg: LoRAConfig, target_modules: list[str], base_model_name_or_path: str) -> dict[str, Any]:
    """The adapter_config.json PEFT 0.21 writes for a plain LoRA/DoRA adapter with these settings."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True if cfg.init == "default" else "gaussian",
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": cfg.dropout, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": list(cfg.modules_to_save) or None,
        "peft_type": "LORA", "qalora_group_size": 16, "r": cfg.r, "rank_pattern": {}, "revision": None,
        "target_modules": target_modules, "target_parameters": None, "task_type": "CAUSAL_LM",
        "trainable_token_indices": None, "use_dora": cfg.use_dora, "use_qalora": False,
        "use_rslora": cfg.use_rslora,
    }  # fmt: skip


def read_adapter_config(folder: str | os.PathLike) -> LoRAConfig:
    """Read a PEFT `adapter_config.json` as a `LoRAConfig`; unknown fields are ignored.

    Raises:
        AdapterError: no config file, not a LoRA adapter, or an option nomoat does not implement (the message says
            which and why).
    """
    path = Path(folder)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"{path}: no {CONFIG_FILE}, so this is not a PEFT adapter folder")
    data = read_json(file, error=AdapterError)
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{file}: peft_type is {peft_type!r}; nomoat loads LoRA (and DoRA) adapters only")
    for key, default in UNSUPPORTED_DEFAULTS.items():
        value = data.get(key, default)
        if value not in (default, None) and value != {} and value != []:
            raise AdapterError(f"{file}: {key}={value!r} is not supported by nomoat (only {default!r})")
    if data.get("bias", "none") != "none":
        raise AdapterError(f"{file}: bias={data['bias']!r} is not supported by nomoat (only 'none')")
    init = data.get("init_lora_weights", True)
    targets = data.get("target_modules")
    if targets is None:
        raise AdapterError(f"{file}: target_modules is missing (nomoat needs the adapter's layer names)")
    try:
        return LoRAConfig(
            r=int(data.get("r", 8)),
            alpha=data.get("lora_alpha", 8),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            target_modules=targets if isinstance(targets, str) else sorted(targets),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            modules_to_save=list(data.get("modules_to_save") or []),
            init="gaussian" if init == "gaussian" else "default",
        )
    except ValueError as e:
        raise AdapterError(f"{file}: {e}") from e


def read_provenance(folder: str | os.PathLike) -> dict[str, Any]:
    """The contents of an adapter folder's `nomoat.json`, or `{}` for an adapter made elsewhere."""
    file = Path(folder) / PROVENANCE_FILE
    return read_json(file, missing_ok=True, error=AdapterError)


# ---- key maps ---------------------------------------------------------------------------------------------------


def _fused_of(leaf: str) -> tuple[str, int] | None:
    for fused, parts in FUSED_GROUPS.items():
        if leaf in parts:
            return fused, parts.index(leaf)
    return None


def _to_peft_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter state under PEFT keys, fusing Phi-3 groups."""
    state = lora_state_dict(model)
    if not has_fused_projections(model):
        return {PEFT_PREFIX + k: v for k, v in state.items()}
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for key, value in state.items():
        module, _, leaf_key = key.partition(".lora_") if ".lora_" in key else (key, "", "")
        prefix, _, leaf = module.rpartition(".")
        hit = _fused_of(leaf) if leaf_key else None
        if hit is None:
            out[PEFT_PREFIX + key] = value
            continue
        fused, _ = hit
        group_key = f"{prefix}.{fused}"
        if group_key in done:
            continue
        done.add(group_key)
        out.update(_fuse_group(model, layers, prefix, fused))
    return out


def _fuse_group(model: nn.Module, layers: dict[str, Any], prefix: str, fused: str) -> dict[str, torch.Tensor]:
    """PEFT tensors of one fused layer from its split parts (exact: shared A, B rows stacked)."""
    parts = [f"{prefix}.{p}" for p in FUSED_GROUPS[fused]]
    present = [layers[p] for p in parts if p in layers]
    A = present[0].lora_A.weight
    if any(not torch.equal(m.lora_A.weight, A) for m in present[1:]):
        raise AdapterError(
            f"{prefix}: the LoRA parts of {fused} have different lora_A matrices, so they cannot be saved as one "
            "fused PEFT layer (inject_lora shares them on fused-layout models; do not untie them)"
        )
    bs, mags = [], []
    for name in parts:
        layer = layers.get(name)
        if layer is not None:
            bs.append(layer.lora_B.weight.detach())
            if present[0].lora_magnitude_vector is not None:
                mags.append(layer.lora_magnitude_vector.detach())
            continue
        base = model.get_submodule(name)
        w = base.dequantize(torch.float32) if hasattr(base, "dequantize") else base.weight.detach().float()
        bs.append(torch.zeros(w.shape[0], A.shape[0], dtype=A.dtype, device=A.device))
        if present[0].lora_magnitude_vector is not None:
            mags.append(torch.linalg.norm(w, dim=1).to(A.dtype))  # DoRA factor 1 where there is no update
    key = f"{PEFT_PREFIX}{prefix}.{fused}"
    out = {f"{key}.lora_A.weight": A.detach(), f"{key}.lora_B.weight": torch.cat(bs)}
    if mags:
        out[f"{key}.lora_magnitude_vector"] = torch.cat(mags)
    return out


def _normalise_peft_key(key: str) -> str:
    """A PEFT key as nomoat's name: no `base_model.model.` prefix, no adapter-name infix (`.default`)."""
    name = key.removeprefix(PEFT_PREFIX)
    name = name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    for marker in ("lora_A", "lora_B"):
        name = name.replace(f".{marker}.default.", f".{marker}.")
    for suffix in (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight",
                   ".lora_magnitude_vector.default"):  # fmt: skip
        if name.endswith(suffix):
            name = name[: -len(suffix)] + ".lora_magnitude_vector"
    return name


def _from_peft_state(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """PEFT tensors under nomoat's names, splitting Phi-3's fused layers."""
    fused_model = has_fused_projections(model)
    cfg = getattr(model, "config", None)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if "lora_embedding_" in key:
            raise AdapterError(f"{file}: {key} is an embedding LoRA, which nomoat does not support")
        name = _normalise_peft_key(key)
        module, _, rest = name.partition(".lora_") if ".lora_" in name else (name, "", "")
        prefix, _, leaf = module.rpartition(".")
        if not (rest and leaf in FUSED_GROUPS and fused_model):
            out[name] = value
            continue
        parts = FUSED_GROUPS[leaf]
        if rest == "A.weight":
            for p in parts:
                out[f"{prefix}.{p}.lora_{rest}"] = value
            continue
        sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size] if leaf == "qkv_proj" else [cfg.intermediate_size] * 2
        if value.shape[0] != sum(sizes):
            raise AdapterError(f"{file}: {key} has shape {tuple(value.shape)}, the fused layer needs {sum(sizes)} rows")
        for p, chunk in zip(parts, value.split(sizes, dim=0)):
            out[f"{prefix}.{p}.lora_{rest}"] = chunk
    return out


def _peft_targets(model: nn.Module) -> list[str]:
    """target_modules as PEFT names them in the checkpoint's layout (leaf names, fused on Phi-3)."""
    leaves = {n.rsplit(".", 1)[-1] for n in lora_layers(model)}
    if has_fused_projections(model):
        leaves = {(_fused_of(leaf) or (leaf, 0))[0] for leaf in leaves}
    return sorted(leaves)


# ---- save / load ------------------------------------------------------------------------------------------------


def _check_layers(model: nn.Module, cfg: LoRAConfig) -> None:
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("this model has no LoRA layers to save; call inject_lora(model, cfg) first")
    for name, layer in layers.items():
        if layer.r != cfg.r or abs(layer.scaling - cfg.scaling) > 1e-12 or layer.use_dora != cfg.use_dora:
            raise AdapterError(
                f"{name}: layer has r={layer.r}, scaling={layer.scaling}, dora={layer.use_dora}, but the config "
                f"says r={cfg.r}, scaling={cfg.scaling}, dora={cfg.use_dora}"
            )
        if layer.merged:
            raise AdapterError(f"{name} is merged; call unmerge_lora(model) before saving the adapter")


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    cfg: LoRAConfig,
    base_model_name_or_path: str,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the model's adapter as a PEFT adapter folder, atomically.

    The folder is written under a temporary sibling name and renamed into place; an existing folder at `folder`
    is replaced only once the new one is complete.

    Args:
        model: A model with LoRA layers (`inject_lora`), not merged.
        folder: Destination folder.
        cfg: The adapter's config (must agree with the layers' rank, scaling and DoRA flag).
        base_model_name_or_path: The base model's name or path, recorded for `peft` and for humans.
        provenance: JSON-serializable facts about how the adapter was made (data, recipe, metrics), written to
            `nomoat.json` with nomoat's version and the creation time.

    Returns:
        The folder's path.

    Raises:
        AdapterError: no LoRA layers, a merged layer, or a config that does not match the layers.
    """
    _check_layers(model, cfg)
    dest = Path(folder)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _to_peft_state(model).items()}
    targets = _peft_targets(model)
    config = _peft_config(cfg, targets, base_model_name_or_path)
    prov = {
        **(provenance or {}),
        "nomoat_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora_config": {**cfg.to_dict(), "target_modules": cfg.target_modules},
    }
    with atomic_dir(dest) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2, default=str) + "\n", encoding="utf-8")
    return dest


def weights_file(path: Path) -> Path:
    """An adapter folder's safetensors file.

    Raises:
        AdapterError: It is missing; for a pickle `adapter_model.bin`, the message says how to convert it.
    """
    file = path / WEIGHTS_FILE
    if not file.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterError(
                f"{path}: the weights are {PICKLE_FILE}, a pickle file; nomoat only loads safetensors because "
                "unpickling can run arbitrary code. If you trust it, convert it once with peft "
                "(`PeftModel.from_pretrained(base, folder).save_pretrained(out, safe_serialization=True)`) or with "
                "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')`"
            )
        raise AdapterError(f"{path}: no {WEIGHTS_FILE}")
    return file


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(weights_file(path)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _same_targets(model: nn.Module, cfg: LoRAConfig) -> bool:
    from nomoat.lora.inject import match_targets

    return set(match_targets(model, cfg)) == set(lora_layers(model))


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRAConfig:
    """Load a PEFT-format LoRA/DoRA adapter (saved by nomoat or by `peft`) into a model, in place.

    Injects LoRA layers first when the model has none; a model that already has them must have the same targets,
    rank and scaling. Tensors are copied into the model's adapter parameters (converted to their dtype/device).

    Args:
        model: A base model (or one with matching LoRA layers, e.g. to load another checkpoint of a run).
        folder: Folder with `adapter_config.json` and `adapter_model.safetensors`.

    Returns:
        The adapter's `LoRAConfig`.

    Raises:
        AdapterError: missing files, pickle weights, unsupported options, unknown or missing tensors, or shapes that
            do not fit (naming the key and both shapes).
    """
    path = Path(folder)
    cfg = read_adapter_config(path)
    tensors = _read_tensors(path)
    layers = lora_layers(model)
    try:
        if not layers:
            inject_lora(model, cfg)
        elif not _same_targets(model, cfg) or any(
            layer.r != cfg.r or abs(layer.scaling - cfg.scaling) > 1e-12 or layer.use_dora != cfg.use_dora
            for layer in layers.values()
        ):
            raise AdapterError(
                f"{path}: the model already has LoRA layers that differ from this adapter's (targets, r, scaling or "
                "DoRA); load it into a fresh base model"
            )
    except ValueError as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path}: {e}") from e
    if any(layer.merged for layer in lora_layers(model).values()):
        raise AdapterError("the model's LoRA layers are merged; call unmerge_lora(model) before loading an adapter")
    incoming = _from_peft_state(model, tensors, path / WEIGHTS_FILE)
    own = lora_state_dict(model)
    unexpected = sorted(set(incoming) - set(own))
    missing = sorted(set(own) - set(incoming))
    if unexpected:
        raise AdapterError(f"{path / WEIGHTS_FILE}: tensors this model has no place for: {_short(unexpected)}")
    if missing:
        raise AdapterError(f"{path / WEIGHTS_FILE}: lacks tensors the adapter config implies: {_short(missing)}")
    for name, value in incoming.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise AdapterError(
                f"{path / WEIGHTS_FILE}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, value in incoming.items():
            own[name].copy_(value)
    model.lora_config = cfg
    return cfg


def _short(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


__all__ = [
    "AdapterError",
    "load_adapter",
    "read_adapter_config",
    "read_provenance",
    "save_adapter",
]
