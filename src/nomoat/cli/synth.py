"""`nomoat synth`: make training data with a teacher (a local model or an OpenAI-compatible endpoint)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import Adapter, Device, Dtype, fail

Opt = typer.Option


@contextlib.contextmanager
def _progress(enabled: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr driven by (done, total) calls, or None when disabled."""
    if not enabled:
        yield None
        return
    from rich import progress as rp
    from rich.console import Console

    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
               rp.TimeRemainingColumn())  # fmt: skip
    with rp.Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def _teacher(model: str | None, url: str | None, teacher_model: str | None, key_env: str, adapter: list[str] | None,
             concurrency: int, retries: int, backoff: float, dtype: str, device: str):  # noqa: ANN202
    """The teacher of the options: an endpoint with --teacher-url, else the local MODEL (with its adapters)."""
    from nomoat.synth import LocalTeacher, RemoteTeacher

    if url:
        if adapter:
            fail("--adapter applies to a local teacher; on a server, name the adapter with --teacher-model")
        key = os.environ.get(key_env)
        return RemoteTeacher(url, api_key=key or None, model=teacher_model or model, concurrency=concurrency,
                             retries=retries, backoff=backoff)  # fmt: skip
    if model is None:
        fail("give a teacher: a local MODEL (e.g. demo), or --teacher-url URL of an OpenAI-compatible server")
    from nomoat.cli._common import engine_for, load_with_adapters

    m, tok, adapters = load_with_adapters(Path(model), None, dtype, device, adapter)
    if tok.chat_template is None:
        fail(f"{model} has no chat template: a teacher answers chats", hint="use an instruction-tuned model")
    engine = engine_for(m, tok, adapters, max_running=64, max_queue=1 << 20)
    return LocalTeacher(engine, model, adapters.selection, adapter or [])


def synth(
    prompts: Annotated[Path, Opt("--prompts", "--seeds", "-i", help="instructions: the seed tasks (JSONL: instruction, "
                                 "prompt or messages); pairs: the prompts (prompt or messages, other columns go to "
                                 "the rewards).")],
    out: Annotated[Path, Opt("--out", "-o", help="The JSONL file to write (rerun to resume it); the provenance goes "
                             "to OUT.provenance.json.")],
    model: Annotated[
        str | None,
        typer.Argument(help="The teacher: a local model (`demo`, a folder, a Hub id, a .gguf file); with "
                       "--teacher-url, optionally the model's name on the server."),
    ] = None,
    mode: Annotated[str, Opt("--mode", "-m", help="instructions (self-instruct from seed tasks) or pairs "
                                                  "(chosen/rejected from ranked samples).")] = "pairs",
    teacher_url: Annotated[str | None, Opt("--teacher-url", help="An OpenAI-compatible server, e.g. "
                                           "http://127.0.0.1:8000 (nomoat serve, vLLM, llama.cpp, OpenAI).")] = None,
    teacher_model: Annotated[str | None, Opt("--teacher-model", help="The model to ask on the server (default: the "
                                             "first it lists).")] = None,
    api_key_env: Annotated[str, Opt("--api-key-env", help="Environment variable holding the server's API key.")] = (
        "OPENAI_API_KEY"
    ),
    adapter: Adapter = None,
    num: Annotated[int, Opt("--num", "-n", help="instructions: records wanted in the file.", min=1)] = 100,
    samples: Annotated[int, Opt("--samples", help="pairs: answers sampled per prompt.", min=2)] = 4,
    reward: Annotated[list[str] | None, Opt("--reward", help="pairs: rank samples by a reward (repeatable): "
                                            "exact_match, digit_match, numeric_match, json_valid, regex=P, length=N, "
                                            "MODULE:FUNC or file.py:FUNC.")] = None,
    reward_weight: Annotated[list[float] | None, Opt("--reward-weight", help="pairs: one weight per --reward.")] = None,
    judge: Annotated[bool, Opt("--judge", help="pairs: the teacher rates each sample 1-10 (added to any reward).")] = (
        False
    ),
    temperature: Annotated[float, Opt(help="Sampling temperature of samples (pairs) and new tasks (instructions).",
                                      min=0.0)] = 1.0,
    answer_temperature: Annotated[float, Opt("--answer-temperature", help="instructions: temperature of the "
                                             "answers.", min=0.0)] = 0.7,
    max_tokens: Annotated[int, Opt("--max-tokens", help="Longest answer in tokens.", min=1)] = 256,
    seed: Annotated[int, Opt(help="Seed of the sampling and of the example draws.")] = 0,
    similarity: Annotated[float, Opt(help="instructions: drop a new task at least this similar (0-1) to one seen.")] = (
        0.7
    ),
    min_words: Annotated[int, Opt("--min-words", help="instructions: shortest task in words.", min=1)] = 3,
    max_words: Annotated[int, Opt("--max-words", help="instructions: longest task in words.", min=1)] = 150,
    concurrency: Annotated[int, Opt(help="--teacher-url: requests in flight at once.", min=1)] = 4,
    retries: Annotated[int, Opt(help="--teacher-url: further attempts after a failed request.", min=0)] = 4,
    backoff: Annotated[float, Opt(help="--teacher-url: seconds before the first retry, doubled for each next.",
                                  min=0.0)] = 1.0,
    progress: Annotated[bool, Opt("--progress/--no-progress", help="Show the progress bar.")] = True,
    dtype: Dtype = "auto",
    device: Device = "auto",
) -> None:
    """Make training data with a teacher: self-instruct tasks and answers, or preference pairs from ranked samples.

    The teacher is a local model (with --adapter) or any OpenAI-compatible endpoint (--teacher-url, the key from
    $OPENAI_API_KEY or --api-key-env). Records already in --out are kept and their work skipped, so an interrupted or
    failed run is finished by running the same command again. Failed requests are retried with exponential backoff,
    then listed; they are never dropped silently (the exit status is 1 while any remain).
    """
    from nomoat.synth import InstructionSettings, PairsSettings, TeacherError, synthesize

    if mode == "pairs":
        settings: PairsSettings | InstructionSettings = PairsSettings(
            samples=samples, temperature=temperature, max_tokens=max_tokens, seed=seed, reward=list(reward or []),
            reward_weights=list(reward_weight) if reward_weight else None, judge=judge)  # fmt: skip
    elif mode == "instructions":
        settings = InstructionSettings(num=num, temperature=temperature, answer_temperature=answer_temperature,
                                       max_tokens=max_tokens, seed=seed, similarity=similarity, min_words=min_words,
                                       max_words=max_words)  # fmt: skip
    else:
        fail(f"--mode {mode!r}: choose instructions or pairs")
    teacher = _teacher(model, teacher_url, teacher_model, api_key_env, adapter, concurrency, retries, backoff, dtype,
                       device)  # fmt: skip
    try:
        with _progress(progress, f"synth {mode}") as bar:
            result = synthesize(mode, teacher, str(prompts), out, settings, progress=bar)
    except KeyboardInterrupt:
        typer.secho(f"stopped: the records made so far are in {out}; run the same command to go on", err=True)
        raise typer.Exit(130) from None
    except TeacherError:
        typer.secho(f"stopped: the records made before the error are in {out}", err=True)
        raise
    finally:
        close = getattr(teacher, "close", None)
        if close:
            close()
    _report(result)


def _report(result) -> None:  # noqa: ANN001
    """Print what the run wrote, filtered and failed; exit 1 when the data is incomplete."""
    t = result.tally
    resumed = f" ({result.resumed} from before)" if result.resumed else ""
    typer.echo(f"wrote {result.out}: {result.records} records{resumed}; provenance in {result.provenance}")
    if t.filtered:
        typer.echo("filtered: " + ", ".join(f"{n} {reason}" for reason, n in sorted(t.filtered.items())))
    if t.failures:
        typer.secho(f"{len(t.failures)} requests failed after their retries:", fg=typer.colors.RED, err=True)
        for f in t.failures[:5]:
            typer.secho(f"  {f['item']}: {f['error']} ({f['attempts']} attempts)", err=True)
        if len(t.failures) > 5:
            typer.secho(f"  ... and {len(t.failures) - 5} more (all in the provenance record)", err=True)
    if result.status != "complete":
        typer.secho("the data is incomplete: run the same command again to retry what is missing", err=True)
        raise typer.Exit(1)
