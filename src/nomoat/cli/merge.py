"""`nomoat merge`: combine adapters into a new adapter (linear, svd, cat, ties, dare)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from nomoat.cli._common import fail, parse_adapter, resolve_adapters

METHOD_HELP = (
    "How to combine (peft's add_weighted_adapter semantics): cat (exact weighted sum of the updates, rank = sum of "
    "ranks), svd (the exact sum truncated to --rank by SVD), linear (mixes A and B matrices: cheap, approximate, "
    "equal ranks), ties / dare_ties / dare_linear / magnitude_prune (prune to --density, then mix A and B; TIES "
    "elects a sign per value, DARE drops values at random with --seed), and ties_svd, dare_linear_svd, "
    "dare_ties_svd, magnitude_prune_svd (the same on the full updates, then SVD to --rank)."
)


def _weights(specs: list[str], weights: list[str] | None) -> list[float] | None:
    """The weights from --weights (comma-separated and/or repeated) or NAME:WEIGHT suffixes; None means 1 each."""
    if not weights:
        return None
    if any(parse_adapter(s) != (s, 1.0) for s in specs):
        fail("give weights either as NAME:WEIGHT or with --weights, not both")
    values = []
    for item in weights:
        for part in item.split(","):
            try:
                values.append(float(part))
            except ValueError:
                fail(f"--weights: {part.strip()!r} is not a number; write e.g. --weights 1.0,0.5")
    if len(values) != len(specs):
        fail(f"{len(specs)} adapters but {len(values)} weights; give one weight per adapter, in order")
    return values


def merge(
    adapters: Annotated[
        list[str],
        typer.Argument(
            help="Adapters to combine, in order: registry names or adapter folders, each optionally NAME:WEIGHT.",
            show_default=False,
        ),
    ],
    method: Annotated[str, typer.Option("--method", "-m", help=METHOD_HELP)] = "cat",
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights",
            "-w",
            help="One weight per adapter: 1.0,0.5 or repeated (--weights 1 -w 0.5); "
            "negative subtracts. Default 1 each.",
        ),
    ] = None,
    density: Annotated[
        float | None,
        typer.Option(help="Fraction of values kept, in (0, 1]: required by ties, dare_*, magnitude_prune."),
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Target rank of the svd methods (default: the largest).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of DARE's random drops (default 0; peft's with torch.manual_seed(SEED)).")
    ] = None,
    majority_sign: Annotated[
        str, typer.Option("--majority-sign", help="TIES sign election: total (sum of values) or frequency.")
    ] = "total",
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Registry name of the new adapter (where it goes by default).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write a folder here instead of into the registry (the adapter; or, with "
            "--into-base, the merged model).",
        ),
    ] = None,
    into_base: Annotated[
        Path | None,
        typer.Option(
            "--into-base",
            help="A base model folder: write base + combined adapter as a full Hugging Face model to --out.",
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="With --into-base: auto (the base's dtype), float32, bfloat16, float16.")
    ] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing registry adapter or folder.")] = False,
    allow_different_bases: Annotated[
        bool,
        typer.Option(
            "--allow-different-bases", help="Combine even when the adapters' recorded base-model hashes differ."
        ),
    ] = False,
) -> None:
    """Combine adapters into one new adapter, with the semantics of peft's add_weighted_adapter.

    The result is an ordinary PEFT adapter (with nomoat.json listing the parents, their weights-file hashes and the
    method), saved in the registry under --name, or as a folder with --out; or, with --into-base MODEL --out DIR,
    merged into the base as a full model. Examples:

        nomoat merge math chat --weights 1,0.5 --name math-chat

        nomoat merge a b c --method ties --density 0.5 --out mixed/

        nomoat merge a b --method svd --rank 8 --into-base models/llama --out merged/
    """
    from nomoat.lora.combine import Parent, check_method, combine_adapters, save_combined
    from nomoat.lora.registry import Registry, validate_name

    check_method(method)  # a CombineError (a NomoatError) for an unknown method
    if into_base is not None and out is None:
        fail("--into-base writes a full model: say where with --out DIR")
    if into_base is not None and name is not None:
        fail("--name puts an adapter in the registry, --into-base writes a model to --out; run the command twice "
             "for both")  # fmt: skip
    if out is None and name is None:
        fail("say where the new adapter goes: --name NEW (into the registry) or --out DIR (a folder)")
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        fail(f"{out} exists and is not empty; choose another --out or pass --force")
    registry = Registry()
    if out is None:
        try:
            validate_name(name)
        except ValueError as e:
            fail(e)
        if name in registry and not force:
            fail(f"an adapter named {name!r} is already in the registry; choose another --name or pass --force")
    values = _weights(adapters, weights)
    specs = [parse_adapter(spec) for spec in adapters]  # one adapter per argument: a stack exits here
    resolved = resolve_adapters(adapters)
    parents = [Parent(folder, w if values is None else values[i], spec[0])
               for i, (spec, (folder, w)) in enumerate(zip(specs, resolved))]  # fmt: skip
    try:
        combined = combine_adapters(
            parents,
            method,
            density=density,
            rank=rank,
            seed=seed,
            majority_sign=majority_sign,
            allow_different_bases=allow_different_bases,
        )
    except (ValueError, OSError) as e:  # AdapterError and CombineError are ValueErrors
        fail(e)
    for warning in combined.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    plural = "s" * (len(parents) != 1)
    what = f"{len(parents)} adapter{plural} with {combined.provenance['effective_method']} (r={combined.lora_config.r})"
    try:
        if into_base is not None:
            from nomoat.export.merged import export_merged

            with tempfile.TemporaryDirectory(prefix="nomoat-merge-") as tmp:
                adapter = save_combined(combined, Path(tmp) / "adapter")
                written = export_merged(into_base, [(adapter, 1.0)], out, dtype=dtype)
            typer.echo(f"merged {what} into {into_base}: wrote {written}")
        elif out is not None:
            combined.provenance["name"] = name
            typer.echo(f"merged {what}: wrote {save_combined(combined, out)}")
        else:
            combined.provenance["name"] = name
            with tempfile.TemporaryDirectory(prefix="nomoat-merge-") as tmp:
                dest = registry.import_adapter(save_combined(combined, Path(tmp) / name), name=name, overwrite=force)
            typer.echo(f"merged {what} into the registry as {name!r} ({dest})")
    except (ValueError, OSError) as e:  # AdapterError and ExportError are ValueErrors
        fail(e)
