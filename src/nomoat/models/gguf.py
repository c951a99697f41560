"""GGUF files in: a llama.cpp model file read as nomoat's trainable `Transformer`.

`gguf_hf_config(reader)` turns the GGUF metadata into the Hugging Face `config.json` the same model would have (so
`families.config_from_hf` applies the family's defaults as for a folder), and `load_gguf_model` fills the model one
tensor at a time, dequantizing each block type to the requested dtype and undoing llama.cpp's layout changes (q/k row
interleaving of the `llama` architecture, Gemma's `1 + weight` norms). With `keep_q4`, the Q4_0 / Q4_1 blocks of
linear layers are kept as they are (`read_q4`): they become int4 `QuantizedLinear` layers (GGUF's own codes, scales
and minimums in the 4-bit kernels' panels), never dequantized or re-quantized; a tied output head gets the Q4
embedding's blocks (lookups use the embedding dequantized to the model's dtype). With `keep_q8`, Q8_0 blocks become
int8 `QuantizedLinear` layers the same way (GGUF's own codes and fp16 block scales: nomoat's int8 format is Q8_0's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nomoat.models.families import FAMILIES, rope_inv_freq, split_fused
from nomoat.models.quantize import QuantizedLinear
from nomoat.models.transformer import Transformer
from nomoat.util.errors import ModelError

# GGUF general.architecture -> Hugging Face model_type. Mistral is the llama architecture in llama.cpp.
ARCHITECTURES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3",
}  # fmt: skip
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}  # fmt: skip
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Tensors llama.cpp writes that nomoat recomputes (rotary tables) or does not use.
SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


class GGUFError(ModelError):
    """A GGUF file nomoat cannot load: unsupported architecture or tensor type, or tensors that do not fit."""


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a GGUF file (by its magic bytes, so an Ollama blob without suffix counts)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` (memory-mapped) for `path`."""
    import gguf

    try:
        return gguf.GGUFReader(str(path), "r")
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from e


def metadata(reader: Any) -> dict[str, Any]:
    """All scalar, string and array metadata of a GGUF file as Python values."""
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - a value the reader cannot decode is one we do not need
            continue
    return out


def _arch(meta: dict[str, Any], path: Any) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: GGUF architecture {arch!r} is not supported",
            hint=f"nomoat loads GGUF architectures: {', '.join(sorted(ARCHITECTURES))}",
        )
    return str(arch)


def gguf_hf_config(meta: dict[str, Any], tensor_names: set[str], path: Any = "") -> dict[str, Any]:
    """The Hugging Face `config.json` (as a dict) of the model a GGUF file holds."""
    arch = _arch(meta, path)

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    n_head = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_head)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFError(f"{path}: GGUF has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    hf: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "architectures": [HF_CLASSES[ARCHITECTURES[arch]]],
        "vocab_size": int(vocab),
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10_000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    head_dim = key("attention.key_length")
    if head_dim is not None:
        hf["head_dim"] = int(head_dim)
    hd = hf.get("head_dim") or hf["hidden_size"] // n_head
    rotary = key("rope.dimension_count")
    if rotary is not None and int(rotary) != hd:
        hf["partial_rotary_factor"] = int(rotary) / hd
    scaling, factor = key("rope.scaling.type"), key("rope.scaling.factor")
    if scaling == "linear" and factor:
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} in a GGUF file is not supported (supported: linear)")
    for name in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            hf[{"padding": "pad"}.get(name, name) + "_token_id"] = int(token_id)
    window = key("attention.sliding_window")
    if arch in ("llama", "mistral"):
        hf["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    elif arch in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = False
    elif arch in ("gemma2", "gemma3"):
        hf["query_pre_attn_scalar"] = hd
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["sliding_window"] = int(window or 4096)
        if arch == "gemma2":
            hf["attn_logit_softcapping"] = key("attn_logit_softcapping", 50.0)
            hf["final_logit_softcapping"] = key("final_logit_softcapping", 30.0)
        else:
            hf["rope_local_base_freq"] = 10_000.0
    elif arch == "phi3":
        hf["sliding_window"] = int(window) if window else None
    return hf


def reader_hf_config(reader: Any, path: Any = "") -> dict[str, Any]:
    """`gguf_hf_config` of an open file, with Llama 3 rope scaling recovered from its `rope_freqs` tensor."""
    tensors = {t.name: t for t in reader.tensors}
    hf = gguf_hf_config(metadata(reader), set(tensors), path)
    if "rope_freqs.weight" in tensors and hf["model_type"] == "llama":
        hf["rope_scaling"] = _llama3_rope(read_tensor(tensors["rope_freqs.weight"]), hf, path)
    return hf


def _llama3_rope(factors: torch.Tensor, hf: dict[str, Any], path: Any) -> dict[str, Any]:
    """The `llama3` rope parameters whose per-frequency factors equal a GGUF's `rope_freqs`.

    llama.cpp divides the frequencies by these factors; the metadata keeps no parameters, so the ones Llama 3.1/3.2
    use (low/high frequency factors 1 and 4) are checked against the tensor over power-of-two original contexts.
    """
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    base, _ = rope_inv_freq({"rope_type": "default", "rope_theta": hf["rope_theta"]}, head_dim, 1)
    for original in [8192, *(2**k for k in range(4, 18))]:
        params = {"rope_type": "llama3", "rope_theta": hf["rope_theta"], "factor": float(factors.max()),
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": original}
        scaled, _ = rope_inv_freq(params, head_dim, hf["max_position_embeddings"])
        if factors.shape == base.shape and torch.allclose(base / scaled, factors.float(), rtol=1e-3):
            return params
    raise GGUFError(f"{path}: rope_freqs holds rope factors that are not Llama 3's (supported: llama3 scaling with "
                    "low/high frequency factors 1 and 4)")  # fmt: skip


def _tensor_names(hf: dict[str, Any], arch: str) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face name (Phi-3 fused names; split later by `split_fused`)."""
    import gguf

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    n = hf["num_hidden_layers"]
    tensor_map = gguf.get_tensor_name_map(arch_enum, n)
    hf_names = ["model.embed_tokens", "model.norm", "lm_head"]
    per_layer = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm", "self_attn.qkv_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mlp.gate_up_proj"]  # fmt: skip
    hf_names += [f"model.layers.{i}.{p}" for i in range(n) for p in per_layer]
    out: dict[str, str] = {}
    for hf_name in hf_names:
        if arch == "phi3" and hf_name.endswith("mlp.gate_up_proj"):
            mapped = f"blk.{hf_name.split('.')[2]}.ffn_up"  # llama.cpp keeps Phi-3's fused gate+up as ffn_up
        elif arch == "phi3" and hf_name.endswith("mlp.up_proj"):
            continue
        else:
            mapped = tensor_map.get_name(hf_name)
        if mapped is not None:
            for suffix in (".weight", ".bias"):
                out.setdefault(mapped + suffix, hf_name + suffix)
    return out


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved q/k rows (its converter's `permute`) back to Hugging Face's per-head halves."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_tensor(tensor: Any) -> torch.Tensor:
    """One GGUF tensor as fp32 in PyTorch's row-major shape (dequantized when it is stored in blocks)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    if qtype.name not in TENSOR_TYPES:
        raise GGUFError(
            f"tensor {tensor.name} has type {qtype.name}, which nomoat does not load yet",
            hint=f"supported GGUF tensor types: {', '.join(TENSOR_TYPES)}",
        )
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(tensor.data)).reshape(shape).float()
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype)).reshape(shape)


Q4_TYPES = ("Q4_0", "Q4_1")
Q8_TYPES = ("Q8_0",)


def read_q8(tensor: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 GGUF matrix's blocks as they are: (out, in) int8 codes and (out, in / 32) fp16 scales (`w = d * q`).

    A Q8_0 block is an fp16 `d` and 32 int8 codes.
    """
    n, k = (int(d) for d in reversed(tensor.shape))
    raw = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(-1, 34))  # (n * k / 32, block bytes)
    codes = raw[:, 2:].contiguous().view(torch.int8).reshape(n, k)
    d = raw[:, :2].contiguous().view(torch.float16).reshape(n, k // 32)
    return codes, d


def read_q4(tensor: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q4_0 / Q4_1 GGUF matrix's blocks as they are: (out, in) uint8 codes, (out, in / 32) fp16 scales, minimums.

    A Q4_0 block is an fp16 `d` and 16 bytes of codes (byte j: element j in the low nibble, j + 16 in the high),
    `w = d * (code - 8)`; Q4_1 adds an fp16 `m` after `d`, `w = d * code + m`. The minimums are None for Q4_0.
    """
    import gguf

    qtype = gguf.GGMLQuantizationType(tensor.tensor_type).name
    n, k = (int(d) for d in reversed(tensor.shape))
    head = 2 if qtype == "Q4_0" else 4
    raw = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(-1, head + 16))  # (n * k / 32, block bytes)
    qs = raw[:, head:]
    codes = torch.cat((qs & 15, qs >> 4), dim=1).reshape(n, k)
    d = raw[:, :2].contiguous().view(torch.float16).reshape(n, k // 32)
    m = raw[:, 2:4].contiguous().view(torch.float16).reshape(n, k // 32) if head == 4 else None
    return codes, d, m


def _kept_layer(tensor: Any) -> QuantizedLinear:
    """The quantized layer a Q4_0 / Q4_1 / Q8_0 GGUF matrix makes, its blocks kept (no conversion)."""
    return QuantizedLinear.from_q8(*read_q8(tensor)) if _qtype(tensor) in Q8_TYPES else QuantizedLinear.from_q4(
        *read_q4(tensor))  # fmt: skip


def _kept_layers(name: str, tensor: Any, arch: str, hf: dict[str, Any], cfg: Any) -> list[tuple[str, QuantizedLinear]]:
    """The layers one kept GGUF tensor makes: (parameter name, layer), rows unpermuted and split as `_convert`."""
    q8 = _qtype(tensor) in Q8_TYPES
    parts = [None if t is None else _convert(name, t, arch, hf) for t in (read_q8(tensor) if q8 else read_q4(tensor))]
    splits = [split_fused(name, t, cfg) if t is not None else None for t in parts]  # codes, d (, m)
    out = []
    for i, (param, codes) in enumerate(splits[0]):
        d = splits[1][i][1].contiguous()
        if q8:
            out.append((param, QuantizedLinear.from_q8(codes.contiguous(), d)))
        else:
            m = None if splits[2] is None else splits[2][i][1].contiguous()
            out.append((param, QuantizedLinear.from_q4(codes.contiguous(), d, m)))
    return out


def _qtype(tensor: Any) -> str:
    import gguf

    return gguf.GGMLQuantizationType(tensor.tensor_type).name


def _keeps(tensor: Any, hf_name: str, linears: set[str], types: tuple[str, ...]) -> bool:
    """Whether a GGUF tensor is a weight of one of `types` of a linear layer (or of Phi-3's fused ones)."""
    fused = hf_name.endswith(("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"))
    linear = fused or hf_name.removesuffix(".weight") in linears
    return _qtype(tensor) in types and linear and hf_name.endswith(".weight")


def _convert(name: str, t: torch.Tensor, arch: str, hf: dict[str, Any]) -> torch.Tensor:
    """Undo what llama.cpp's converter did to a tensor."""
    if arch in ("llama", "mistral"):
        if ".q_proj." in name:
            return unpermute_qk(t, hf["num_attention_heads"])
        if ".k_proj." in name:
            return unpermute_qk(t, hf["num_key_value_heads"])
    if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
        return t - 1  # llama.cpp stores Gemma's RMSNorm scale as 1 + weight
    return t


def load_gguf_model(
    path: str | os.PathLike, dtype: torch.dtype, device: torch.device, keep_q4: bool = False, keep_q8: bool = False
) -> Transformer:
    """Load a GGUF file into nomoat's decoder, one tensor at a time.

    Args:
        path: The `.gguf` file (or an Ollama model blob).
        dtype: Target dtype of the parameters.
        device: Target device.
        keep_q4: Keep the Q4_0 / Q4_1 weights of linear layers as int4 `QuantizedLinear` layers (module docstring);
            False dequantizes every tensor to `dtype`.
        keep_q8: Keep the Q8_0 weights of linear layers as int8 `QuantizedLinear` layers (their blocks exactly).

    Returns:
        The model in eval mode; `model.config.hf_config` is the equivalent `config.json`.

    Raises:
        GGUFError: unsupported architecture or tensor type, missing or misshapen tensors.
    """
    reader = open_gguf(path)
    hf = reader_hf_config(reader, path)
    arch = _arch(metadata(reader), path)
    cfg = FAMILIES[hf["model_type"]](hf)
    name_map = _tensor_names(hf, arch)
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    loaded: set[str] = set()
    kept = (Q4_TYPES if keep_q4 else ()) + (Q8_TYPES if keep_q8 else ())
    with torch.no_grad():
        for tensor in reader.tensors:
            if tensor.name in SKIPPED:
                continue
            if tensor.name not in name_map:
                raise GGUFError(f"{path}: unexpected tensor {tensor.name} for a GGUF {arch} model")
            if _keeps(tensor, name_map[tensor.name], linears, kept):
                for name, layer in _kept_layers(name_map[tensor.name], tensor, arch, hf, cfg):
                    _install_kept(model, name, layer, params, device, path, tensor.name)
                    loaded.add(name)
                continue
            raw = _convert(name_map[tensor.name], read_tensor(tensor), arch, hf)
            for name, t in split_fused(name_map[tensor.name], raw, cfg):
                if name not in params or tuple(params[name].shape) != tuple(t.shape):
                    want = tuple(params[name].shape) if name in params else "no such tensor"
                    raise GGUFError(f"{path}: tensor {tensor.name} has shape {tuple(t.shape)}, model needs {want}")
                module_name, _, leaf = name.rpartition(".")
                dest = t.to(device=device, dtype=dtype, copy=True)
                model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(dest, requires_grad=False)
                loaded.add(name)
            del raw
    expected = set(params) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    missing = sorted(expected - loaded)
    if missing:
        raise GGUFError(f"{path}: GGUF lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        embedding = next((t for t in reader.tensors if name_map.get(t.name) == "model.embed_tokens.weight"), None)
        if embedding is not None and _keeps(embedding, "lm_head.weight", {"lm_head"}, kept):
            model.lm_head = _kept_layer(embedding).to(device)  # the file's blocks, as llama.cpp
    model.reset_rope(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def _install_kept(model: Transformer, name: str, layer: QuantizedLinear, params: dict[str, Any], device: torch.device,
                path: Any, tensor_name: str) -> None:  # fmt: skip
    """Put a kept Q4 / Q8 layer where the linear layer of parameter `name` is (its bias, loaded or not, kept)."""
    want = tuple(params[name].shape) if name in params else "no such tensor"
    if want != (layer.out_features, layer.in_features):
        raise GGUFError(f"{path}: tensor {tensor_name} has shape {(layer.out_features, layer.in_features)}, "
                        f"model needs {want}")  # fmt: skip
    module_name = name.rpartition(".")[0]
    parent, _, child = module_name.rpartition(".")
    old = model.get_submodule(module_name)
    layer = layer.to(device)
    layer.bias = old.bias  # a meta placeholder until the GGUF's bias tensor fills it (or already filled)
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def gguf_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Parameter count, tensor types (parameters per type) and bytes of a GGUF file's tensors."""
    import gguf

    reader = open_gguf(path)
    params, nbytes, types = 0, 0, {}
    for t in reader.tensors:
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        params += int(t.n_elements)
        nbytes += int(t.n_bytes)
        types[name] = types.get(name, 0) + int(t.n_elements)
    return {"parameters": params, "bytes": nbytes, "dtypes": types}
