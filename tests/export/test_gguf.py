"""GGUF export: files read back with `gguf.GGUFReader` and compared with transformers + peft and with tokenizer.json.

The references are independent of nomoat: merged weights come from peft's `merge_and_unload`, the q/k row order
llama.cpp expects is written out index by index (not with the reshape trick the exporter uses), `rope_freqs` is
llama.cpp's converter formula, and the tokenizer is compared with the raw tokenizer.json.

Tolerances (per element, against the fp32 peft merge):
- f32: 1e-6 absolute (nomoat and peft add B @ A in a different order).
- f16: round-to-nearest relative error 2**-11, plus 1e-6 absolute for the above.
- q8_0: each block of 32 values is stored as int8 times a scale d = max|x| / 127 that is itself f16; the error is at
  most d / 2 (rounding to an integer) plus 127 * d * 2**-11 (the f16 scale), i.e. 0.5625 d; we allow 0.57 d + 1e-6.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
import transformers
from gguf.quants import dequantize
from tokenizers import pre_tokenizers
from typer.testing import CliRunner

from gguf_cases import CASES, PROJECTIONS, SPECIALS, TEMPLATE, TT, build
from nomoat.cli import app
from nomoat.export.gguf import export_gguf
from nomoat.export.gguf_lora import export_gguf_lora
from nomoat.export.merged import ExportError

from hf_models import hf_config, save_word_tokenizer
from tokenizer_utils import byte_level_bpe, write_folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gguf")
    return {case: build(root, case) for case in CASES}


def peft_merged(model_dir: Path, adapter_dir: Path | None, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The reference: transformers' base weights plus `weight` times peft's merged delta."""
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    if adapter_dir is None:
        return state
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    return {k: state[k] + weight * (merged[k] - state[k]) for k in state}


def interleave_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order, index by index: within a head, GGUF row 2i+j is HF row i + j * head_dim / 2."""
    rows = w.shape[0]
    hd = rows // n_head
    order = [h * hd + i + j * (hd // 2) for h in range(n_head) for i in range(hd // 2) for j in range(2)]
    return w[order]


def gguf_name(hf: str) -> str:
    """Hugging Face name -> GGUF name, written out for the tensors these models have."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.N.<module>.<proj>.<weight|bias>
    leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    return f"blk.{parts[2]}.{leaf[parts[-2]]}.{parts[-1]}"


def expected_tensors(model_dir: Path, ref: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> expected fp32 tensor (q/k permuted for llama), tied heads dropped."""
    hf = json.loads((model_dir / "config.json").read_text())
    out = {}
    for name, t in ref.items():
        if name == "lm_head.weight" and hf.get("tie_word_embeddings"):
            continue
        if arch == "llama" and ".q_proj." in name:
            t = interleave_rows(t, hf["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = interleave_rows(t, hf["num_key_value_heads"])
        out[gguf_name(name)] = t
    return out


def read(path: Path) -> tuple[dict[str, object], dict[str, gguf.ReaderTensor]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def as_torch(t: gguf.ReaderTensor) -> torch.Tensor:
    """A tensor dequantized to fp32 in PyTorch's (row-major, un-reversed) shape."""
    data = dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(tuple(int(n) for n in reversed(t.shape)))


def check_close(got: torch.Tensor, want: torch.Tensor, qtype: gguf.GGMLQuantizationType, name: str) -> float:
    """Assert the documented bound for the stored type; return the max error."""
    err = (got - want).abs()
    if qtype == gguf.GGMLQuantizationType.F32:
        bound = torch.full_like(want, 1e-6)
    elif qtype == gguf.GGMLQuantizationType.F16:
        bound = want.abs() * 2**-11 + 1e-6
    else:
        amax = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True).expand(-1, 32).reshape(want.shape)
        bound = 0.57 * amax / 127 + 1e-6
    assert bool((err <= bound).all()), f"{name}: max error {err.max():.3g} over the {qtype.name} bound"
    return float(err.max())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_merged_gguf_tensors_and_metadata(models, tmp_path, case, outtype):
    model_dir, adapter_dir = models[case]
    family, _, arch, tok_model, tok_pre = CASES[case]
    weight = 0.5 if case == "qwen2" else 1.0  # a weighted merge too
    if case == "mistral":
        with pytest.warns(UserWarning, match="sliding window of 8"):
            out = export_gguf(model_dir, [(adapter_dir, weight)], tmp_path / "m.gguf", outtype=outtype)
    else:
        out = export_gguf(model_dir, [(adapter_dir, weight)], tmp_path / "m.gguf", outtype=outtype)
    fields, tensors = read(out)
    hf = json.loads((model_dir / "config.json").read_text())
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[outtype]
    expected_meta = {
        "general.architecture": arch, "general.type": "model", "general.name": case, "general.file_type": file_type,
        f"{arch}.context_length": hf["max_position_embeddings"], f"{arch}.embedding_length": hf["hidden_size"],
        f"{arch}.block_count": hf["num_hidden_layers"], f"{arch}.feed_forward_length": hf["intermediate_size"],
        f"{arch}.attention.head_count": hf["num_attention_heads"],
        f"{arch}.attention.head_count_kv": hf["num_key_value_heads"], f"{arch}.vocab_size": hf["vocab_size"],
        f"{arch}.rope.dimension_count": head_dim, f"{arch}.attention.key_length": head_dim,
        "tokenizer.ggml.model": tok_model, "tokenizer.ggml.pre": tok_pre, "tokenizer.chat_template": TEMPLATE,
    }  # fmt: skip
    for key, value in expected_meta.items():
        assert fields[key] == value, key
    rope = hf.get("rope_parameters") or {}
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(hf["rms_norm_eps"], rel=1e-6)

    want = expected_tensors(model_dir, peft_merged(model_dir, adapter_dir, weight), arch)
    if rope.get("rope_type") == "llama3":
        want["rope_freqs.weight"] = llama3_rope_factors(rope, head_dim)
    assert set(tensors) == set(want)
    assert ("output.weight" in tensors) == (not hf.get("tie_word_embeddings"))
    if case in ("qwen2", "llama_bias"):
        assert "blk.0.attn_q.bias" in tensors and "blk.1.attn_k.bias" in tensors
    for name, t in tensors.items():
        shape = tuple(want[name].shape)
        assert tuple(int(n) for n in t.shape) == shape[::-1], name  # GGUF stores dimensions reversed
        one_d = len(shape) == 1 or name.endswith("_norm.weight")
        expected_type = "F32" if one_d or outtype == "f32" else {"f16": "F16", "q8_0": "Q8_0"}[outtype]
        assert t.tensor_type.name == expected_type, name
        check_close(as_torch(t), want[name].float(), t.tensor_type, name)


def llama3_rope_factors(rope: dict, dim: int) -> torch.Tensor:
    """llama.cpp's converter (`LlamaModel.generate_extra_tensors`), transcribed."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("case", ["llama3", "qwen2", "mistral"])
def test_tokenizer_metadata_equals_tokenizer_json(models, tmp_path, case):
    model_dir, _ = models[case]
    with pytest.warns(UserWarning) if case == "mistral" else contextlib.nullcontext():
        out = export_gguf(model_dir, [], tmp_path / "base.gguf", outtype="f16")
    fields, _ = read(out)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    n_vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok["added_tokens"]}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == n_vocab
    for i in range(n_vocab):
        assert tokens[i] == by_id.get(i, f"[PAD{i}]"), i
    spm = case == "mistral"
    for i in range(n_vocab):
        if i not in by_id:
            want = TT.UNUSED
        elif by_id[i] == tok["model"]["unk_token"]:
            want = TT.UNKNOWN
        elif i in added:
            want = TT.CONTROL if added[i]["special"] else TT.USER_DEFINED
        elif spm and by_id[i].startswith("<0x"):
            want = TT.BYTE
        else:
            want = TT.NORMAL
        assert types[i] == want, (i, by_id.get(i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    if spm:  # SentencePiece-style: no merges; each merged piece scored by minus its merge rank
        assert "tokenizer.ggml.merges" not in fields
        scores = fields["tokenizer.ggml.scores"]
        for k, m in enumerate(merges[:50]):
            piece = m.replace(" ", "")
            if merges.index(m) == min(j for j, x in enumerate(merges) if x.replace(" ", "") == piece):
                assert scores[tok["model"]["vocab"][piece]] == -k
        assert fields["tokenizer.ggml.add_space_prefix"] is True
    else:
        assert fields["tokenizer.ggml.merges"] == merges
    vocab = {**tok["model"]["vocab"], **{a["content"]: a["id"] for a in tok["added_tokens"]}}
    assert fields["tokenizer.ggml.bos_token_id"] == vocab["<s>"]
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["</s>"]
    assert fields["tokenizer.ggml.add_bos_token"] is True  # both post-processors prepend <s>
    assert fields["tokenizer.ggml.add_eos_token"] is False
    assert ("tokenizer.ggml.padding_token_id" in fields) == ("<pad>" in vocab)
    assert ("tokenizer.ggml.unknown_token_id" in fields) == (tok["model"]["unk_token"] is not None)


@pytest.mark.parametrize("case", ["llama3", "qwen2", "llama_bias"])
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_gguf_lora_tensors(models, tmp_path, case, outtype):
    model_dir, adapter_dir = models[case]
    arch = CASES[case][2]
    out = export_gguf_lora(model_dir, adapter_dir, tmp_path / "a.gguf", outtype=outtype)
    fields, tensors = read(out)
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(8.0)
    hf = json.loads((model_dir / "config.json").read_text())
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert len(tensors) == len(state) == 2 * 7 * hf["num_hidden_layers"]
    for key, value in state.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        base = gguf_name(module + ".weight")
        if "lora_A" in key:
            t, want = tensors[base + ".lora_a"], value
        else:
            t, want = tensors[base + ".lora_b"], value
            if arch == "llama" and ".q_proj" in module:
                want = interleave_rows(value, hf["num_attention_heads"])
            elif arch == "llama" and ".k_proj" in module:
                want = interleave_rows(value, hf["num_key_value_heads"])
        assert tuple(int(n) for n in t.shape) == tuple(want.shape)[::-1], key
        if outtype == "q8_0" and want.shape[-1] % 32:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, key  # rank 4 rows cannot be q8_0 blocks
        check_close(as_torch(t), want, t.tensor_type, key)


def test_gguf_lora_rslora_alpha_and_refusals(models, tmp_path):
    model_dir, adapter_dir = models["llama3"]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    rs = tmp_path / "rs"
    rs.mkdir()
    (rs / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    fields, _ = read(export_gguf_lora(model_dir, rs, tmp_path / "rs.gguf"))
    # llama.cpp scales by alpha / r: alpha / sqrt(r) needs alpha * sqrt(r) = 8 * 2.
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ExportError, match="DoRA"):
        export_gguf_lora(model_dir, rs, tmp_path / "dora.gguf")
    tied_dir, tied_adapter = models["llama_tied"]
    lm = tmp_path / "lm"
    lm.mkdir()
    from safetensors.torch import load_file, save_file

    state = load_file(str(tied_adapter / "adapter_model.safetensors"))
    state["base_model.model.lm_head.lora_A.weight"] = torch.randn(4, 64)
    n_vocab = json.loads((tied_dir / "config.json").read_text())["vocab_size"]
    state["base_model.model.lm_head.lora_B.weight"] = torch.randn(n_vocab, 4)
    save_file(state, str(lm / "adapter_model.safetensors"))
    lm_cfg = json.loads((tied_adapter / "adapter_config.json").read_text())
    (lm / "adapter_config.json").write_text(json.dumps({**lm_cfg, "target_modules": [*PROJECTIONS, "lm_head"]}))
    with pytest.raises(ExportError, match="tied"):
        export_gguf_lora(tied_dir, lm, tmp_path / "lm.gguf")
    assert not list(tmp_path.glob("*.tmp")), "a failed export left a temporary file"


def test_unsupported_inputs_fail_clearly(tmp_path):
    word = tmp_path / "word"
    word.mkdir()
    transformers.AutoModelForCausalLM.from_config(hf_config("llama3")).save_pretrained(word)
    save_word_tokenizer(word)
    with pytest.raises(ExportError, match="WordLevel"):
        export_gguf(word, [], tmp_path / "w.gguf")
    odd = tmp_path / "odd"
    tok = byte_level_bpe()
    data = json.loads(tok.to_str())
    data["pre_tokenizer"] = json.loads(pre_tokenizers.Whitespace().__getstate__())
    write_folder(odd, type(tok).from_str(json.dumps(data)), config=SPECIALS)
    transformers.AutoModelForCausalLM.from_config(hf_config("llama3", vocab_size=768)).save_pretrained(odd)
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        export_gguf(odd, [], tmp_path / "o.gguf")
    fields, _ = read(export_gguf(odd, [], tmp_path / "o.gguf", tokenizer_pre="gpt-2"))  # the user's override
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    gemma = tmp_path / "gemma"
    transformers.AutoModelForCausalLM.from_config(hf_config("gemma2", vocab_size=768)).save_pretrained(gemma)
    write_folder(gemma, tok, config=SPECIALS)
    # Every family exports now; a Gemma whose query scale llama.cpp cannot express is refused with the reason.
    with pytest.raises(ExportError, match="query_pre_attn_scalar 24; llama.cpp scales by head_dim"):
        export_gguf(gemma, [], tmp_path / "g.gguf")
    with pytest.raises(ExportError, match="outtype"):
        export_gguf(gemma, [], tmp_path / "g.gguf", outtype="q4_0")


def test_export_command_gguf(models, tmp_path):
    model_dir, adapter_dir = models["qwen2"]
    runner = CliRunner()
    out = tmp_path / "q.gguf"
    ok = runner.invoke(app, ["export", str(model_dir), "--adapter", f"{adapter_dir}:0.5", "--format", "gguf",
                             "--outtype", "q8_0", "--out", str(out)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    fields, tensors = read(out)
    assert fields["general.file_type"] == 7 and tensors["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    want = peft_merged(model_dir, adapter_dir, 0.5)["model.layers.1.mlp.down_proj.weight"]
    check_close(as_torch(tensors["blk.1.ffn_down.weight"]), want, gguf.GGMLQuantizationType.Q8_0, "down")
    again = runner.invoke(app, ["export", str(model_dir), "--format", "gguf", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["export", str(model_dir), "--format", "gguf", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert read(out)[0]["general.file_type"] == 1  # f16 by default

    lora = tmp_path / "a.gguf"
    ok = runner.invoke(app, ["export", str(model_dir), "--adapter", str(adapter_dir), "--format", "gguf-lora",
                             "--out", str(lora)])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert read(lora)[0]["general.type"] == "adapter"
    bad = {
        "exactly one adapter": ["--format", "gguf-lora", "--out", str(tmp_path / "x.gguf")],
        "is a folder": ["--format", "gguf", "--out", str(tmp_path)],
        "unknown format": ["--format", "onnx", "--out", str(tmp_path / "x")],
        "--outtype f32, f16 or q8_0": ["--format", "gguf", "--dtype", "bfloat16", "--out", str(tmp_path / "y.gguf")],
        "for GGUF": ["--outtype", "f16", "--out", str(tmp_path / "hf")],
        "unknown GGUF outtype": ["--format", "gguf", "--outtype", "q4_k", "--out", str(tmp_path / "z.gguf")],
    }
    for message, args in bad.items():
        res = runner.invoke(app, ["export", str(model_dir), *args])
        assert res.exit_code == 2 and message in res.output, (message, res.output)
