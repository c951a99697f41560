"""`export_gguf`: a base model with adapters merged in, written as one GGUF file for llama.cpp and Ollama.

Tensors and metadata are what llama.cpp's `convert_hf_to_gguf.py` writes for the same model: names from the `gguf`
package's map, q/k rows permuted for the `llama` architecture (`permute_qk`), 1-D tensors in f32, `rope_freqs` for
Llama 3 rope scaling, no `output.weight` when the head is tied; `gguf_vocab` / `write_vocab` write the tokenizer
from `tokenizer.json`. The BPE pre-tokenizer is named from its structure (`bpe_pre_tokenizer`), not by hashing sample
tokens as llama.cpp's converter does (which rejects any freshly trained tokenizer), and anything unrecognised is
refused: a wrong pre-tokenizer silently changes how llama.cpp tokenizes. `gguf_lora` reuses the layout helpers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from nomoat.config.model import ModelConfig
from nomoat.export.merged import ExportError
from nomoat.lora.apply import merge_adapters
from nomoat.lora.peft_format import AdapterError
from nomoat.models.checkpoint import CheckpointError, load_config, load_model
from nomoat.models.families import UnsupportedModelError, fuse_for_save, rope_inv_freq
from nomoat.tokenizer import Tokenizer, TokenizerNotFoundError
from nomoat.tokenizer.gguf import SPLIT_REGEXES as GGUF_SPLIT_REGEXES
from nomoat.util.files import atomic_path, read_json
from nomoat.util.hub import local_path

QT = gguf.GGMLQuantizationType
# --outtype -> (general.file_type, the type of 2-D weights).
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
}
# nomoat family -> llama.cpp architecture. Mistral is the llama architecture in llama.cpp (as in its converter).
ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}
GEMMAS = {gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3}
# Architectures whose q/k rows llama.cpp expects interleaved per head (its converter's `undo_permute`).
PERMUTED = {gguf.MODEL_ARCH.LLAMA}
# Progress callback: (bytes written so far, bytes in all).
Progress = Callable[[int, int], None]

# Pre-tokenizer regexes of tokenizer.json -> llama.cpp's name (the table GGUF import reads the other way).
SPLIT_REGEXES = {GGUF_SPLIT_REGEXES[name]: name for name in ("llama-bpe", "qwen2", "tekken")}
PRE_TOKENIZERS = ("gpt-2", "smollm", "qwen2", "llama-bpe", "tekken", "default")


# ---- tokenizer ------------------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """A tokenizer as llama.cpp reads it (the `tokenizer.ggml.*` keys).

    Attributes:
        model: `gpt2` (byte-level BPE) or `llama` (SentencePiece-style BPE with byte fallback).
        pre: llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`).
        tokens: One entry per id, padded with `[PAD{id}]` up to the model's vocabulary size.
        token_types: `gguf.TokenType` values, one per token.
        scores: Merge priorities for `llama` tokenizers (higher merges first), else None.
        merges: `"left right"` merge rules for `gpt2` tokenizers.
        special_ids: `bos`, `eos`, `unk`, `pad` ids that exist.
        add_bos: Encoding prepends bos (the tokenizer's post-processor does).
        add_eos: Encoding appends eos.
        add_space_prefix: SentencePiece-style only: a space is prepended to the text.
        chat_templates: Named chat templates (`default` is the one written as `tokenizer.chat_template`).
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer (or normalizer) as a flat list of steps (`Sequence`s unrolled)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for child in node.get("pretokenizers", node.get("normalizers", [])) for s in _steps(child)]
    return [node]


def _step_key(step: dict[str, Any]) -> tuple[Any, ...]:
    """The parts of a pre-tokenizer step that change how text is split."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, bool(step.get("use_regex", True)), bool(step.get("add_prefix_space", False))
    if kind == "Digits":
        return kind, bool(step.get("individual_digits", False))
    if kind == "Split":
        pattern = step.get("pattern", {})
        return kind, pattern.get("Regex", pattern.get("String")), step.get("behavior"), bool(step.get("invert"))
    return (kind,)


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str | None:
    """Name llama.cpp's pre-tokenizer equal to a byte-level BPE tokenizer's, from its structure.

    Args:
        tokenizer_json: The parsed `tokenizer.json`.

    Returns:
        `gpt-2` (plain byte-level regex), `smollm` (single digits, then byte-level: SmolLM/StarCoder), `qwen2`,
        `llama-bpe` (Llama 3) or `tekken` (Mistral Nemo): the split regex and the byte-level settings must match
        exactly. None when the pre-tokenizer is none of these.
    """
    normalizers = [s.get("type") for s in _steps(tokenizer_json.get("normalizer"))]
    if any(n != "NFC" for n in normalizers):  # llama.cpp applies no normalizer to BPE text (NFC is harmless)
        return None
    steps = [_step_key(s) for s in _steps(tokenizer_json.get("pre_tokenizer"))]
    if steps == [("ByteLevel", True, False)]:
        return "gpt-2"
    if steps == [("Digits", True), ("ByteLevel", True, False)]:
        return "smollm"
    if len(steps) == 2 and steps[0][0] == "Split" and steps[1] == ("ByteLevel", False, False):
        _, regex, behavior, invert = steps[0]
        if behavior == "Isolated" and not invert:
            return SPLIT_REGEXES.get(regex)
    return None


def _is_sentencepiece_style(tok: dict[str, Any]) -> bool:
    """Llama 2 / Mistral / Gemma style: BPE over characters with `<0xNN>` byte fallback and `▁` for spaces."""
    model = tok.get("model", {})
    pre = [s.get("type") for s in _steps(tok.get("pre_tokenizer"))]
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and pre in ([], ["Metaspace"])


def _space_prefix(tok: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer prepends `▁` to the text (Metaspace scheme or a Prepend normalizer)."""
    for step in _steps(tok.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return any(s.get("type") == "Prepend" for s in _steps(tok.get("normalizer")))


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges, stored either as "a b" strings or as [a, b] pairs."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _looks_special(token: str) -> bool:
    """Added tokens that llama.cpp's converter marks as control tokens even when not flagged special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def gguf_vocab(model_dir: str | Path, vocab_size: int, tokenizer_pre: str | None = None,
               chat_template: str | None = None) -> GGUFVocab:  # fmt: skip
    """Read a model folder's tokenizer as llama.cpp's `tokenizer.ggml.*` metadata.

    Args:
        model_dir: The model folder (`tokenizer.json` and its config files).
        vocab_size: Rows of the model's embedding matrix; the token list is padded to it.
        tokenizer_pre: llama.cpp's pre-tokenizer name, to override the detection (for a tokenizer you know
            matches one of llama.cpp's).
        chat_template: A chat template to use when the folder has none (e.g. an adapter's trained template).

    Returns:
        The vocabulary.

    Raises:
        ExportError: No tokenizer.json, a tokenizer model llama.cpp cannot read (WordLevel, Unigram, WordPiece), an
            unrecognised BPE pre-tokenizer, or more tokens than the model has embedding rows.
    """
    folder = Path(model_dir)
    try:
        tokenizer = Tokenizer.from_dir(folder)
    except TokenizerNotFoundError as e:
        raise ExportError(str(e)) from e
    tok_json = read_json(folder / "tokenizer.json", error=ExportError)
    model = tok_json.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(
            f"{folder}: the tokenizer is a {model.get('type')} model; GGUF export supports BPE tokenizers (byte-level "
            "like Llama 3, Qwen2, SmolLM, or SentencePiece-style with byte fallback like Llama 2 and Mistral)"
        )
    spm = _is_sentencepiece_style(tok_json)
    pre = tokenizer_pre or ("default" if spm else bpe_pre_tokenizer(tok_json))
    if pre is None:
        found = [_step_key(s) for s in _steps(tok_json.get("pre_tokenizer"))]
        raise ExportError(
            f"{folder}: llama.cpp has no pre-tokenizer known to match this tokenizer's ({found}); nomoat recognises "
            f"{', '.join(PRE_TOKENIZERS[:-1])}. If you know which llama.cpp pre-tokenizer splits text the same way, "
            "pass it explicitly (--tokenizer-pre)"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
    if max(vocab.values(), default=-1) >= vocab_size:
        raise ExportError(f"{folder}: the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{vocab_size} embedding rows")  # fmt: skip
    added = tokenizer.backend.get_added_tokens_decoder()  # id -> AddedToken
    unk = tokenizer.unk_token_id
    if unk is None and model.get("unk_token") is not None:  # the BPE model's own unknown token (byte-fallback ones)
        unk = tokenizer.token_to_id(model["unk_token"])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        if i == unk and (spm or i not in added):  # a special token that is also `unk` stays CONTROL (SmolLM2's 0)
            kind = gguf.TokenType.UNKNOWN
        elif i in added:
            special = added[i].special or _looks_special(text)
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            if spm and not special:
                text = text.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalised
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens[i], types[i] = text, int(kind)
    merges = _merge_pairs(model)
    scores = None
    if spm:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest; Hugging Face's
        # BPE merges the pair of lowest rank. Scoring each token by minus the rank of the first merge that makes
        # it gives both the same order (SentencePiece's own scores are in that order too).
        rank: dict[str, int] = {}
        for k, (a, b) in enumerate(merges):
            rank.setdefault(a + b, k)
        scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    probe_plain = tokenizer.encode("a", add_special_tokens=False)
    probe = tokenizer.encode("a", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = {"bos": bos, "eos": eos, "unk": unk, "pad": tokenizer.pad_token_id}
    templates = dict(tokenizer.chat_templates)
    if chat_template and "default" not in templates:
        templates["default"] = chat_template
    return GGUFVocab(
        model="llama" if spm else "gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=[] if spm else [f"{a} {b}" for a, b in merges],
        special_ids={k: v for k, v in ids.items() if v is not None},
        # What the tokenizer's post-processor does, observed rather than read from config flags.
        add_bos=bos is not None and len(probe) > len(probe_plain) and probe[0] == bos,
        add_eos=eos is not None and len(probe) > len(probe_plain) and probe[-1] == eos,
        add_space_prefix=_space_prefix(tok_json) if spm else None,
        chat_templates=templates,
    )


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Add a vocabulary's `tokenizer.*` keys to a GGUF writer."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}  # fmt: skip
    for name, token_id in vocab.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_templates:
        writer.add_chat_template([{"name": k, "template": v} for k, v in vocab.chat_templates.items()])


# ---- tensors ------------------------------------------------------------------------------------------------


def gguf_arch(cfg: ModelConfig) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a model config.

    Raises:
        ExportError: The family (or a feature of it) cannot be written as GGUF yet.
    """
    arch = ARCHS.get(cfg.family)
    if arch is None:
        raise ExportError(
            f"{cfg.family} models are not supported for GGUF export yet (supported: {', '.join(sorted(ARCHS))}); "
            "export a merged Hugging Face folder with --format hf"
        )
    act = "gelu_pytorch_tanh" if arch in GEMMAS else "silu"
    if cfg.hidden_act != act:
        raise ExportError(f"activation {cfg.hidden_act!r} is not supported for GGUF export ({cfg.family} uses {act})")
    if arch in GEMMAS and cfg.query_scale is not None and abs(cfg.query_scale - cfg.head_dim**-0.5) > 1e-9:
        raise ExportError(f"this {cfg.family} model scales queries by query_pre_attn_scalar "
                          f"{cfg.query_scale ** -2:g}; llama.cpp scales by head_dim ({cfg.head_dim})")  # fmt: skip
    return arch


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's q/k rows (per head: first rotary half, then second) to llama.cpp's interleaved order.

    The same operation as `LlamaModel.permute` in llama.cpp's `convert_hf_to_gguf.py`; `n_head` is the number of
    heads the rows belong to (kv heads for k). Works for weights `(rows, cols)`, biases `(rows,)` and LoRA B.
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_to_gguf_name(name: str, tensor_map: gguf.TensorNameMap) -> str:
    """A Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`) as GGUF's (`blk.0.attn_q.weight`).

    Raises:
        ExportError: llama.cpp has no tensor of that name for the architecture.
    """
    mapped = tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ExportError(f"tensor {name} has no GGUF name for this architecture")
    return mapped


def to_llamacpp_layout(name: str, tensor: torch.Tensor, cfg: ModelConfig, arch: gguf.MODEL_ARCH) -> torch.Tensor:
    """llama.cpp's layout of a tensor: q/k rows permuted (llama architecture), Gemma's norm scales stored as 1 + w."""
    if arch in GEMMAS and name.endswith("norm.weight"):
        return tensor + 1
    if arch not in PERMUTED:
        return tensor
    if ".q_proj." in name:
        return permute_qk(tensor, cfg.num_heads)
    if ".k_proj." in name:
        return permute_qk(tensor, cfg.num_kv_heads)
    return tensor


def tensor_type(gguf_name: str, shape: Sequence[int], outtype: str) -> gguf.GGMLQuantizationType:
    """The type a tensor is stored in, as llama.cpp's converter chooses it.

    1-D tensors and norms stay f32 (llama.cpp's kernels want them so); q8_0 falls back to f16 for rows that are not a
    whole number of 32-value blocks.
    """
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return QT.F32
    qtype = OUTTYPES[outtype][1]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return QT.F16 if shape[-1] % block else qtype


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor as the bytes (or numpy array) GGUF stores for `qtype`."""
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == QT.F32:
        return data
    if qtype == QT.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def nbytes(shape: Sequence[int], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes a tensor of `shape` takes in `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape)) if len(shape) else 1
    return n // block * size


def write_tensors(writer: gguf.GGUFWriter, tensors: list[tuple[str, Callable[[], torch.Tensor], Sequence[int]]],
                  outtype: str, out: Path, progress: Progress | None = None) -> None:  # fmt: skip
    """Write header, metadata and tensors, converting each tensor just before it is written (one at a time).

    Args:
        writer: A writer with all metadata added and no tensors yet.
        tensors: `(gguf name, function giving the fp32 tensor, shape)`, in file order.
        outtype: `f32`, `f16` or `q8_0`.
        out: The file to write.
        progress: Called with (bytes written, total bytes) after each tensor.
    """
    types = [tensor_type(name, shape, outtype) for name, _, shape in tensors]
    for (name, _, shape), qtype in zip(tensors, types):
        writer.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes(shape, qtype), raw_dtype=qtype)
    total = sum(nbytes(shape, q) for (_, _, shape), q in zip(tensors, types))
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    done = 0
    for (_, make, shape), qtype in zip(tensors, types):
        writer.write_tensor_data(encode(make(), qtype))
        done += nbytes(shape, qtype)
        if progress is not None:
            progress(done, total)
    writer.close()


def write_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary file beside `out`, then rename it to `out` (no half-written file on failure)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExportError(f"{out} is a folder; a GGUF export writes one file (e.g. {out / 'model.gguf'})")
    with atomic_path(out) as tmp:
        write(tmp)
    return out


# ---- the model file --------------------------------------------------------------------------------------------


def _rope(writer: gguf.GGUFWriter, cfg: ModelConfig, arch: gguf.MODEL_ARCH) -> torch.Tensor | None:
    """Add the rope keys; returns llama.cpp's `rope_freqs` (frequency divisors) for Llama 3 scaling, else None."""
    params = cfg.rope["full_attention"]
    kind = params["rope_type"]
    dim = int(cfg.head_dim * params.get("partial_rotary_factor", 1.0))
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_rope_dimension_count(dim)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":  # the keys llama.cpp's converter writes for YaRN
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params.get("factor") or cfg.max_position_embeddings
                                             / params["original_max_position_embeddings"]))  # fmt: skip
        writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
        for key, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):  # fmt: skip
            if params.get(key) is not None:
                add(float(params[key]))
    elif kind == "llama3":
        if arch != gguf.MODEL_ARCH.LLAMA:
            raise ExportError(f"llama3 rope scaling on a {cfg.family} model is not supported for GGUF export")
        # llama.cpp divides each rotary frequency by the matching entry of `rope_freqs`.
        default = dict(params, rope_type="default")
        base, _ = rope_inv_freq(default, cfg.head_dim, cfg.max_position_embeddings)
        scaled, _ = rope_inv_freq(params, cfg.head_dim, cfg.max_position_embeddings)
        return (base.double() / scaled.double()).float()
    elif kind != "default":
        raise ExportError(f"rope type {kind!r} is not supported for GGUF export of {cfg.family} models")
    return None


def _architecture(writer: gguf.GGUFWriter, cfg: ModelConfig, outtype: str) -> None:
    """Add the `{arch}.*` hyperparameters llama.cpp reads."""
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)  # llama.cpp assumes hidden/heads otherwise (wrong with an explicit head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # llama.cpp reads a Phi-3 window only to warn that it runs Phi-3 in full (llama-model.cpp, LLM_ARCH_PHI3: "Phi SWA
    # is currently disabled"), so the key is left out; `_warn_sliding_window` tells the user instead.
    if cfg.sliding_window and "sliding_attention" in cfg.layer_types and cfg.family != "phi3":
        writer.add_sliding_window(int(cfg.sliding_window))
        if cfg.family == "gemma3_text":  # llama.cpp otherwise assumes five sliding layers of six
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if cfg.attn_logit_softcap is not None:
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcap))
    if cfg.final_logit_softcap is not None:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcap))


def _general(writer: gguf.GGUFWriter, name: str, n_params: int) -> None:
    """The `general.*` keys llama.cpp and the Hub show: name, basename, size label."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_basename(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))


def model_name(spec: str | Path) -> str:
    """The name a model goes by in metadata: a Hub id's NAME, `demo`, else the folder's (or file's) name."""
    from nomoat.util.hub import parse_hub_id

    hub_id = parse_hub_id(spec)
    return hub_id.repo.split("/")[-1] if hub_id else Path(spec).expanduser().name or str(spec)


def check_outtype(outtype: str) -> None:
    """Raise ExportError for an outtype other than f32, f16, q8_0."""
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}: use {', '.join(OUTTYPES)}")


def _warn_sliding_window(cfg: ModelConfig, arch: gguf.MODEL_ARCH) -> None:
    window = cfg.sliding_window
    # llama.cpp applies the windows of Gemma 2 and 3; it runs Mistral's and Phi-3's in full.
    if arch in GEMMAS:
        return
    if window and "sliding_attention" in cfg.layer_types and window < cfg.max_position_embeddings:
        warnings.warn(
            f"this {cfg.family} model attends within a sliding window of {window} tokens; llama.cpp runs its "
            f"architecture with full attention, so outputs match only for contexts up to {window} tokens",
            stacklevel=3,
        )


def export_gguf(
    model_dir: str | Path,
    adapters: Sequence[tuple[str | Path, float]],
    out_file: str | Path,
    outtype: str = "f16",
    tokenizer_pre: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Merge adapters into a base model and write the result as a GGUF file (llama.cpp, Ollama).

    The merge runs in fp32 (as `export_merged`), then each tensor is converted to `outtype` as it is written.
    Supported families: llama (Llama 2/3/3.1/3.2, SmolLM2, TinyLlama), mistral, qwen2 (Qwen2/2.5), qwen3, gemma2,
    gemma3 (text), phi3.

    Args:
        model_dir: The base model folder (config.json, safetensors, tokenizer.json).
        adapters: `(adapter folder, weight)` pairs, merged in order; empty for the base model alone.
        out_file: The `.gguf` file to write (replaced atomically if it exists).
        outtype: `f32`, `f16` or `q8_0` for the 2-D weights; 1-D tensors are always f32.
        tokenizer_pre: llama.cpp's pre-tokenizer name, to override the detection from tokenizer.json.
        progress: Called with (bytes written, total bytes) after each tensor.

    Returns:
        The written file.

    Raises:
        ExportError: An unsupported family, rope type or tokenizer, or a base or adapter that cannot be read.
    """
    check_outtype(outtype)
    name = model_name(model_dir)
    model_dir = Path(local_path(Path(model_dir).expanduser()))  # `demo` and Hub ids name folders too
    try:
        arch = gguf_arch(load_config(model_dir))  # fail before reading any weights
        model = load_model(model_dir, dtype=torch.float32, device="cpu")
        cfg = model.config
        merged = merge_adapters(model, adapters)
    except (CheckpointError, AdapterError, UnsupportedModelError) as e:
        raise ExportError(str(e)) from e
    _warn_sliding_window(cfg, arch)
    template = next((a.chat_template for a in merged if a.chat_template), None)
    vocab = gguf_vocab(model_dir, cfg.vocab_size, tokenizer_pre, chat_template=template)
    tensor_map = gguf.get_tensor_name_map(arch, cfg.num_layers)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
        _general(writer, name, sum(p.numel() for p in model.parameters()))
        _architecture(writer, cfg, outtype)
        rope_freqs = _rope(writer, cfg, arch)
        write_vocab(writer, vocab)
        tensors: list[tuple[str, Callable[[], torch.Tensor], Sequence[int]]] = []
        if rope_freqs is not None:
            tensors.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", lambda: rope_freqs,
                            tuple(rope_freqs.shape)))  # fmt: skip
        # named_parameters() lists a tied head once (as the embeddings): llama.cpp then reuses token_embd. Phi-3's
        # projections go back to its fused qkv_proj / gate_up_proj (llama.cpp's attn_qkv / ffn_up).
        params = fuse_for_save({n: p.detach() for n, p in model.named_parameters()}, cfg)
        for hf_name, param in params.items():
            make = lambda n=hf_name, p=param: to_llamacpp_layout(n, p, cfg, arch)  # noqa: E731
            tensors.append((hf_to_gguf_name(hf_name, tensor_map), make, tuple(param.shape)))
        write_tensors(writer, tensors, outtype, tmp, progress)

    return write_atomically(out_file, write)
