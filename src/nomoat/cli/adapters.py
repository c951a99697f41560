"""`nomoat adapters`: the local adapter registry under $NOMOAT_HOME (default ~/.nomoat)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import fail as _fail
from nomoat.cli._common import human as _human

app = typer.Typer(
    help="Keep named adapters in the local registry ($NOMOAT_HOME/adapters, default ~/.nomoat): list, show, import, "
    "export, rm. A registry name works wherever --adapter takes a folder.",
    no_args_is_help=True,
)
AdapterName = Annotated[str, typer.Argument(help="The adapter's name in the registry (see `nomoat adapters list`).")]


def _registry_call(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Run a registry operation, turning its errors into clean `error:` lines (exit code 2).

    AdapterNotFoundError and AdapterError are NomoatErrors (the handler reports them); the registry also raises
    plain ValueError (a bad name) and OSError (FileExistsError, a disk error).
    """
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        _fail(e)


def _fmt(value: object, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


@app.command("list")
def adapters_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """List the adapters in the registry: base model, rank, alpha, DoRA, size, creation time, final loss."""
    from rich.console import Console
    from rich.table import Table

    from nomoat.lora.registry import Registry

    reg = Registry()
    infos = _registry_call(reg.list)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        typer.echo(f"no adapters in {reg.adapters_dir}; add one with `nomoat adapters import DIR`")
        return
    table = Table(title=f"adapters in {reg.adapters_dir}")
    for column in ("name", "base model", "r", "alpha", "dora", "size", "created (UTC)", "final loss"):
        table.add_column(column, overflow="fold")
    for i in infos:
        base = Path(i.base_model).name if i.base_model and "/" in i.base_model else i.base_model
        table.add_row(
            i.name,
            _fmt(base) if not i.error else f"unreadable: {i.error}",
            _fmt(i.r),
            _fmt(i.alpha),
            "yes" if i.dora else "no",
            _human(i.size_bytes, "B"),
            _fmt(i.created),
            _fmt(i.final_loss),
        )
    Console(width=max(120, Console().width)).print(table)


def _show_lines(report: dict) -> list[tuple[str, str]]:
    """The human-readable rows of `nomoat adapters show`: provenance, training configuration, metrics."""
    config, prov = report["adapter_config"], report["provenance"]
    base = prov.get("base_model") if isinstance(prov.get("base_model"), dict) else {}
    rows = [("name", report["name"]), ("path", report["path"]),
            ("base model", str(base.get("path") or config.get("base_model_name_or_path") or "-"))]  # fmt: skip
    if base.get("sha256"):
        rows.append(("base sha256", base["sha256"]))
    if base.get("family"):
        rows.append(("family", base["family"]))
    targets = config.get("target_modules")
    rows.append(("adapter", f"{'DoRA' if config.get('use_dora') else 'LoRA'} r={config.get('r')} "
                 f"alpha={config.get('lora_alpha')} rslora={bool(config.get('use_rslora'))} "
                 f"targets={','.join(targets) if isinstance(targets, list) else targets}"))  # fmt: skip
    if config.get("modules_to_save"):
        rows.append(("trained fully", ", ".join(config["modules_to_save"])))
    for i, d in enumerate(prov.get("data") or []):
        records = f", {d['records']} records" if d.get("records") is not None else ""
        rows.append(("data" if i == 0 else "", f"{d.get('path')} (sha256 {d.get('sha256')}{records})"))
    if prov.get("data_format"):
        rows.append(("data format", str(prov["data_format"])))
    training = prov.get("training") or {}
    keys = ("seq_len", "packing", "batch_size", "grad_accum", "epochs", "max_steps", "lr", "schedule", "warmup_steps",
            "weight_decay", "train_on", "seed", "dtype", "quantize_base")  # fmt: skip
    summary = " ".join(f"{k}={training[k]}" for k in keys if training.get(k) is not None)
    if summary:
        rows.append(("training", summary))
    if prov.get("parents"):  # a `nomoat merge` result: what it was combined from, and how
        parents = ", ".join(f"{q.get('name')} (w {q.get('weight')})" for q in prov["parents"])
        opts = " ".join(f"{k}={prov[k]}" for k in ("density", "seed", "majority_sign") if prov.get(k) is not None)
        rows.append(("merged from", f"{parents} by {prov.get('method')}" + (f" ({opts})" if opts else "")))
    metrics = prov.get("metrics") or {}
    if metrics:
        rows.append(("metrics", " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())))
    for key, label in (("imported_from", "imported from"), ("run_dir", "run folder"), ("nomoat_version", "nomoat"),
                       ("created_utc", "created (UTC)"), ("imported_utc", "imported (UTC)")):  # fmt: skip
        if prov.get(key):
            rows.append((label, str(prov[key])))
    rows.append(("size", f"{_human(report['size_bytes'], 'B')} in {len(report['files'])} files"))
    return rows


@app.command("show")
def adapters_show(
    name: AdapterName,
    as_json: Annotated[bool, typer.Option("--json", help="Print adapter_config.json and nomoat.json in full.")] = False,
) -> None:
    """Show one adapter: base model and its SHA-256, data files and hashes, training configuration, metrics."""
    from nomoat.lora.registry import Registry

    report = _registry_call(Registry().show, name)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    rows = _show_lines(report)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


@app.command("import")
def adapters_import(
    folder: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder, e.g. runs/NAME/adapter.")],
    name: Annotated[
        str | None, typer.Option(help="Registry name.", show_default="the folder's name, or NAME for runs/NAME/adapter")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an adapter of the same name.")] = False,
) -> None:
    """Copy an adapter folder (made by `nomoat train`, by peft, or downloaded) into the registry, atomically."""
    from nomoat.lora.registry import Registry

    dest = _registry_call(Registry().import_adapter, folder, name=name, overwrite=force)
    typer.echo(f"imported {folder} as {dest.name!r} ({dest})")


@app.command("export")
def adapters_export(
    name: AdapterName,
    folder: Annotated[Path, typer.Argument(help="Destination folder (new or empty).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty destination folder.")] = False,
) -> None:
    """Copy an adapter out of the registry as a plain PEFT folder (loads in peft and in nomoat)."""
    from nomoat.lora.registry import Registry

    dest = _registry_call(Registry().export, name, folder, overwrite=force)
    typer.echo(f"exported {name!r} to {dest}")


@app.command("rm")
def adapters_rm(
    name: AdapterName,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete an adapter from the registry (asks first unless --yes)."""
    from nomoat.lora.registry import Registry

    reg = Registry()
    path = _registry_call(reg.path, name)
    if not yes:
        if not sys.stdin.isatty():
            _fail(f"not deleting {name!r} without confirmation: there is no terminal to ask; pass --yes")
        if not typer.confirm(f"delete adapter {name!r} ({path})?", default=False):
            typer.echo("kept")
            raise typer.Exit(1)
    _registry_call(reg.remove, name)
    typer.echo(f"removed {name!r}")
