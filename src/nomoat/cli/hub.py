"""`nomoat pull`, `models`, `rm`, `push`: models and adapters by name, through the Hugging Face Hub.

`pull` downloads a model (safetensors, configs, tokenizer and template files; never pickles), a GGUF file of a GGUF
repository, or an adapter (which then goes into the registry) into the standard Hugging Face cache, where every
command finds it by its id offline. `models` lists what can be used by name, `rm` removes a cached model, `push`
uploads a registry adapter with a model card written from its provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from nomoat.cli._common import fail, human

Id = Annotated[str, typer.Argument(help="A Hub id, ORG/NAME, optionally @REVISION (a branch, tag or commit).")]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "*.json", "*.jinja", "*.md", "*.txt"]


def _hub_id(spec: str, revision: str | None = None):  # noqa: ANN202
    from nomoat.util.hub import HubId, parse_hub_id

    parsed = parse_hub_id(spec)
    if parsed is None:
        fail(f"{spec!r} is not a Hub id", hint="write it ORG/NAME or ORG/NAME@REVISION, e.g. "
             "HuggingFaceTB/SmolLM2-135M-Instruct")  # fmt: skip
    if revision and parsed.revision and revision != parsed.revision:
        fail(f"two revisions given: @{parsed.revision} and --revision {revision}")
    return HubId(parsed.repo, revision or parsed.revision)


def _remote_files(hub_id) -> list[str] | None:  # noqa: ANN001
    """The repository's files, or None when offline (HF_HUB_OFFLINE) and it is already cached."""
    from nomoat.util.hub import HubError, repo_files, resolve_cached

    try:
        return repo_files(hub_id)
    except HubError as e:
        if "downloading is off" not in str(e):
            raise
        try:
            resolve_cached(hub_id)
        except HubError:
            raise e from None
        return None


def pull(
    model_id: Id,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main).")] = None,
    include: Annotated[list[str] | None, typer.Option(
        "--include", help="Download only files matching this glob (repeatable); pickle weights never are.")] = None,
    file: Annotated[list[str] | None, typer.Option(
        "--file", help="The file to download from a GGUF repository, e.g. model-Q4_K_M.gguf (repeatable).")] = None,
    name: Annotated[str | None, typer.Option(help="Registry name of a pulled adapter (default: the repo's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a registry adapter of the same name.")] = False,
) -> None:
    """Download a model (or an adapter, or a GGUF file) from the Hugging Face Hub into its local cache.

    Afterwards every command takes the id as the model (`nomoat chat ORG/NAME`), offline. Downloads resume where
    they stopped; HF_TOKEN, HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME / HF_HUB_CACHE apply as for huggingface_hub.
    An adapter repository (adapter_config.json) goes into the adapter registry.
    """
    from nomoat.util.hub import PICKLES, download, resolve_cached

    hub_id = _hub_id(model_id, revision)
    files = _remote_files(hub_id)
    if files is None:
        typer.echo(f"{hub_id} is already in the cache (offline): {resolve_cached(hub_id)}")
        return
    if "adapter_config.json" in files:
        _pull_adapter(hub_id, name, force)
        return
    ggufs = [f for f in files if f.endswith(".gguf")]
    if file:
        missing = [f for f in file if f not in files]
        if missing:
            fail(f"{hub_id} has no {', '.join(missing)}", hint=f"its files: {', '.join(files)}")
        folder = download(hub_id, files=file)
        for f in file:
            typer.echo(f"pulled {folder / f}")
        typer.echo(f"use it: nomoat chat {folder / file[0]}")
        return
    if ggufs and "config.json" not in files:
        fail(f"{hub_id} is a GGUF repository with {len(ggufs)} files; choose one with --file",
             hint=f"files: {', '.join(ggufs)}")  # fmt: skip
    if not any(f.endswith(".safetensors") for f in files):
        import fnmatch

        pickles = [f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLES)]
        only = f", only pickle files ({', '.join(pickles)})" if pickles else ""
        fail(f"{hub_id} has no safetensors weights{only}",
             hint="nomoat never downloads pickle weights (loading them can run code); look for a safetensors "
             "revision or a converted repository")  # fmt: skip
    folder = download(hub_id, allow=include)
    typer.echo(f"pulled {hub_id} into {folder}")
    typer.echo(f"use it by name: nomoat chat {hub_id}")


def _pull_adapter(hub_id, name: str | None, force: bool) -> None:  # noqa: ANN001
    from nomoat.lora.registry import Registry
    from nomoat.util.hub import download

    folder = download(hub_id, allow=ADAPTER_FILES)
    registry = Registry()
    try:
        dest = registry.import_adapter(folder, name=name or hub_id.repo.split("/")[-1], overwrite=force)
    except (ValueError, OSError) as e:
        fail(e)
    base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    typer.echo(f"pulled adapter {hub_id} into the registry as {dest.name}: {dest}")
    typer.echo(f"use it: nomoat chat {base or 'BASE_MODEL'} --adapter {dest.name}")


# ---- models --------------------------------------------------------------------------------------------------------


def _describe(name: str, path: Path, where: str) -> dict[str, Any]:
    """One row of `nomoat models`: family, parameters, dtype, size, path (errors in place of what cannot be read)."""
    from nomoat.models.checkpoint import checkpoint_summary, load_config

    row: dict[str, Any] = {"name": name, "where": where, "path": str(path), "family": None, "parameters": None,
                           "dtype": None, "size_bytes": None, "error": None}  # fmt: skip
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        row["family"] = f"adapter of {base}"
        return row
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            row["error"] = "no config.json or .gguf file"
            return row
        path = ggufs[0]
        row["path"] = str(path)
    try:
        row["family"] = load_config(path).family
        summary = checkpoint_summary(path)
    except Exception as e:  # noqa: BLE001 - one unreadable entry must not hide the others
        row["error"] = str(e).splitlines()[0]
        return row
    dtypes = summary["dtypes"]
    row.update(parameters=summary["parameters"], size_bytes=summary["bytes"],
               dtype=max(dtypes, key=dtypes.get) if dtypes else None)  # fmt: skip
    return row


def model_rows() -> list[dict[str, Any]]:
    """Every model usable by name: `demo`, the Hub cache's revisions, Ollama's store."""
    from nomoat.util import ollama
    from nomoat.util.hub import cached_repos, demo_dir

    rows = [_describe("demo", demo_dir(), "embedded")]
    for repo in cached_repos():
        for i, (commit, refs, snapshot) in enumerate(repo.revisions):
            label = repo.repo if "main" in refs or (i == 0 and not refs) else f"{repo.repo}@{(refs or [commit])[0]}"
            rows.append(_describe(label, snapshot, "hub cache"))
    for name in ollama.available(ollama.store_root()):
        try:
            blob = ollama.resolve(name).gguf
        except ollama.OllamaError as e:
            rows.append({"name": f"ollama:{name}", "where": "ollama", "path": "", "error": str(e)})
            continue
        rows.append(_describe(f"ollama:{name}", blob, "ollama"))
    return rows


def models(as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False) -> None:
    """List the models you can use by name: the embedded `demo`, the Hugging Face cache, Ollama's store."""
    from rich.console import Console
    from rich.table import Table

    from nomoat.util.hub import cache_dir

    rows = model_rows()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"models by name (Hub cache {cache_dir()})")
    for col in ("name", "family", "parameters", "dtype", "size", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r.get("family") or (f"[red]{r['error']}[/red]" if r.get("error") else "-"),
                      human(r["parameters"]) if r.get("parameters") else "-", r.get("dtype") or "-",
                      human(r["size_bytes"], "B") if r.get("size_bytes") else "-", r["path"])  # fmt: skip
    Console(width=max(160, Console().width)).print(table)
    typer.echo("pull more with `nomoat pull ORG/NAME`; use one with e.g. `nomoat chat demo`")


def rm(
    model_id: Id,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove a model from the Hugging Face cache (all its revisions, or only ORG/NAME@REVISION), after asking."""
    from nomoat.util.hub import cached_repos, remove_cached

    if model_id == "demo" or model_id.startswith("ollama:"):
        fail(f"{model_id} is not in the Hugging Face cache", hint="the embedded demo stays; Ollama's models are "
             "removed with `ollama rm`")  # fmt: skip
    hub_id = _hub_id(model_id)
    repo = next((r for r in cached_repos() if r.repo == hub_id.repo), None)
    if repo is not None and not yes:
        what = f"revision {hub_id.revision} of " if hub_id.revision else ""
        if not typer.confirm(f"remove {what}{hub_id.repo} ({human(repo.size_bytes, 'B')}) from {repo.folder}?"):
            fail("nothing removed")
    removed = remove_cached(hub_id)
    typer.echo(f"removed {hub_id} from {removed.folder.parent}")


# ---- push ----------------------------------------------------------------------------------------------------------


def push(
    adapter: Annotated[str, typer.Argument(help="Registry name or folder of the adapter to upload.")],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository to create or update, ORG/NAME.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    message: Annotated[str | None, typer.Option(help="Commit message (default: names the adapter).")] = None,
) -> None:
    """Upload an adapter to the Hugging Face Hub, with a model card written from its provenance.

    The card names the base model and its hash, the data files and their hashes, the method, its configuration and
    metrics. Needs a token with write access (HF_TOKEN, or `hf auth login`).
    """
    import shutil
    import tempfile

    from nomoat.cli._common import resolve_adapters
    from nomoat.export.model_card import model_card
    from nomoat.util.hub import upload_folder

    hub_id = _hub_id(repo_id)
    ((folder, _),) = resolve_adapters([adapter])
    with tempfile.TemporaryDirectory(prefix="nomoat-push-") as tmp:
        stage = Path(tmp) / "adapter"
        shutil.copytree(folder, stage, ignore=shutil.ignore_patterns(".*"))
        (stage / "README.md").write_text(model_card(folder, hub_id.repo), encoding="utf-8")
        url = upload_folder(hub_id, stage, private=private,
                            message=message or f"Upload adapter {folder.name} with nomoat")  # fmt: skip
    typer.echo(f"pushed {folder} to {hub_id.repo}: {url}")
    typer.echo(f"others get it with: nomoat pull {hub_id.repo}")


__all__ = ["models", "pull", "push", "rm", "model_rows"]
