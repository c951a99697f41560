"""oneDNN-packed linear layers for generation: same logits as the plain model, same greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.models.checkpoint import load_model
from nomoat.models.packed import PackedLinear, pack_model, packing_available
from nomoat.tokenizer import Tokenizer

from hf_models import make_hf_model, padded_batch, save_word_tokenizer

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear ops")


@pytest.mark.parametrize("name", ["llama3", "llama_bias", "qwen2", "gemma2", "phi3"])
def test_packed_logits_and_greedy(name, tmp_path):
    hf = make_hf_model(name, tmp_path)
    save_word_tokenizer(tmp_path)
    plain = load_model(tmp_path, "float32", "cpu")
    packed = load_model(tmp_path, "float32", "cpu")
    n_linear = sum(type(m) is nn.Linear for m in packed.modules())
    assert pack_model(packed) == n_linear and not any(type(m) is nn.Linear for m in packed.modules())
    assert packed.model.layers[0].self_attn.q_proj.__class__ is PackedLinear  # same module paths
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(packed(ids, attention_mask=mask), plain(ids, attention_mask=mask),
                                   atol=1e-4, rtol=1e-4)
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(2))
    hf.generation_config.eos_token_id = None
    ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    out = Engine(packed, Tokenizer.from_dir(tmp_path)).generate(
        prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True))
    assert out.token_ids == ref


def test_only_fp32_cpu_is_packed(tmp_path):
    make_hf_model("llama3", tmp_path)
    model = load_model(tmp_path, "bfloat16", "cpu")
    assert pack_model(model) == 0
