"""What the command modules share: error exit, number formatting, model loading, adapter resolution, options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def fail(message: str, code: int = 2) -> None:
    """Print `error: MESSAGE` in red on stderr and exit with `code` (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def human(n: float, unit: str = "") -> str:
    """`1234567` -> `1.2M`: a number with a K/M/B/T suffix."""
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def load_for_inference(
    model: Path,
    quantize: str | None,
    dtype: str,
    device: str,  # noqa: ANN202
    adapters: list[str] | None = None,
):
    """Load a model and tokenizer for generation, optionally quantized; exits with a clear error on bad input."""
    import nomoat
    from nomoat.models.checkpoint import CheckpointError
    from nomoat.models.families import UnsupportedModelError
    from nomoat.tokenizer import TokenizerNotFoundError

    try:
        m, tok = nomoat.load(model, dtype=dtype, device=device)
    except (CheckpointError, UnsupportedModelError, TokenizerNotFoundError, ValueError) as e:
        fail(str(e))
    apply_adapters(m, adapters, tok)
    if quantize:
        from nomoat.models.quantize import quantize_model

        try:
            quantize_model(m, quantize)
        except ValueError as e:
            fail(str(e))
    from nomoat.models.packed import pack_model

    pack_model(m)  # generation only: the remaining fp32 CPU linears get oneDNN-packed weights (about 1.4x faster)
    return m, tok


def sampling(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    min_p: float,
    seed: int | None,
    stop: list[str] | None,
    repetition_penalty: float = 1.0,
):  # noqa: ANN202
    """Sampling parameters from command-line options; exits with the reason when one is out of range."""
    from nomoat.generate.sampling import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
            stop=list(stop or []), repetition_penalty=repetition_penalty,
        )  # fmt: skip
    except ValueError as e:
        fail(str(e))


def parse_adapter(spec: str) -> tuple[str, float]:
    """`NAME_OR_FOLDER[:WEIGHT]` -> (name or folder, weight); the weight defaults to 1.0."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def resolve_adapters(adapters: list[str] | None) -> list[tuple[Path, float]]:
    """FOLDER or registry NAME, each with an optional :WEIGHT, as (folder, weight); exits on an unknown one."""
    from nomoat.lora.registry import AdapterNotFoundError, Registry, validate_name

    out = []
    for spec in adapters or []:
        path, weight = parse_adapter(spec)
        folder = Path(path).expanduser()
        if not folder.is_dir():  # not a folder: a name in the adapter registry (`nomoat adapters list`)?
            try:
                folder = Registry().path(validate_name(path))
            except ValueError:
                fail(f"adapter {path!r} not found: give the adapter folder (with adapter_config.json) or a "
                      "registry name (`nomoat adapters list`)")  # fmt: skip
            except AdapterNotFoundError as e:
                fail(f"adapter {path!r} not found: it is not a folder, and {e}")
        out.append((folder, weight))
    return out


def apply_adapters(m, adapters: list[str] | None, tok=None) -> None:  # noqa: ANN001
    """Merge each adapter (FOLDER or registry NAME, with an optional :WEIGHT) into the base weights.

    W + sum_i weight_i * scale_i * B_i A_i. An existing folder wins over a registry name. A model without a chat
    template takes the one an adapter was trained with (`chat_template.jinja` in the adapter folder).
    """
    if not adapters:
        return
    from nomoat.lora import AdapterError
    from nomoat.lora.apply import merge_adapters

    try:
        merged = merge_adapters(m, resolve_adapters(adapters))
    except (AdapterError, ValueError) as e:
        fail(str(e))
    template = next((a.chat_template for a in merged if a.chat_template), None)
    if tok is not None and tok.chat_template is None and template:
        tok.chat_templates["default"] = template


Model = Annotated[Path, typer.Argument(help="A Hugging Face-format model folder.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling: keep the top tokens holding this mass.")]
TopK = Annotated[int, typer.Option("--top-k", help="Keep the K most likely tokens (0: off).")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than min-p times the most likely one.")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop before this string (repeatable).")]
Adapter = Annotated[
    list[str] | None,
    typer.Option("--adapter", help="Adapter folder or registry name, with :WEIGHT; repeat to stack (merged in order)."),
]
Quantize = Annotated[str | None, typer.Option(help="Weight-only quantization: int8 or int4.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step (slow to start).")]
