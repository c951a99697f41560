"""What the command modules share: the error handler, number formatting, model loading, adapter resolution, options.

Errors: library code raises `NomoatError`s (message + hint); a command refuses bad options with `fail`. Either way
`Group.invoke`, the one handler, prints `error: MESSAGE` (and `hint: HINT`) on stderr and exits with the error's
`exit_code`, without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from nomoat.util.errors import NomoatError


class CommandError(NomoatError):
    """A command's own refusal (options that do not fit together, a value out of range); raised by `fail`.

    Not a ValueError, so a command's `except ValueError` around a library call never catches its own refusal.
    """


def fail(message: str | Exception, hint: str | None = None) -> NoReturn:
    """Stop the command: the handler prints `error: MESSAGE` (and the hint) on stderr and exits with code 2.

    Given a caught exception, a `NomoatError` goes on as it is (with its own hint and exit code); any other
    becomes a `CommandError` with its text.
    """
    if isinstance(message, NomoatError):
        raise message
    raise CommandError(str(message), hint)


def report(error: NomoatError) -> None:
    """Print an error for the user: `error: MESSAGE` in red on stderr, then `hint: HINT` when there is one."""
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    hint = getattr(error, "hint", None)  # a subclass with its own __init__ may not have set it
    if hint:
        typer.secho(f"hint: {hint}", err=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `NomoatError` raised in the block into its printed report and exit code (no traceback)."""
    try:
        yield
    except NomoatError as e:
        report(e)
        raise typer.Exit(e.exit_code) from None


class Group(TyperGroup):
    """The `nomoat` command group: every command (and subcommand) runs inside the one error handler."""

    def invoke(self, ctx: Any) -> Any:  # noqa: D102
        with user_errors():
            return super().invoke(ctx)


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

    try:
        m, tok = nomoat.load(model, dtype=dtype, device=device)
    except ValueError as e:  # a model-loading error (CheckpointError, UnsupportedModelError...) or a bad option
        fail(e)
    apply_adapters(m, adapters, tok)
    if quantize:
        from nomoat.models.quantize import quantize_model

        try:
            quantize_model(m, quantize)
        except ValueError as e:
            fail(e)
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
        fail(e)


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
    from nomoat.lora.apply import merge_adapters

    try:
        merged = merge_adapters(m, resolve_adapters(adapters))
    except ValueError as e:  # AdapterError, or a plain ValueError from the library
        fail(e)
    template = next((a.chat_template for a in merged if a.chat_template), None)
    if tok is not None and tok.chat_template is None and template:
        tok.chat_templates["default"] = template


Model = Annotated[Path, typer.Argument(
    help="A Hugging Face-format model folder, a .gguf file, or ollama:NAME[:TAG] (a model in Ollama's local store)."
)]
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
