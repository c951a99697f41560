"""GGUF files in: tiny random models written as llama.cpp would, loaded by nomoat and by transformers' GGUF loader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from nomoat.models.checkpoint import CheckpointError, load_config, load_model
from nomoat.models.gguf import GGUFError
from nomoat.util.errors import ModelError

from hf_models import hf_config

QT = gguf.GGMLQuantizationType
# tiny model (tests/hf_models.py) -> llama.cpp architecture
ARCH = {"llama3": "llama", "llama_tied_mqa": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
        "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}  # fmt: skip
# Overrides that make a tiny config expressible in GGUF metadata (no llama3 rope scaling keys, Gemma's query scale
# = head_dim as llama.cpp assumes, Gemma 3's layer pattern of 6, no sliding window for the llama architecture), with
# the head sizes transformers' GGUF loader assumes (it reads no head_dim for Qwen3 nor a query scale for Gemma).
GGUF_OVERRIDES = {
    "llama3": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "mistral": {"sliding_window": None},
    "qwen3": {"head_dim": 128},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "rope_parameters": None, "layer_types": None,
                    "sliding_window_pattern": 6, "final_logit_softcapping": None},
    # transformers' GGUF loader ignores rope.dimension_count: full rotary here (partial: test_partial_rotary).
    "phi3": {"sliding_window": None, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
}


def _tensor_data(name: str, t: torch.Tensor, qtype: QT) -> tuple[np.ndarray, QT]:
    arr = t.detach().float().numpy()
    if arr.ndim == 1 or name.endswith("norm.weight"):
        return arr.astype(np.float32), QT.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == QT.F32 or arr.shape[-1] % block:
        return arr.astype(np.float32), QT.F32
    if qtype == QT.F16:
        return arr.astype(np.float16), QT.F16
    if qtype in K_SCALES:
        return random_k_blocks(arr.shape, qtype), qtype
    return gguf.quants.quantize(arr, qtype), qtype


# K-quant types (the gguf package cannot quantize to them): byte offsets of their fp16 scales in a block.
K_SCALES = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_k_blocks(shape: tuple[int, ...], qtype: QT) -> np.ndarray:
    """Random K-quant blocks for a `shape` weight, their fp16 super-block scales set to small finite values."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(sum(shape))
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for off in K_SCALES[qtype]:
        scale = rng.uniform(0.001, 0.01, data.shape[:2]).astype(np.float16)
        data[:, :, off : off + 2] = scale.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(shape[0], -1)


def write_gguf(model: torch.nn.Module, case: str, out: Path, qtype: QT, tokens: int) -> Path:
    """Write an HF model as llama.cpp's converter does (names, q/k permutation, Gemma norms + 1), weights in `qtype`."""
    cfg = model.config
    arch = ARCH[case]
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    w = gguf.GGUFWriter(str(out), arch)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    rope = getattr(cfg, "rope_parameters", None) or {}
    w.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 1.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float((theta or {}).get("rope_theta", 10000.0)))
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(tokens)])
    w.add_token_types([1] * tokens)
    w.add_token_merges([])
    w.add_pad_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tmap = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "llama" and ".q_proj." in name:
            t = _permute(t, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            t = _permute(t, cfg.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        if arch == "phi3" and "gate_up_proj" in name:
            gname = f"blk.{name.split('.')[2]}.ffn_up.weight"
        else:
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        data, kind = _tensor_data(gname, t, qtype)
        w.add_tensor(gname, data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def make(case: str, tmp: Path, qtype: QT, seed: int = 0) -> Path:
    """A tiny random model of `case` written as a GGUF file with 2-D weights in `qtype`."""
    return write_gguf(hf_model(case, seed), case, tmp / f"{case}-{qtype.name}.gguf", qtype, hf_config(case).vocab_size)


def hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = hf_config(case, **GGUF_OVERRIDES.get(case, {}))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return ref.eval()(ids).logits


def nomoat_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = load_model(path, dtype="float32", device="cpu")
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


CASES = [
    ("llama3", QT.F32), ("llama3", QT.Q8_0), ("llama_tied_mqa", QT.Q4_0), ("mistral", QT.Q4_1),
    ("qwen2", QT.F16), ("qwen2", QT.Q5_0), ("qwen3", QT.BF16), ("qwen3", QT.Q5_1),
    ("gemma2", QT.Q8_0), ("gemma2", QT.F32), ("gemma3_text", QT.F32), ("phi3", QT.Q4_0), ("phi3", QT.F32),
    ("mistral", QT.F32),
]  # fmt: skip


@pytest.mark.parametrize(("case", "qtype"), CASES, ids=[f"{c}-{q.name}" for c, q in CASES])
def test_logits_match_transformers_gguf(tmp_path: Path, case: str, qtype: QT) -> None:
    path = make(case, tmp_path, qtype)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, ref = nomoat_logits(path, ids), hf_gguf_logits(path, ids)
    print(f"{case} {qtype.name}: max |diff| {(ours - ref).abs().max().item():.2e}")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    if qtype == QT.F32:  # lossless: the original model is a second, independent reference
        with torch.no_grad():
            torch.testing.assert_close(ours, hf_model(case)(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K], ids=lambda q: q.name)
def test_k_quants_match_transformers_gguf(tmp_path: Path, qtype: QT) -> None:
    torch.manual_seed(0)
    cfg = hf_config("llama_tied_mqa", hidden_size=256, intermediate_size=512)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    path = write_gguf(model, "llama_tied_mqa", tmp_path / f"k-{qtype.name}.gguf", qtype, cfg.vocab_size)
    assert qtype in {gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    ours, ref = nomoat_logits(path, ids), hf_gguf_logits(path, ids)
    print(f"llama {qtype.name}: max |diff| {(ours - ref).abs().max().item():.2e}")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_partial_rotary_matches_original(tmp_path: Path) -> None:
    """Phi-3 with half the head rotated (rope.dimension_count): the original model is the reference."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("phi3", sliding_window=None), dtype=torch.float32)
    path = write_gguf(model.eval(), "phi3", tmp_path / "phi3-partial.gguf", QT.F32, hf_config("phi3").vocab_size)
    assert load_config(path).rope["full_attention"]["partial_rotary_factor"] == 0.5
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(nomoat_logits(path, ids), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_llama3_rope_from_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.1-style rope scaling survives as `rope_freqs` (written by the exporter as llama.cpp's converter does)."""
    from gguf_cases import build
    from nomoat.export.gguf import export_gguf

    model_dir, _ = build(tmp_path, "llama3")
    out = export_gguf(model_dir, [], tmp_path / "l3.gguf", outtype="f32")
    assert load_config(out).rope["full_attention"]["rope_type"] == "llama3"
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(nomoat_logits(out, ids), ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_bf16_load_and_config(tmp_path: Path) -> None:
    path = make("qwen2", tmp_path, QT.Q8_0)
    model = load_model(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = load_config(path)
    assert (cfg.family, cfg.num_kv_heads, cfg.tie_word_embeddings, cfg.qkv_bias) == ("qwen2", 2, True, True)


def test_unsupported_architecture_and_type(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="mamba") as e:
        load_model(tmp_path / "x.gguf", device="cpu")
    assert "qwen2" in e.value.hint
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        load_model(tmp_path / "missing.gguf", device="cpu")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    from nomoat.models.gguf import read_tensor

    class Fake:
        name, tensor_type, shape, data = "blk.0.attn_q.weight", int(QT.IQ2_XXS), [256, 1], np.zeros(66, np.uint8)

    with pytest.raises(ModelError, match="IQ2_XXS") as e:
        read_tensor(Fake())
    assert "Q4_K" in e.value.hint
