"""`nomoat studio`: the server with its web studio (chat, train, adapters), opened in the browser.

Also the studio's data preview process (`python -m nomoat.cli.studio preview FILE --model DIR ...`): the server runs
it in a child process and reads one JSON line, so tokenizing a big or broken dataset never blocks the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Annotated, Any

import typer

from nomoat.cli._common import LoadFailure, fail
from nomoat.util.errors import NomoatError

Opt = typer.Option


def studio(
    model: Annotated[
        Path | None,
        typer.Argument(help="Model to serve and train (HF folder, .gguf or ollama:NAME).",
                       show_default="the embedded demo model"),
    ] = None,  # fmt: skip
    data_dir: Annotated[
        list[Path] | None,
        Opt("--data-dir", help="A folder whose dataset files the studio may read (repeatable); nothing else is."),
    ] = None,
    host: Annotated[str, Opt(help="Address to bind; 0.0.0.0 exposes the studio to the network.")] = "127.0.0.1",
    port: Annotated[int, Opt(help="Port.")] = 8000,
    api_key: Annotated[
        str | None, Opt("--api-key", envvar="NOMOAT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    name: Annotated[str | None, Opt(help="The base model's name in the API.", show_default="the folder's name")] = None,
    max_upload_bytes: Annotated[int, Opt("--max-upload-bytes", help="Largest dataset upload.")] = 2 * 2**20,
    browser: Annotated[bool, Opt("--browser/--no-browser", help="Open the studio in the web browser.")] = True,
) -> None:
    """Open nomoat studio: chat with models and adapters, train adapters on your data, compare, merge, export.

    Serves the OpenAI-compatible API (as `nomoat serve`) and the studio pages at /, then opens a browser tab.
    Training runs one job at a time, each in its own process; finished adapters go into the registry.
    """
    if "torch" not in sys.modules:  # as `nomoat serve`: a bounded spin at barriers, then sleep
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    import uvicorn

    from nomoat.demo import MODEL_DIR
    from nomoat.serve.app import ServerState, ServeSettings, create_app
    from nomoat.serve.studio import StudioSettings

    model = model or MODEL_DIR
    for d in data_dir or []:
        if not d.is_dir():
            fail(f"--data-dir {d}: not a folder")
    base = name or ("nomoat-demo" if model == MODEL_DIR else model.resolve().name)
    models = {base: str(model.resolve()) if model.exists() else str(model)}
    if model != MODEL_DIR:
        models["nomoat-demo"] = str(MODEL_DIR)
    body_limit = max(2 * 2**20, max_upload_bytes + 4096)
    settings = ServeSettings(model_name=base, api_key=api_key, max_body_bytes=body_limit,
                             studio=StudioSettings(data_dirs=[d.resolve() for d in data_dir or []], models=models,
                                                   max_upload_bytes=max_upload_bytes))  # fmt: skip

    def load():  # noqa: ANN202
        from nomoat.cli._common import load_for_inference
        from nomoat.generate.engine import Engine

        m, tok = load_for_inference(model, None, "auto", "auto")
        return Engine(m, tok)

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def ready(state: ServerState) -> None:
        typer.echo(f"nomoat studio: ready at {url}/  (API at {url}/v1, docs at {url}/docs)", err=True)
        if browser:
            threading.Thread(target=webbrowser.open, args=(f"{url}/",), daemon=True).start()

    failed = LoadFailure(model)
    typer.echo(f"nomoat studio: loading {model} ({base}); listening on {url}", err=True)
    app = create_app(load, settings, on_ready=ready, on_error=failed)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    failed.run(app, uvicorn.Server(config))


# ---- the preview process ------------------------------------------------------------------------------------------


def _segments(tokenizer: Any, ids: list[int], labels: list[int], ignore: int) -> list[dict[str, Any]]:
    """The sequence as text pieces, each marked trained (carries a loss) or not."""
    out: list[dict[str, Any]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != ignore) != (labels[start] != ignore):
            out.append({"text": tokenizer.decode(ids[start:i]), "trained": labels[start] != ignore})
            start = i
    return out


def preview_json(file: Path, model: str, format: str, seq_len: int, train_on: str, examples: int) -> dict[str, Any]:
    """What the studio's data preview shows: the data summary and the first examples as rendered for training."""
    from nomoat.data import IGNORE_INDEX, Preference, load_dataset, summarize, tokenize_example, tokenize_preference
    from nomoat.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_dir(model)
        dataset = load_dataset(file, format=format)
        per_example = []
        for e in dataset.examples:
            if isinstance(e, Preference):
                per_example.append([tokenize_preference(e, tokenizer, seq_len)[0]])  # the chosen answer
            else:
                per_example.append(tokenize_example(e, tokenizer, seq_len, train_on=train_on))
    except (NomoatError, ValueError, OSError) as e:
        return {"error": str(e), "hint": getattr(e, "hint", None)}
    summary = summarize(dataset, [t for seqs in per_example for t in seqs], seq_len)
    shown = []
    for e, seqs in zip(dataset.examples[:examples], per_example):
        t = seqs[0]
        shown.append({"source": str(e.source), "tokens": len(t), "trained_tokens": t.num_label_tokens,
                      "truncated": t.truncated,
                      "segments": _segments(tokenizer, t.input_ids, t.labels, IGNORE_INDEX)})  # fmt: skip
    return {"summary": summary.to_dict(), "examples": shown}


def _preview_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m nomoat.cli.studio preview")
    parser.add_argument("file", type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--format", default="auto")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--train-on", default="assistant")
    parser.add_argument("--examples", type=int, default=3)
    a = parser.parse_args(argv)
    out = preview_json(a.file, a.model, a.format, a.seq_len, a.train_on, a.examples)
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["preview"]:
        sys.exit("usage: python -m nomoat.cli.studio preview FILE --model DIR [...]")
    _preview_main(sys.argv[2:])
