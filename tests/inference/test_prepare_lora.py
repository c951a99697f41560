"""`prepare` on a model with LoRA layers injected (a model under training): it decodes with the live adapter."""

from __future__ import annotations

import peft
import torch

from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.inference import prepare
from nomoat.lora import load_adapter, lora_layers
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.tokenizer import Tokenizer

from hf_models import load_hf, make_hf_model, save_word_tokenizer


def _peft_model(model_dir, adapter_dir, seed: int = 4):
    """A peft LoRA (dropout 0.1, B non-zero) over the tiny model, saved to `adapter_dir`; returned in eval mode."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    lora = peft.get_peft_model(load_hf(model_dir), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_pretrained(adapter_dir)
    return lora.eval()


def _greedy(peft_model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """peft's greedy tokens by full forwards, and the logits of the whole sequence (T, V)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(peft_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt) :], peft_model(input_ids=torch.tensor([ids])).logits[0]


def test_prepare_decodes_a_lora_injected_model_with_its_live_adapter(tmp_path):
    make_hf_model("llama3", tmp_path / "m")
    save_word_tokenizer(tmp_path / "m")
    reference = _peft_model(tmp_path / "m", tmp_path / "a")
    model = load_model(tmp_path / "m", "float32", "cpu")
    load_adapter(model, tmp_path / "a")  # injects LoRA layers, as training does
    model.train()
    prompt = [5, 9, 33, 100, 7, 64]
    want_tokens, want_logits = _greedy(reference, prompt, 6)

    dm = prepare(model)
    assert all(layer.training for layer in lora_layers(model).values())  # the user's layers keep their mode
    model.eval()  # no adapter dropout while decoding (the caller's choice, as for any forward)
    seq = prompt + want_tokens
    cache = KVCache(dm.config, 1, 64, torch.float32, "cpu")
    with torch.inference_mode():
        pre = dm(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, rows=slice(0, 1))[0]
        steps = [dm(torch.tensor([[t]]), torch.tensor([[len(prompt) + i]]), cache, rows=slice(0, 1))[0, -1]
                 for i, t in enumerate(want_tokens[:-1])]  # fmt: skip
    got = torch.cat([pre, torch.stack(steps)])  # (T - 1, V): logits of positions 0 .. T - 2
    torch.testing.assert_close(got, want_logits[: len(seq) - 1], atol=1e-4, rtol=1e-4)

    engine = Engine(model, Tokenizer.from_dir(tmp_path / "m"), max_running=1, prefix_cache_bytes=0)
    out = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    assert out.token_ids == want_tokens

    with torch.no_grad():  # the adapter changes after prepare (an optimizer step): decoding follows it
        for layer in lora_layers(model).values():
            layer.lora_B.weight.mul_(-1)
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
    flipped, _ = _greedy(reference, prompt, 6)
    assert flipped != want_tokens  # the change matters, so the check means something
    out = engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True))
    assert out.token_ids == flipped
