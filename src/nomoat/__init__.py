"""nomoat: load open-weight LLMs, fine-tune them with LoRA, keep and serve adapters, all offline.

The package root holds only the Python entry points: `load(path)` returns the trainable model (a plain `nn.Module`
with Hugging Face names, `nomoat.models.transformer`) and its `Tokenizer`; `nomoat.train(...)` (lazy) fine-tunes an
adapter. Each stage lives in its own subpackage (`data`, `train`, `lora`, `generate`, `serve`, `eval`, `export`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from nomoat.models.transformer import Transformer
    from nomoat.tokenizer import Tokenizer


def load(
    path: str, dtype: Any = "auto", device: Any = "auto", quantize: str | None = None
) -> tuple[Transformer, Tokenizer]:
    """Load a Hugging Face-format model folder with nomoat's own decoder and tokenizer.

    Args:
        path: A folder with `config.json`, safetensors weights and `tokenizer.json` (`~` is expanded), a `.gguf` file,
            `ollama:NAME[:TAG]`, `demo` (the embedded model) or a Hub id `ORG/NAME[@REVISION]` found offline in the
            Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`; `nomoat pull` downloads one).
        dtype: `"auto"` (a bf16/fp16 checkpoint in bf16 where the CPU computes bf16 well, else fp32; on CUDA the
            checkpoint's bf16/fp16, else bf16), a `torch.dtype`, or one of `"float32"`, `"bfloat16"`, `"float16"`
            (also `fp32`, `bf16`, `fp16`).
        device: `"auto"` (CUDA when available, else CPU), or any torch device.
        quantize: None, `"int8"` or `"int4"`: every linear layer quantized as it is read (inference only; no
            full-precision copy of the model is ever made).

    Returns:
        `(model, tokenizer)`: the model in eval mode on `device`, and its tokenizer with chat template.
    """
    from pathlib import Path

    from nomoat.models.checkpoint import load_model
    from nomoat.tokenizer import Tokenizer
    from nomoat.util.hub import local_path

    path = str(local_path(Path(path).expanduser()))
    model = load_model(path, dtype=dtype, device=device, quantize=quantize)
    tokenizer = Tokenizer.from_dir(path)
    return model, tokenizer


def __getattr__(name: str) -> Any:
    """Lazy attributes: `nomoat.train(...)` fine-tunes an adapter (see `nomoat.train.sft.train`)."""
    if name == "train":
        import importlib

        return importlib.import_module("nomoat.train")
    raise AttributeError(f"module 'nomoat' has no attribute {name!r}")


__all__ = ["load", "train", "__version__"]
