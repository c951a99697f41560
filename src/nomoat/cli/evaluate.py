"""`nomoat eval`: perplexity, task accuracy and multiple choice, base and adapters side by side."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import Device, Dtype, MaxTokens, Merge, Model, fail, parse_adapter, resolve_adapters

EvalAdapter = Annotated[
    list[str] | None,
    typer.Option("--adapter", "-a", help="Adapter folder or registry name, with :WEIGHT; repeat for more columns."),
]


def _column_names(specs: list[str], folders: list[Path]) -> list[str]:
    """A column name per adapter: its registry name or folder name (`runs/NAME/adapter` -> NAME), plus `:WEIGHT`."""
    names: list[str] = []
    for spec, folder in zip(specs, folders):
        path, weight = parse_adapter(spec)
        name = folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name
        name = name if Path(path).expanduser().is_dir() else path  # a registry name stays as typed
        name += f":{weight:g}" if weight != 1.0 else ""
        name = "base-adapter" if name == "base" else name
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}-{k}", k + 1
        names.append(unique)
    return names


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]] | None]:
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield start


def _lm_eval(m, tok, tasks: list[Path], names: list[str], folders: list[Path], weights: list[float],  # noqa: ANN001
             limit: int | None, json_out: Path | None) -> None:  # fmt: skip
    """Run lm-eval task files on the base and each adapter column; print a table, maybe write lm-eval's results."""
    from nomoat.eval.lm_eval import run_tasks
    from nomoat.generate.engine import Engine
    from nomoat.util.files import atomic_write_json

    engine = Engine(m, tok, max_running=8, adapters={f"a{i}": f for i, f in enumerate(folders)})
    columns = {"base": (), **{n: ((f"a{i}", w),) for i, (n, w) in enumerate(zip(names, weights))}}
    results: dict[str, dict] = {}
    try:
        for column, selection in columns.items():
            results[column] = run_tasks(engine, tasks, selection, limit=limit)["results"]
    except ValueError as e:  # a UsageError (lm-eval missing, no such file) or a task lm-eval refuses
        fail(e)
    rows = sorted({(t, k) for r in results.values() for t, ms in r.items() for k, v in ms.items()
                   if isinstance(v, (int, float)) and "stderr" not in k})  # fmt: skip
    typer.echo("task\tmetric\t" + "\t".join(columns))
    for task, metric in rows:
        values = [results[c].get(task, {}).get(metric) for c in columns]
        typer.echo(f"{task}\t{metric}\t" + "\t".join("-" if v is None else f"{v:.4f}" for v in values))
    if json_out is not None:
        atomic_write_json(json_out, {"lm_eval": results}, default=str)
        typer.echo(f"wrote {json_out}")


def evaluate(
    model: Model,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            "--data",
            "-d",
            help="Data file (repeatable): task items (JSONL: prompt/answer, or "
            "prompt/choices/answer) or text/chat data for perplexity.",
        ),
    ] = None,
    lm_eval_task: Annotated[
        list[Path] | None,
        typer.Option("--lm-eval-task", help="An lm-evaluation-harness task YAML file with its own local data "
                     "(repeatable): run offline on the base and each adapter (needs `pip install lm-eval`)."),
    ] = None,
    adapter: EvalAdapter = None,
    merge: Merge = False,
    kind: Annotated[
        str, typer.Option(help="auto (per file, from its first record), perplexity, tasks or choice.")
    ] = "auto",
    limit: Annotated[int | None, typer.Option(help="Use at most N items (records) per file.")] = None,
    max_tokens: MaxTokens = 64,
    system: Annotated[str | None, typer.Option(help="System prompt for task items without their own.")] = None,
    match: Annotated[
        str | None, typer.Option(help="Default match mode of generation items: exact, contains or regex.")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Prompt through the chat template (default: when the model has one).",
            show_default=False,
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON to this file.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a grouped bar chart (PNG) to this file.")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Score the base model and each adapter side by side: task accuracy, multiple choice, perplexity.

    Each --adapter (a folder or registry name, with an optional :WEIGHT) is a column next to `base`. Task items
    are generated greedily and matched against their answers (exact, contains or regex); multiple-choice items
    are scored by the log-likelihood of each choice (acc and acc_norm); other data is scored by perplexity
    (text on every token, chat on the assistant's tokens). --lm-eval-task runs lm-evaluation-harness task files
    (YAML with their own local data) on the same columns, offline.
    """
    import nomoat
    from nomoat.eval import compare, plot_report, print_report, write_json

    for spec in adapter or []:
        parse_adapter(spec)  # one adapter per column: a stack exits here
    resolved = resolve_adapters(adapter)
    folders, weights = [f for f, _ in resolved], [w for _, w in resolved]
    names = _column_names(list(adapter or []), folders)
    try:
        m, tok = nomoat.load(model, dtype=dtype, device=device)
    except ValueError as e:  # a model-loading error (CheckpointError, UnsupportedModelError...) or a bad option
        fail(e)
    if tok.chat_template is None:  # a base without a template: prompt as the adapters were trained
        templates = [f / "chat_template.jinja" for f in folders if (f / "chat_template.jinja").is_file()]
        if templates:
            tok.chat_templates["default"] = templates[0].read_text(encoding="utf-8")
    if not data and not lm_eval_task:
        fail("give --data FILE and/or --lm-eval-task FILE")
    if lm_eval_task:
        _lm_eval(m, tok, lm_eval_task, names, folders, weights, limit, None if data else json_out)
        if not data:
            return
    try:
        with _progress_bar(progress) as bar:
            report = compare(
                m, tok, list(data or []), dict(zip(names, zip(folders, weights))), kind=kind, limit=limit,
                max_new_tokens=max_tokens, system=system, chat=chat, match=match, model_name=str(model),
                progress=bar, merge=merge,
            )  # fmt: skip
    except ValueError as e:  # DataError, AdapterError, or a plain ValueError from the library
        fail(e)
    print_report(report)
    if json_out is not None:
        typer.echo(f"wrote {write_json(report, json_out)}")
    if plot is not None:
        typer.echo(f"wrote {plot_report(report, plot)}")
