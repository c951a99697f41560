"""Model families: from a Hugging Face `config.json` to a `ModelConfig` (`config_from_hf`), and the checkpoint maps.

`FAMILIES` maps each supported `model_type` (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) to a small
function that reads the keys its `transformers` config class reads, with the same defaults, so an omitted key means
the same thing here. `rope_inv_freq` computes rotary frequencies (`ROPE_TYPES`); `split_fused` / `fuse_for_save` map
Phi-3's fused checkpoint tensors to nomoat's split names and back. Nothing here builds layers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from nomoat.config.model import ModelConfig
from nomoat.util.errors import ModelError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


class UnsupportedModelError(ModelError, ValueError):
    """Raised for a `config.json` nomoat cannot run: an unknown family or an unsupported feature."""


def _get(hf: dict[str, Any], key: str, default: Any) -> Any:
    """Read a key the way `transformers` config classes do: a missing key or a JSON null means the default."""
    value = hf.get(key)
    return default if value is None else value


def _standard_rope(params: dict[str, Any] | None, theta: float, hf: dict[str, Any]) -> dict[str, Any]:
    """Normalise one rope parameter dict (legacy `rope_scaling` or v5 `rope_parameters`) to nomoat's form."""
    params = dict(params or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type in ("su", "yarn") and hf.get("model_type") == "phi3":
        rope_type = "longrope"  # Phi-3's early configs named LongRoPE "su" or "yarn"; transformers maps them too
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported yet (supported: {', '.join(ROPE_TYPES)})"
        )
    params["rope_type"] = rope_type
    params.setdefault("rope_theta", theta)
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if rope_type in ("llama3", "yarn", "longrope"):
        if hf.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    return params


def _rope(hf: dict[str, Any], default_theta: float = 10_000.0) -> dict[str, dict[str, Any]]:
    """Rope parameters shared by every layer type (all families but Gemma 3)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        return {k: _standard_rope(v, _get(hf, "rope_theta", default_theta), hf) for k, v in params.items()}
    one = _standard_rope(params, _get(hf, "rope_theta", default_theta), hf)
    return {"full_attention": one, "sliding_attention": copy.deepcopy(one)}


def _common(hf: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """Keys every family shares, with the family's defaults."""
    d = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": None}
    d.update(defaults)
    hf = dict(hf)
    hf["max_position_embeddings"] = _get(hf, "max_position_embeddings", d["max_position_embeddings"])
    num_heads = hf["num_attention_heads"]
    return {
        "family": hf["model_type"],
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": num_heads,
        "num_kv_heads": _get(hf, "num_key_value_heads", num_heads),
        "head_dim": _get(hf, "head_dim", d["head_dim"]),
        "max_position_embeddings": hf["max_position_embeddings"],
        "rms_norm_eps": _get(hf, "rms_norm_eps", d["rms_norm_eps"]),
        "hidden_act": _get(hf, "hidden_act", "silu"),
        "tie_word_embeddings": _get(hf, "tie_word_embeddings", d["tie_word_embeddings"]),
        "rope": _rope(hf, d.get("rope_theta", 10_000.0)),
        "hf_config": hf,
    }


def _llama(hf: dict[str, Any]) -> ModelConfig:
    bias = _get(hf, "attention_bias", False)
    return ModelConfig(**_common(hf), qkv_bias=bias, o_bias=bias, mlp_bias=_get(hf, "mlp_bias", False))


def _mistral(hf: dict[str, Any]) -> ModelConfig:
    c = _common(hf, max_position_embeddings=4096 * 32)
    window = hf["sliding_window"] if "sliding_window" in hf else 4096  # an explicit null means no window
    kind = "sliding_attention" if window else "full_attention"
    return ModelConfig(**c, sliding_window=window, layer_types=[kind] * c["num_layers"])


def _qwen_layer_types(hf: dict[str, Any], num_layers: int) -> tuple[int | None, list[str]]:
    """Qwen2/Qwen3: a window only when `use_sliding_window`, on the layers from `max_window_layers` on."""
    window = _get(hf, "sliding_window", 4096) if _get(hf, "use_sliding_window", False) else None
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= _get(hf, "max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    if window is None:  # transformers ignores "sliding_attention" entries when there is no window
        types = ["full_attention"] * num_layers
    return window, list(types)


def _qwen2(hf: dict[str, Any]) -> ModelConfig:
    c = _common(hf, max_position_embeddings=32768)
    window, types = _qwen_layer_types(hf, c["num_layers"])
    return ModelConfig(**c, qkv_bias=True, sliding_window=window, layer_types=types)


def _qwen3(hf: dict[str, Any]) -> ModelConfig:
    c = _common(hf, max_position_embeddings=32768, head_dim=128)
    window, types = _qwen_layer_types(hf, c["num_layers"])
    bias = _get(hf, "attention_bias", False)
    return ModelConfig(**c, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window, layer_types=types)


def _gemma_common(hf: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    hf = dict(hf)
    # Gemma configs name the MLP activation `hidden_activation`; `hidden_act` is a legacy alias transformers ignores.
    hf["hidden_act"] = _get(hf, "hidden_activation", "gelu_pytorch_tanh")
    c = _common(hf, tie_word_embeddings=True, head_dim=256, **defaults)
    bias = _get(hf, "attention_bias", False)
    c.update(
        qkv_bias=bias,
        o_bias=bias,
        norm_offset=True,
        sandwich_norm=True,
        embed_scale=c["hidden_size"] ** 0.5,
        query_scale=_get(hf, "query_pre_attn_scalar", 256) ** -0.5,
    )
    return c


def _gemma2(hf: dict[str, Any]) -> ModelConfig:
    c = _gemma_common(hf, max_position_embeddings=8192)
    n = c["num_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    return ModelConfig(
        **c,
        sliding_window=_get(hf, "sliding_window", 4096),
        layer_types=list(types),
        attn_logit_softcap=hf.get("attn_logit_softcapping", 50.0),
        final_logit_softcap=hf.get("final_logit_softcapping", 30.0),
    )


def _gemma3_text(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("gemma3_text with use_bidirectional_attention (an encoder) is not supported")
    c = _gemma_common(hf, max_position_embeddings=131_072)
    n = c["num_layers"]
    pattern = _get(hf, "sliding_window_pattern", 6)
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full, local = params.get("full_attention"), params.get("sliding_attention")
    else:  # legacy: rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones
        full, local = hf.get("rope_scaling") or params, None
    c["rope"] = {
        "full_attention": _standard_rope(full, _get(hf, "rope_theta", 1_000_000.0), hf),
        "sliding_attention": _standard_rope(local, _get(hf, "rope_local_base_freq", 10_000.0), hf),
    }
    return ModelConfig(
        **c,
        qk_norm=True,
        sliding_window=_get(hf, "sliding_window", 4096),
        layer_types=list(types),
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
    )


def _phi3(hf: dict[str, Any]) -> ModelConfig:
    c = _common(hf, max_position_embeddings=4096, rms_norm_eps=1e-5)
    window = hf.get("sliding_window")
    kind = "sliding_attention" if window else "full_attention"
    return ModelConfig(**c, fused_qkv=True, sliding_window=window, layer_types=[kind] * c["num_layers"])


FAMILIES: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate a Hugging Face `config.json` (as a dict) into a `ModelConfig`.

    Raises:
        UnsupportedModelError: the `model_type` is not one nomoat runs, or a feature of it is not supported.
    """
    model_type = hf.get("model_type")
    if model_type == "gemma3" and isinstance(hf.get("text_config"), dict):
        raise UnsupportedModelError(
            "this is a multimodal Gemma 3 checkpoint (model_type 'gemma3'); nomoat runs the text-only "
            "'gemma3_text' models (e.g. gemma-3-1b) for now"
        )
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; nomoat supports: {', '.join(sorted(FAMILIES))} "
            "(Llama 2/3/3.1/3.2, SmolLM2, TinyLlama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 text, Phi-3)"
        )
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise UnsupportedModelError(f"config.json lacks {', '.join(missing)}")
    cfg = FAMILIES[model_type](hf)
    if cfg.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {cfg.hidden_act!r} is not supported (supported: {ACTIVATIONS})")
    return cfg


ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast")


# ---- rotary embeddings: the inverse frequencies of each rope type, as transformers computes them ----------------


def rope_inv_freq(params: dict[str, Any], head_dim: int, max_position_embeddings: int,
                  long: bool = False) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling factor for one rope parameter dict.

    Args:
        params: A normalised rope dict (`rope_type`, `rope_theta`, and the type's own keys).
        head_dim: Width of one attention head.
        max_position_embeddings: The model's context length (LongRoPE and YaRN derive their factor from it).
        long: LongRoPE only: the long-context factors (used when a sequence exceeds the original context).

    Returns:
        `(inv_freq, attention_scaling)`: `inv_freq` is fp32 of shape `(rotary_dim // 2,)`.
    """
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base**exponents)
    kind = params["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, params), 1.0
    if kind == "yarn":
        return _yarn(params, base, dim, max_position_embeddings)
    if kind == "longrope":
        original = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_position_embeddings / original
        scale = params.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (ext * base**exponents), scale
    raise UnsupportedModelError(f"rope type {kind!r} is not supported")


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, out)


def _yarn(p: dict[str, Any], base: float, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = p.get("attention_factor")
    if scale is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            scale = float(mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"]))
        else:
            scale = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, scale


# ---- checkpoint name maps: Phi-3 stores fused projections; nomoat keeps them split for LoRA/PEFT naming ----------


def split_fused(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Map one checkpoint tensor to nomoat's parameter names (splitting Phi-3's fused projections)."""
    if cfg.fused_qkv and name.endswith("self_attn.qkv_proj.weight"):
        prefix = name[: -len("qkv_proj.weight")]
        q, k, v = tensor.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=0)
        return [(prefix + "q_proj.weight", q), (prefix + "k_proj.weight", k), (prefix + "v_proj.weight", v)]
    if cfg.fused_qkv and name.endswith("mlp.gate_up_proj.weight"):
        prefix = name[: -len("gate_up_proj.weight")]
        gate, up = tensor.chunk(2, dim=0)  # transformers' Phi3MLP: the first half is the gate
        return [(prefix + "gate_proj.weight", gate), (prefix + "up_proj.weight", up)]
    return [(name, tensor)]


def fuse_for_save(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `split_fused` over a whole state dict: the checkpoint layout of the model's family."""
    if not cfg.fused_qkv:
        return state
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            out[p + "qkv_proj.weight"] = torch.cat([tensor, state[p + "k_proj.weight"], state[p + "v_proj.weight"]])
        elif name.endswith("mlp.gate_proj.weight"):
            p = name[: -len("gate_proj.weight")]
            out[p + "gate_up_proj.weight"] = torch.cat([tensor, state[p + "up_proj.weight"]])
        elif not name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight")):
            out[name] = tensor
    return out
