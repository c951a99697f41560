"""`nomoat info` (describe a model folder) and `nomoat convert` (pickle weights to safetensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import fail as _fail
from nomoat.cli._common import human as _human


def info(
    path: Annotated[Path, typer.Argument(
        help="demo, a Hub id ORG/NAME[@REV] (Hugging Face cache), a model folder, a .gguf file or ollama:NAME[:TAG]."
    )],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Describe a model folder: family, parameters, dtype, context length, vocabulary, chat template."""
    from nomoat.models.checkpoint import CheckpointError, checkpoint_summary, load_config
    from nomoat.models.families import UnsupportedModelError

    try:
        cfg = load_config(path)
        summary = checkpoint_summary(path)
    except (CheckpointError, UnsupportedModelError) as e:
        _fail(e)
    chat_template, tokenizer_error = _chat_template_state(path)
    report = {
        "path": str(path),
        "family": cfg.family,
        "architecture": (cfg.hf_config.get("architectures") or [None])[0],
        "parameters": summary["parameters"],
        "dtype": max(summary["dtypes"], key=summary["dtypes"].get) if summary["dtypes"] else None,
        "size_bytes": summary["bytes"],
        "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "tied_embeddings": cfg.tie_word_embeddings,
        "sliding_window": cfg.sliding_window if "sliding_attention" in cfg.layer_types else None,
        "rope": cfg.rope["full_attention"]["rope_type"] if "full_attention" in cfg.rope else None,
        "chat_template": chat_template,
        "tokenizer_error": tokenizer_error,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    rows = [
        ("family", f"{report['family']} ({report['architecture']})"),
        ("parameters", f"{_human(report['parameters'])} ({report['parameters']:,})"),
        ("dtype", f"{report['dtype']} ({_human(report['size_bytes'], 'B')})"),
        ("context length", f"{report['context_length']:,}"),
        ("vocabulary", f"{report['vocab_size']:,}"),
        ("layers", f"{cfg.num_layers} x hidden {cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv"),
        ("embeddings", "tied" if cfg.tie_word_embeddings else "untied"),
        ("rope", report["rope"]),
        ("sliding window", report["sliding_window"] or "none"),
        ("chat template", "yes" if chat_template else f"no{f' ({tokenizer_error})' if tokenizer_error else ''}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _chat_template_state(path: Path) -> tuple[bool, str | None]:
    """Whether the folder's tokenizer has a chat template, and why not when it cannot be read."""
    from nomoat.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path).chat_template is not None, None
    except Exception as e:  # a model without a usable tokenizer is still worth describing
        return False, f"tokenizer: {str(e).splitlines()[0]}"


def convert(
    path: Annotated[Path, typer.Argument(help="Model folder whose weights are pickle files (*.bin, *.pt).")],
    out: Annotated[Path | None, typer.Option(help="Write the converted folder here (default: in place).")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Confirm that you trust these pickle files (required).")
    ] = False,
) -> None:
    """Convert pickle weights to safetensors, once, for a folder you trust."""
    from nomoat.models.checkpoint import CheckpointError, convert_pickle_checkpoint

    if not trust_pickle:
        _fail(
            "pickle files can run arbitrary code when loaded. Pass --trust-pickle if you trust "
            f"{path}; tensors are then read with torch.load(weights_only=True)."
        )
    try:
        dest = convert_pickle_checkpoint(path, out)
    except (CheckpointError, OSError) as e:
        _fail(e)
    except Exception as e:  # torch's weights_only unpickler refusing a global, for instance
        _fail(f"could not read the pickle weights safely: {str(e).splitlines()[0]}")
    typer.echo(f"wrote {dest / 'model.safetensors'}")
