"""What the command modules share: the error handler, number formatting, model loading, adapter resolution, options.

Errors: library code raises `NomoatError`s (message + hint); a command refuses bad options with `fail`. Either way
`Group.invoke`, the one handler, prints `error: MESSAGE` (and `hint: HINT`) on stderr and exits with the error's
`exit_code`, without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from nomoat.util.errors import NomoatError

if TYPE_CHECKING:
    from nomoat.lora.selection import AdapterSelection


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


class LoadFailure:
    """`on_error` of an app that loads its model in the background: report the error and stop the server.

    Args:
        model: The model argument, for the message of an unexpected error.
    """

    def __init__(self, model: object) -> None:
        self.model = model
        self.server: Any = None

    def __call__(self, exc: BaseException) -> None:
        if isinstance(exc, NomoatError):  # raised in the loading thread: reported as the handler would
            report(exc)
        else:
            typer.secho(f"error: could not load {self.model}: {exc}", fg=typer.colors.RED, err=True)
        if self.server is not None:
            self.server.should_exit = True

    def run(self, app: Any, server: Any) -> None:
        """Run `server` (a uvicorn server of `app`) until it exits; exit 1 if the model failed to load."""
        self.server = server
        server.should_exit = app.state.error is not None  # loading may already have failed
        server.run()
        if app.state.error:
            raise typer.Exit(1)


def human(n: float, unit: str = "") -> str:
    """`1234567` -> `1.2M`: a number with a K/M/B/T suffix; bytes (`unit="B"`) take K/M/G/T (`2.5GB`, not `2.5BB`)."""
    for suffix in ("", "K", "M", "G" if unit == "B" else "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


@dataclass
class InferenceAdapters:
    """How a loaded model runs its adapters: what the engine's bank loads, and what each request selects.

    Attributes:
        selection: The selection every request runs with (empty when merged: the base weights hold them).
        bank: Name -> folder of each adapter to load into the engine's bank (empty when they were merged).
    """

    selection: AdapterSelection
    bank: dict[str, Path] = field(default_factory=dict)


def load_for_inference(
    model: Path,
    quantize: str | None,
    dtype: str,
    device: str,  # noqa: ANN202
    adapters: list[str] | None = None,
):
    """Load a model and tokenizer for generation, optionally quantized, with `adapters` merged into the base weights.

    Exits with a clear error on bad input. `load_with_adapters` keeps adapters apart, for the engine's bank.
    """
    m, tok, _ = load_with_adapters(model, quantize, dtype, device, adapters, merge=True)
    return m, tok


def load_with_adapters(
    model: Path,
    quantize: str | None,
    dtype: str,
    device: str,  # noqa: ANN202
    adapters: list[str] | None = None,
    merge: bool = False,
):
    """Load a model and tokenizer for generation, optionally quantized; exits with a clear error on bad input.

    Returns `(model, tokenizer, InferenceAdapters)`. The adapters go into the engine's bank (`engine_for`) and each
    request selects them; with `merge` they are merged into the base weights first (before quantizing), and so are
    adapters the bank cannot apply per request (DoRA, fully trained modules), with a note saying so.
    """
    import nomoat

    selection = parse_selection(adapters)
    folders = resolve_selection(selection)
    unbankable = _unbankable(folders)
    merging = bool(folders and (merge or unbankable))
    from nomoat.models.checkpoint import cpu_has_fast_bf16, gguf_source
    from nomoat.util.hub import local_path

    if merging and dtype in (None, "auto") and gguf_source(local_path(model)) is not None:
        dtype = "bfloat16" if cpu_has_fast_bf16() else "float32"  # what "auto" gives a GGUF, minus its 4-bit blocks
    try:  # quantized as it is read, unless adapters are merged first (they need the full-precision weights)
        m, tok = nomoat.load(model, dtype=dtype, device=device, quantize=None if merging else quantize)
    except ValueError as e:  # a model-loading error (CheckpointError, UnsupportedModelError...) or a bad option
        fail(e)
    template = next((t.read_text(encoding="utf-8") for t in (f / "chat_template.jinja" for f, _ in folders)
                     if t.is_file()), None)  # fmt: skip
    if tok.chat_template is None and template:  # a base without a template takes the one an adapter trained with
        tok.chat_templates["default"] = template
    if folders and not merge and unbankable:
        typer.secho(f"note: {unbankable}, which cannot be applied per request: merging the adapters into the base "
                    "weights (as --merge does)", dim=True, err=True)  # fmt: skip
    if merging:
        _merge_into(m, folders)
        out = InferenceAdapters(type(selection)())
    else:
        out = InferenceAdapters(selection, dict(zip(selection.names, (f for f, _ in folders))))
    if quantize and merging:
        from nomoat.models.quantize import quantize_model

        try:
            quantize_model(m, quantize)
        except ValueError as e:
            fail(e)
    from nomoat.models.packed import pack_model

    pack_model(m)  # generation only: the remaining fp32 CPU linears get oneDNN-packed weights (about 1.4x faster)
    return m, tok, out


def engine_for(m, tok, adapters: InferenceAdapters, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """An `Engine` over the model with `adapters.bank` loaded (exits with the reason when one does not fit)."""
    from nomoat.generate.engine import Engine
    from nomoat.lora import AdapterError

    try:
        return Engine(m, tok, adapters=adapters.bank, **kwargs)
    except (AdapterError, ValueError) as e:
        fail(e)


def _unbankable(folders: list[tuple[Path, float]]) -> str | None:
    """Why one of the adapters must be merged (DoRA, fully trained modules), or None when the bank takes them all."""
    from nomoat.lora import AdapterError, read_adapter_config

    for folder, _ in folders:
        try:
            cfg = read_adapter_config(folder)
        except (AdapterError, ValueError) as e:
            fail(e)
        if cfg.use_dora:
            return f"{folder} is a DoRA adapter"
        if cfg.modules_to_save:
            return f"{folder} trains {', '.join(cfg.modules_to_save)} fully"
    return None


def _merge_into(m, folders: list[tuple[Path, float]]) -> None:  # noqa: ANN001
    """Merge the adapters into the base weights, in order: W + sum_i weight_i * scale_i * B_i A_i."""
    from nomoat.lora import AdapterError
    from nomoat.lora.apply import merge_adapters

    try:
        merge_adapters(m, folders)
    except (AdapterError, ValueError) as e:
        fail(e)


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


def parse_selection(specs: list[str] | None) -> AdapterSelection:
    """The `--adapter` values (each in the grammar of `nomoat.lora.selection`) as one `AdapterSelection`, in order."""
    from nomoat.lora.selection import AdapterSelection, SelectionError

    selection = AdapterSelection()
    try:
        for spec in specs or []:
            selection = selection + AdapterSelection.parse(spec)
    except SelectionError as e:
        fail(e)
    return selection


def parse_adapter(spec: str) -> tuple[str, float]:
    """One adapter `NAME_OR_FOLDER[:WEIGHT]` -> (name or folder, weight); exits on a stack, `none` or bad syntax."""
    selection = parse_selection([spec])
    if len(selection) != 1:
        fail(f"{spec!r} is {'the base model' if not selection else 'a stack'}; give one adapter here (NAME, NAME:0.5 "
             "or a folder)")  # fmt: skip
    return selection.items[0]


def resolve_selection(selection: AdapterSelection) -> list[tuple[Path, float]]:
    """Each adapter of a selection as (folder, weight): a folder as given, else a registry name; exits when unknown."""
    from nomoat.util.errors import InputError

    try:
        return selection.folders()
    except InputError as e:
        fail(e)


def resolve_adapters(adapters: list[str] | None) -> list[tuple[Path, float]]:
    """FOLDER or registry NAME, each with an optional :WEIGHT (stacks with +), as (folder, weight); exits if bad."""
    return resolve_selection(parse_selection(adapters))


Model = Annotated[Path, typer.Argument(
    help="A model: `demo` (the embedded one), a Hub id ORG/NAME[@REV] from the Hugging Face cache (`nomoat pull`), "
    "a Hugging Face-format folder, a .gguf file, or ollama:NAME[:TAG] (a model in Ollama's local store)."
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
    typer.Option("--adapter", help="Adapter folder or registry name, with :WEIGHT; stack with + (a:1+b:0.5) or repeat"),
]
Merge = Annotated[
    bool,
    typer.Option("--merge", help="Merge the adapters into the base weights before decoding: faster for a single fixed "
                 "adapter, but one adapter set per process."),
]
Quantize = Annotated[str | None, typer.Option(help="Weight-only quantization: int8 or int4.")]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the decode step (slow to start).")]
