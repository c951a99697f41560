"""`nomoat serve`: the OpenAI-compatible server."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import Device, Dtype, LoadFailure, Model, Quantize, fail

Opt = typer.Option


def _adapter_specs(specs: list[str] | None) -> dict[str, Path]:
    """`--adapter` values (`DIR`, `NAME=DIR` or a registry `NAME`) as name -> folder; exits on a bad one."""
    from nomoat.lora.registry import AdapterNotFoundError, Registry, validate_name

    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        folder = Path(path).expanduser()
        try:
            if folder.is_dir():
                name = validate_name(name or folder.resolve().name)
            else:
                if name:
                    fail(f"--adapter {spec}: {folder} is not a folder")
                name, folder = path, Registry().path(validate_name(path))
        except ValueError as e:
            fail(f"--adapter {spec}: {e} (give NAME=DIR to name a folder)")
        except AdapterNotFoundError as e:
            fail(f"--adapter {spec}: not a folder, and {e}")
        if name in out:
            fail(f"--adapter {spec}: two adapters are named {name!r} (give NAME=DIR)")
        out[name] = folder
    return out


def serve(
    model: Model,
    adapter: Annotated[
        list[str] | None,
        Opt(
            "--adapter",
            help="Adapter to load at start: a folder, NAME=FOLDER, or a registry name (repeatable). "
            "Registry adapters also load on first use.",
        ),
    ] = None,  # fmt: skip
    host: Annotated[str, Opt(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, Opt(help="Port.")] = 8000,
    api_key: Annotated[
        str | None, Opt("--api-key", envvar="NOMOAT_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    name: Annotated[str | None, Opt(help="The base model's name in the API.", show_default="the folder's name")] = None,
    max_running: Annotated[
        int | None,
        Opt("--max-running", help="Requests decoded together (batch rows).",
            show_default="as many as a quarter of the free memory holds, <= 64"),
    ] = None,
    max_queue: Annotated[int, Opt("--max-queue", help="Requests allowed to wait; beyond it 429.")] = 64,
    max_loaded_adapters: Annotated[int, Opt("--max-loaded-adapters", help="Adapters kept in memory (LRU).")] = 8,
    max_seq_len: Annotated[
        int | None,
        Opt("--max-seq-len", help="Tokens per request, prompt + completion.", show_default="context, <= 4096"),
    ] = None,
    max_prompt_tokens: Annotated[int | None, Opt("--max-prompt-tokens", help="Longest prompt accepted.")] = None,
    max_completion_tokens: Annotated[
        int, Opt("--max-completion-tokens", help="Largest max_tokens accepted (and the default).")
    ] = 2048,
    max_body_bytes: Annotated[int, Opt("--max-body-bytes", help="Largest request body.")] = 2 * 2**20,
    allow_adapter_dir: Annotated[
        list[Path] | None,
        Opt("--allow-adapter-dir", help="Let POST /v1/adapters load a `path` inside this folder (repeatable); "
            "without it adapters load over the API from the registry by name only."),
    ] = None,  # fmt: skip
    data_dir: Annotated[
        list[Path] | None,
        Opt("--data-dir", help="A folder whose dataset files the web studio may read for training (repeatable); "
            "without it the studio trains on uploads only."),
    ] = None,  # fmt: skip
    cors_origin: Annotated[
        list[str] | None,
        Opt("--cors-origin", help="Let web pages from this origin call the API, e.g. https://app.example "
            "(repeatable; * for any). Off by default."),
    ] = None,  # fmt: skip
    log_format: Annotated[
        str, Opt("--log-format", help="Access log on stderr, one line per request: text or json.")
    ] = "text",
    shutdown_grace: Annotated[
        float,
        Opt("--shutdown-grace", help="On SIGTERM or Ctrl-C, seconds to let running requests finish while new ones "
            "get 503 (a second signal exits at once)."),
    ] = 30.0,  # fmt: skip
    adapter_dtype: Annotated[
        str,
        Opt("--adapter-dtype",
            help="Keep adapter factors in: auto, float32 or bfloat16. bfloat16 halves the memory read per decode step "
            "with many different adapters in flight (faster), rounding fp32 factors to bf16; sums stay fp32. auto "
            "rounds nothing the model would not: bfloat16 for bf16 adapter files (as PEFT saves those of bf16 "
            "models) or a bf16 model, else the model's dtype. An fp32 adapter loaded beside bf16 ones under auto "
            "turns the bank to float32 (bf16 values stay exact)."),
    ] = "auto",  # fmt: skip
    quantize: Quantize = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
) -> None:
    """Serve a model and its adapters over an OpenAI-compatible HTTP API (chat, completions, streaming).

    Requests pick the base model, an adapter, or a stack (`base+a:1.0+b:0.5`) in their `model` field; requests
    for different adapters are batched together. GET /health is 503 while the model loads, then 200.
    """
    # OpenMP reads these once, when torch loads its runtime: only effective if torch is not loaded yet (it is not,
    # when run from the command line). Threads waiting at a barrier spin for about a millisecond, then sleep: a
    # decode step's many short barriers stay fast, and an idle server's threads do not spin on small VMs.
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    from nomoat.models.checkpoint import gguf_source  # loads torch: not at import, for a quick --help
    from nomoat.util.hub import local_path

    found = local_path(model)  # `demo` and Hub ids name folders too
    if gguf_source(found) is None and not (Path(found) / "config.json").is_file():
        fail(f"{model} is not a model folder (no config.json), a .gguf file, a pulled Hub id or ollama:NAME")
    for flag, value in (("--max-running", max_running), ("--max-queue", max_queue),
                        ("--max-loaded-adapters", max_loaded_adapters), ("--max-completion-tokens",
                                                                          max_completion_tokens)):  # fmt: skip
        if value is not None and value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    adapters = _adapter_specs(adapter)
    for folder in allow_adapter_dir or []:
        if not folder.is_dir():
            fail(f"--allow-adapter-dir {folder}: not a folder")
    for folder in data_dir or []:
        if not folder.is_dir():
            fail(f"--data-dir {folder}: not a folder")
    if log_format not in ("text", "json"):
        fail(f"--log-format must be text or json, got {log_format!r}")
    if shutdown_grace < 0:
        fail(f"--shutdown-grace must be >= 0, got {shutdown_grace}")
    if adapter_dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--adapter-dtype must be auto, float32 or bfloat16, got {adapter_dtype!r}")

    import uvicorn

    from nomoat.serve import access
    from nomoat.serve.app import ServerState, ServeSettings, create_app
    from nomoat.serve.shutdown import DrainingServer
    from nomoat.serve.studio import StudioSettings

    base = name or model.resolve().name
    settings = ServeSettings(
        model_name=base, api_key=api_key, adapters=adapters, max_loaded_adapters=max_loaded_adapters,
        max_prompt_tokens=max_prompt_tokens, max_completion_tokens=max_completion_tokens,
        max_body_bytes=max_body_bytes, adapter_dirs=[d.resolve() for d in allow_adapter_dir or []],
        cors_origins=list(cors_origin or []), studio=StudioSettings(data_dirs=[d.resolve() for d in data_dir or []],
                                                               models={base: str(model)}),
    )  # fmt: skip

    def load():  # noqa: ANN202
        from nomoat.cli._common import load_for_inference
        from nomoat.generate.engine import Engine

        m, tok = load_for_inference(model, quantize, dtype, device)
        return Engine(m, tok, max_running=max_running, max_queue=max_queue, max_seq_len=max_seq_len,
                      adapter_dtype=adapter_dtype)  # fmt: skip

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def ready(state: ServerState) -> None:
        names = [base, *(n for n, _ in state.manager.names())] if state.manager else [base]
        bank = getattr(state.engine, "bank", None)
        if bank is not None and bank.factor_dtype is not None:
            typer.echo(f"nomoat serve: adapter factors in {str(bank.factor_dtype).removeprefix('torch.')} "
                       f"(--adapter-dtype {adapter_dtype})", err=True)  # fmt: skip
        auth = f' -H "Authorization: Bearer {"$NOMOAT_API_KEY"}"' if api_key else ""
        typer.echo(f"nomoat serve: ready at {url}/v1  models: {', '.join(names)}", err=True)
        typer.echo(f"  try: curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' "
                   f"-d '{{\"model\": \"{base}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
                   err=True)  # fmt: skip
        typer.echo(f"  or:  OpenAI(base_url='{url}/v1', api_key={'your key' if api_key else repr('none')})"
                   f".chat.completions.create(model='{base}', messages=[...])", err=True)  # fmt: skip

    failed = LoadFailure(model)
    typer.echo(f"nomoat serve: loading {model} ({base}); listening on {url} (/health is 503 until ready)", err=True)
    app = create_app(load, settings, on_ready=ready, on_error=failed)
    access.enable(log_format)
    # uvicorn's own access log is off (log_level warning): the app writes one line per request.
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)
    failed.run(app, DrainingServer(config, app.state, shutdown_grace))
