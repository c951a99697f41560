"""`nomoat generate` (one prompt, streamed) and `nomoat chat` (a terminal chat, local or against a server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import (
    Adapter,
    Compile,
    Device,
    Dtype,
    MaxTokens,
    Merge,
    MinP,
    Model,
    Quantize,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
)
from nomoat.cli._common import engine_for as _engine_for
from nomoat.cli._common import fail as _fail
from nomoat.cli._common import load_with_adapters as _load_with_adapters
from nomoat.cli._common import sampling as _sampling


def generate(
    model: Model,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Stop = None,
    adapter: Adapter = None,
    merge: Merge = False,
    quantize: Quantize = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user message in the chat template.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON record instead of streaming text.")] = False,
    dtype: Dtype = "auto",
    device: Device = "auto",
    compile_decode: Compile = False,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="Constrain the output to this JSON schema (a .json file).")
    ] = None,
    regex: Annotated[str | None, typer.Option(help="Constrain the output to match this regular expression.")] = None,
    grammar: Annotated[
        Path | None, typer.Option(help="Constrain the output to this grammar file (Lark, or GBNF with ::= rules).")
    ] = None,
) -> None:
    """Generate a completion for one prompt, streamed to the terminal (optionally constrained by a schema/grammar)."""
    from nomoat.generate.engine import Completion

    constraint = _constraint(json_schema, regex, grammar)
    params = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, stop)
    m, tok, adapters = _load_with_adapters(model, quantize, dtype, device, adapter, merge)
    text = prompt
    if chat:
        if tok.chat_template is None:
            _fail(f"{model} has no chat template; run without --chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=not chat)
    engine = _engine_for(m, tok, adapters, max_running=1, prefix_cache_bytes=0, compile=compile_decode)
    try:
        hook = None
        if constraint is not None:
            from nomoat.generate.constraints import Grammars

            hook = Grammars.of(tok, m.config.vocab_size).row(constraint)
        handle = engine.submit(ids, params, adapter=adapters.selection, logits_hook=hook)
    except ValueError as e:  # (a ConstraintError too)
        _fail(e)
    for event in handle:
        if isinstance(event, Completion):
            if as_json:
                record = {k: v for k, v in vars(event).items() if k != "logprobs"}
                typer.echo(json.dumps(record, ensure_ascii=False))
            else:
                typer.echo()
                rate = f"{event.decode_tokens_per_s:.1f} tok/s" if event.decode_tokens_per_s else "-"
                typer.secho(f"[{event.completion_tokens} tokens, {event.finish_reason}, {rate}]", dim=True, err=True)
        elif not as_json:
            typer.echo(event.text, nl=False)


def _constraint(json_schema: Path | None, regex: str | None, grammar: Path | None):  # noqa: ANN202
    """The output constraint of `generate`'s flags (at most one), or None."""
    given = [x for x in (json_schema, regex, grammar) if x is not None]
    if not given:
        return None
    if len(given) > 1:
        _fail("give one of --json-schema, --regex and --grammar")
    from nomoat.generate.constraints import Constraint

    try:
        if json_schema is not None:
            return Constraint("json_schema", json.loads(json_schema.read_text(encoding="utf-8")))
        if grammar is not None:
            return Constraint("grammar", grammar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        _fail(f"cannot read {json_schema or grammar}: {e}")
    return Constraint("regex", regex)


def chat(
    model: Annotated[
        Path | None,
        typer.Argument(help="A Hugging Face-format model folder; with --server, a model name on the server."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    adapter: Adapter = None,
    merge: Merge = False,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.95,
    top_k: TopK = 0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    quantize: Quantize = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    compile_decode: Compile = False,
    server: Annotated[
        str | None,
        typer.Option(help="Chat with a running `nomoat serve` (or any OpenAI-compatible server) at this URL."),
    ] = None,
    server_model: Annotated[
        str | None,
        typer.Option("--model", help="With --server: the base (default), an adapter, or a stack base+a:1.0+b:0.5."),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="With --server: the server's API key.", envvar="NOMOAT_API_KEY", show_envvar=True),
    ] = None,
) -> None:
    """Chat with a model in the terminal, with its chat template, streaming and history.

    Type a message and press Enter. End a line with a backslash to continue on the next line, or wrap a block in
    triple quotes. Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit.

    With --server URL the model runs on that server (`nomoat serve`), not here: MODEL or --model names it there,
    --adapter names adapters there to stack on it.
    """
    from nomoat.generate.chat import ChatSession, run_terminal_chat

    params = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed, None)
    if server:
        from nomoat.generate.remote import RemoteChatSession, RemoteError

        if quantize or compile_decode or merge or dtype != "auto" or device != "auto":
            typer.secho("note: --quantize, --compile, --merge, --dtype and --device are the server's business; ignored",
                        dim=True, err=True)  # fmt: skip
        if model is not None and server_model is not None:
            _fail("give the server's model once: as MODEL or as --model")
        wanted = server_model if server_model is not None else (str(model) if model is not None else None)
        with RemoteChatSession(server, params, system=system, api_key=api_key) as session:
            try:
                name = session.connect(wanted, adapter)
            except RemoteError as e:
                _fail(e)
            typer.secho(f"(model {name} on {session.base_url})", dim=True, err=True)
            run_terminal_chat(session)
        return
    if model is None:
        _fail("give a model folder, or --server URL to chat with a running server")
    if server_model is not None:
        _fail("--model picks a model on a server: use it with --server (a local model is the MODEL argument)")
    m, tok, adapters = _load_with_adapters(model, quantize, dtype, device, adapter, merge)
    if tok.chat_template is None:
        _fail(f"{model} has no chat template (tokenizer_config.json or chat_template.jinja); use `nomoat generate`")
    engine = _engine_for(m, tok, adapters, max_running=1, compile=compile_decode)
    run_terminal_chat(ChatSession(m, tok, params, system=system, engine=engine, adapter=adapters.selection))
