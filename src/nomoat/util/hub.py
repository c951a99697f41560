"""Models by name: Hugging Face Hub ids (`ORG/NAME[@REVISION]`) found in the local Hub cache, and `demo`.

`local_path(spec)` turns what a user typed as a model into what the loaders read: an existing path stays as it is,
`demo` is the embedded model's folder, and a Hub id is the snapshot folder that `huggingface_hub` keeps in its cache
(`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), found offline with `huggingface_hub`'s own
cache functions. `download` fetches a repository into that cache (`nomoat pull`), turning the Hub's failures into
`HubError`s that say what to do. It sits at the bottom layer because models, tokenizers and the CLI all resolve names.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomoat.util.errors import ModelError

DEMO = "demo"
"""The name of the embedded tiny model."""

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[^\s@]+))?")
# What `pull` downloads from a model repository: configs, safetensors weights, tokenizer and chat template files.
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "*.md")
# Never downloaded: pickle-based weights (loading them can run code) and weights of other frameworks.
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle", "*.msgpack", "*.h5", "*.ot", "*.onnx*")
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN to a token that has access), after accepting the "


class HubError(ModelError):
    """A Hub id that cannot be resolved or downloaded: not cached while offline, gated, missing, or no disk space."""


@dataclass(frozen=True)
class HubId:
    """A parsed Hub id.

    Attributes:
        repo: `ORG/NAME`.
        revision: A branch, tag or commit, or None for the default branch.
    """

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: Any) -> HubId | None:
    """`ORG/NAME[@REVISION]` as a `HubId`, or None when `spec` is not written like one (or is an existing path)."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    text = os.fspath(spec)
    match = HUB_ID.fullmatch(text)
    if match is None or Path(text).expanduser().exists():
        return None
    return HubId(match["repo"], match["revision"])


def demo_dir() -> Path:
    """The embedded model's folder (shipped inside the package)."""
    return Path(__file__).resolve().parent.parent / "demo" / "model"


def cache_dir() -> Path:
    """The Hub cache folder `huggingface_hub` uses (honours `HF_HUB_CACHE` and `HF_HOME` as set now)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def _hf() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401 - makes `huggingface_hub.errors` an attribute
    except ImportError as e:  # pragma: no cover - a dependency of nomoat
        raise HubError("models by Hub id need the huggingface_hub package",
                       hint="pip install huggingface_hub") from e  # fmt: skip
    return huggingface_hub


def resolve_cached(hub_id: HubId) -> Path:
    """The cached snapshot folder of a Hub id (its one `.gguf` file for a pulled GGUF repository), found offline.

    Raises:
        HubError: The repository (at that revision) is not in the cache, with the command that downloads it.
    """
    hf = _hf()
    try:
        folder = hf.snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=str(cache_dir()),
                                      local_files_only=True, ignore_patterns=list(PICKLES))  # fmt: skip
    except hf.errors.LocalEntryNotFoundError as e:
        partial = Path(getattr(e, "snapshot_path", None) or "/nonexistent")
        # A pull with --include or --file leaves files out on purpose: the loaders name a missing one they need.
        if not ((partial / "config.json").is_file() or any(partial.glob("*.gguf"))):
            raise HubError(
                f"{hub_id} is not in the Hugging Face cache ({cache_dir()}), or only in part",
                hint=f"download it with `nomoat pull {hub_id}` (or set HF_HOME / HF_HUB_CACHE to the cache that has "
                "it)",
            ) from e
        folder = str(partial)
    except hf.errors.HFValidationError as e:
        raise HubError(f"{hub_id} is not a valid Hub id: {e}") from e
    folder = Path(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if not (folder / "config.json").is_file() and len(ggufs) == 1:
        return ggufs[0]  # a GGUF repository of which one file was pulled (--file) names that file
    return folder


def local_path(spec: Any) -> Any:
    """What a model argument names on disk: `demo` -> the embedded model, a Hub id -> its cached snapshot.

    Anything else (an existing path, a `.gguf` file, `ollama:NAME`, a path that does not exist and is not written
    like a Hub id) is returned unchanged, so the loaders report it as they always did.
    """
    if isinstance(spec, (str, os.PathLike)) and os.fspath(spec) == DEMO and not Path(DEMO).exists():
        return demo_dir()
    hub_id = parse_hub_id(spec)
    return spec if hub_id is None else resolve_cached(hub_id)


# ---- downloading ---------------------------------------------------------------------------------------------------


def _http_status(error: Exception) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def hub_failure(error: BaseException, hub_id: HubId) -> HubError | None:
    """A clear `HubError` for what `huggingface_hub` raised while talking to the Hub, or None when not its kind."""
    hf = _hf()
    errors = hf.errors
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if isinstance(error, errors.GatedRepoError):
        return HubError(f"{hub_id.repo} is a gated model: the Hub needs a logged-in user who accepted its terms",
                        hint=LOGIN_HINT + f"terms on {endpoint}/{hub_id.repo}")  # fmt: skip
    if isinstance(error, errors.RevisionNotFoundError):
        return HubError(f"{hub_id.repo} has no revision {hub_id.revision!r} on the Hub",
                        hint="give a branch, tag or commit of the repository (@REVISION or --revision)")  # fmt: skip
    if isinstance(error, errors.RepositoryNotFoundError):
        if _http_status(error) == 401:
            return HubError(f"{hub_id.repo}: the Hub refused access (401): it is private, or needs a login",
                            hint=LOGIN_HINT + "model's terms if it has any")  # fmt: skip
        return HubError(f"{hub_id.repo} was not found on the Hub (404)",
                        hint="check the spelling ORG/NAME; a private repository also needs a login (HF_TOKEN)")
    if isinstance(error, errors.RemoteEntryNotFoundError):
        return HubError(f"{hub_id}: a file is not in the repository (404): {str(error).splitlines()[-1]}")
    if isinstance(error, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return HubError(f"{hub_id} is not in the Hugging Face cache ({cache_dir()}) and downloading is off "
                        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}) or the Hub cannot be reached",
                        hint=f"unset HF_HUB_OFFLINE and check the connection to {endpoint}")  # fmt: skip
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return HubError(f"no space left on the disk holding the Hugging Face cache ({cache_dir()}) while downloading "
                        f"{hub_id}", hint="free some space (`nomoat rm ID` removes a cached model) or point "
                        "HF_HUB_CACHE elsewhere, then pull again: the download resumes")  # fmt: skip
    if isinstance(error, errors.HfHubHTTPError) and _http_status(error) in (401, 403):
        return HubError(f"{hub_id.repo}: the Hub refused ({_http_status(error)}): no token, or one that may not do "
                        "this",
                        hint=LOGIN_HINT.replace("has access", "has write access") + "repository's terms if any")
    if isinstance(error, errors.HfHubHTTPError):
        return HubError(f"{hub_id}: the Hub answered {_http_status(error)}: {str(error).splitlines()[0]}")
    name = type(error).__name__
    if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError"):
        return HubError(f"cannot reach the Hub at {endpoint} ({name}: {error})",
                        hint="check the connection (HF_ENDPOINT names the Hub); a pull started resumes")  # fmt: skip
    return None


def repo_files(hub_id: HubId) -> list[str]:
    """The files of a Hub repository at the id's revision (one API call).

    Raises:
        HubError: The Hub refuses (gated, 401, 404) or cannot be reached.
    """
    hf = _hf()
    try:
        info = hf.HfApi().model_info(hub_id.repo, revision=hub_id.revision)
    except Exception as e:
        failure = hub_failure(e, hub_id)
        if failure is None:
            raise
        raise failure from e
    return sorted(s.rfilename for s in info.siblings or [])


def download(hub_id: HubId, allow: list[str] | None = None, files: list[str] | None = None) -> Path:
    """Download a repository (the files matching `allow`, or exactly `files`) into the Hub cache; resumes.

    Pickle weights are never fetched, whatever `allow` says. Progress bars are `huggingface_hub`'s; `HF_TOKEN` and
    `HF_HUB_OFFLINE` apply as they do for `huggingface_hub`.

    Returns:
        The snapshot folder.

    Raises:
        HubError: Gated (401), missing (404), offline and not cached, no disk space, Hub unreachable.
    """
    hf = _hf()
    try:
        if files:
            for name in files:
                path = hf.hf_hub_download(hub_id.repo, name, revision=hub_id.revision, cache_dir=str(cache_dir()))
            return Path(path).parents[len(Path(files[-1]).parts) - 1]  # snapshots/COMMIT/<the file's path>
        return Path(hf.snapshot_download(hub_id.repo, revision=hub_id.revision, cache_dir=str(cache_dir()),
                                         allow_patterns=allow or list(MODEL_FILES),
                                         ignore_patterns=list(PICKLES)))  # fmt: skip
    except Exception as e:
        failure = hub_failure(e, hub_id)
        if failure is None:
            raise
        raise failure from e


def upload_folder(hub_id: HubId, folder: Path, private: bool = False, message: str = "Upload with nomoat") -> str:
    """Create the repository (if needed) and upload a folder's files as one commit; returns the commit's URL.

    Raises:
        HubError: No write access (401/403), Hub unreachable, offline.
    """
    hf = _hf()
    try:
        api = hf.HfApi()
        api.create_repo(hub_id.repo, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=hub_id.repo, folder_path=str(folder), revision=hub_id.revision,
                                 commit_message=message)  # fmt: skip
    except Exception as e:
        failure = hub_failure(e, hub_id)
        if failure is None:
            raise
        raise failure from e
    return str(getattr(info, "commit_url", info))


@dataclass
class CachedRepo:
    """One model repository of the Hub cache.

    Attributes:
        repo: `ORG/NAME`.
        revisions: `(commit, refs, snapshot folder)` of each cached revision.
        size_bytes: Bytes on disk (blobs shared between revisions counted once).
        folder: The repository's cache folder.
    """

    repo: str
    revisions: list[tuple[str, list[str], Path]]
    size_bytes: int
    folder: Path


def cached_repos() -> list[CachedRepo]:
    """The model repositories of the Hub cache, sorted by name (an empty list when there is no cache)."""
    hf = _hf()
    root = cache_dir()
    if not root.is_dir():
        return []
    try:
        info = hf.scan_cache_dir(root)
    except hf.errors.CacheNotFound:  # pragma: no cover - checked above
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        revisions = [(r.commit_hash, sorted(r.refs), Path(r.snapshot_path))
                     for r in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)]  # fmt: skip
        out.append(CachedRepo(repo.repo_id, revisions, repo.size_on_disk, Path(repo.repo_path)))
    return sorted(out, key=lambda r: r.repo.lower())


def remove_cached(hub_id: HubId) -> CachedRepo:
    """Delete a repository (every cached revision, or only `hub_id.revision`) from the Hub cache.

    Raises:
        HubError: It is not in the cache.
    """
    hf = _hf()
    repo = next((r for r in cached_repos() if r.repo == hub_id.repo), None)
    if repo is None:
        raise HubError(f"{hub_id.repo} is not in the Hugging Face cache ({cache_dir()})",
                       hint="`nomoat models` lists what is there")  # fmt: skip
    if hub_id.revision is None:
        commits = [c for c, _, _ in repo.revisions]
    else:
        commits = [c for c, refs, _ in repo.revisions if hub_id.revision in refs or c.startswith(hub_id.revision)]
        if not commits:
            raise HubError(f"{hub_id.repo} has no cached revision {hub_id.revision!r}")
    if len(commits) == len(repo.revisions):
        import shutil

        shutil.rmtree(repo.folder)
    else:
        hf.scan_cache_dir(cache_dir()).delete_revisions(*commits).execute()
    return repo
