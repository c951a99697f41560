"""A model under training decodes through the compiled stack with its live adapter (`nomoat.inference.live`).

References: transformers + peft for the logits; the training model's own forward after an optimizer step (the
adapter the stack reads must be the one just trained, with no stale copy).
"""

from __future__ import annotations

import peft
import pytest
import torch

from nomoat import kernels
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.inference import prepare
from nomoat.inference.live import LiveLoRALinear
from nomoat.lora import disable_lora, load_adapter, lora_layers, merge_lora, unmerge_lora
from nomoat.models.checkpoint import load_model
from nomoat.models.kv_cache import KVCache
from nomoat.tokenizer import Tokenizer

from hf_models import load_hf, make_hf_model, save_word_tokenizer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the decode stack needs the compiled kernels")

PROMPT = [5, 9, 33, 100, 7, 64]
FED = [12, 40, 3, 77, 21]  # tokens fed one at a time after the prompt (decode steps)


def _models(tmp_path):
    """A peft LoRA over a tiny Llama (B non-zero, saved), and nomoat's model with that adapter injected (trainable)."""
    make_hf_model("llama3", tmp_path / "m")
    save_word_tokenizer(tmp_path / "m")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"])  # fmt: skip
    reference = peft.get_peft_model(load_hf(tmp_path / "m"), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reference.save_pretrained(tmp_path / "a")
    model = load_model(tmp_path / "m", "float32", "cpu")
    load_adapter(model, tmp_path / "a")
    return reference.eval(), model.eval()


def _decode(dm) -> tuple[torch.Tensor, int]:
    """Logits (T, V) of prompt + fed tokens: a prefill, then one decode step per fed token; and the stack's steps."""
    cache = KVCache(dm.config, 1, 64, torch.float32, "cpu")
    before = dm.stack_steps
    with torch.inference_mode():
        pre = dm(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, rows=slice(0, 1))[0]
        steps = [dm(torch.tensor([[t]]), torch.tensor([[len(PROMPT) + i]]), cache, rows=slice(0, 1))[0, -1]
                 for i, t in enumerate(FED)]  # fmt: skip
    return torch.cat([pre, torch.stack(steps)]), dm.stack_steps - before


def _copy_into_peft(model, reference) -> None:
    """The nomoat model's adapter weights into the peft model (same layers, peft's names)."""
    ours = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(ours[name.removeprefix("base_model.model.").replace(".default", "")])


def _lower(model, prompt: list[int], completion: list[int]) -> None:
    """One AdamW step (lr 0.2) on the adapter that lowers `completion`'s probability after `prompt`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2)
    model.train()
    seq = torch.tensor([prompt + completion])
    logps = model(seq)[0, len(prompt) - 1 : -1].log_softmax(-1)  # (len(completion), V)
    logps.gather(1, torch.tensor(completion)[:, None]).sum().backward()
    opt.step()
    model.eval()


def test_the_stack_decodes_the_live_adapter_as_peft_and_follows_an_optimizer_step(tmp_path):
    reference, model = _models(tmp_path)
    dm = prepare(model)
    assert dm.plan is not None  # the compiled stack runs the model under training
    live = [m for m in dm.net.modules() if isinstance(m, LiveLoRALinear)]
    assert len(live) == len(lora_layers(model)) == 7 * model.config.num_layers
    ids = torch.tensor([PROMPT + FED])
    with torch.no_grad():
        want = reference(input_ids=ids).logits[0]
        ours = model(ids)[0]
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)  # the training model equals peft
    got, steps = _decode(dm)
    assert steps == len(FED)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # An optimizer step on the training model: the same decode model (not prepared again) follows it.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    model.train()
    model(ids)[0].logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    _copy_into_peft(model, reference)
    with torch.no_grad():
        want2 = reference(input_ids=ids).logits[0]
    assert (want2 - want).abs().max() > 0.05  # the step matters, so the check means something
    got2, steps = _decode(dm)
    assert steps == len(FED)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)


def test_the_live_stack_switches_off_with_disable_lora_and_decodes_a_merged_base(tmp_path):
    reference, model = _models(tmp_path)
    dm = prepare(model)
    ids = torch.tensor([PROMPT + FED])
    with torch.no_grad(), reference.disable_adapter():
        base = reference(input_ids=ids).logits[0]
    with torch.no_grad():
        adapted = reference(input_ids=ids).logits[0]
    with disable_lora(model):
        got, steps = _decode(dm)
    assert steps == len(FED)
    torch.testing.assert_close(got, base, atol=1e-4, rtol=1e-4)
    got, _ = _decode(dm)  # on again after the block
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)
    merge_lora(model)  # the base weights change in place: the decode model repacks them, the adapter is not added
    assert dm.refresh()
    got, steps = _decode(dm)
    assert steps == len(FED)
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)
    unmerge_lora(model)
    assert dm.refresh()
    got, _ = _decode(dm)
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=1e-4)


def test_engine_rollouts_after_an_optimizer_step_carry_the_new_adapter(tmp_path):
    """Every decode step of the next rollout reads the adapter as the step left it: its log-probabilities equal the
    training model's forward on the sampled sequence."""
    _, model = _models(tmp_path)
    engine = Engine(model, Tokenizer.from_dir(tmp_path / "m"), max_running=2, max_seq_len=64, prefix_cache_bytes=0)
    assert engine.decode.plan is not None
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=1)

    def check() -> list[int]:
        out = engine.generate(PROMPT, params)
        seq = torch.tensor([PROMPT + out.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(seq)[0].float(), -1)  # (T, V)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert entry.logprob == pytest.approx(float(lp[len(PROMPT) - 1 + i, token]), abs=1e-4)
        return out.token_ids

    steps0 = engine.decode.stack_steps
    first = check()
    _lower(model, PROMPT, first)
    second = check()
    assert engine.decode.stack_steps - steps0 >= 2 * (len(first) - 1)  # both rollouts decoded through the stack
    assert second != first


def test_the_training_sampler_rolls_out_each_step_adapter_for_a_repeated_prompt(tmp_path):
    """RL's sampler (`cli.train.engine_sampler`) asked the same prompt before and after an optimizer step decodes the
    new adapter: no prompt cache holds keys and values computed under the old one."""
    from nomoat.cli.train import engine_sampler

    LONG = PROMPT * 4  # longer than the engine's prefix blocks, so a prefix cache would keep it
    _, model = _models(tmp_path)
    tok = Tokenizer.from_dir(tmp_path / "m")
    sample = engine_sampler(model, tok, rows=2, max_seq_len=64)

    def greedy(n: int) -> list[int]:  # the training model's own greedy continuation, stopping at EOS as the engine
        ids = list(LONG)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == tok.eos_token_id:
                    break
        return ids[len(LONG) :]

    first = sample([(LONG, 0)], 0.0, 6)[0][0]
    assert first == greedy(6)
    _lower(model, LONG, first)
    second = sample([(LONG, 0)], 0.0, 6)[0][0]
    assert second == greedy(6) and second != first
