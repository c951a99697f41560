"""A local registry of named adapters under `$NOMOAT_HOME` (default `~/.nomoat`): `Registry` and `AdapterInfo`.

Layout: `$NOMOAT_HOME/adapters/NAME/` is a PEFT adapter folder (`peft_format`); `$NOMOAT_HOME/models/` is reserved.
`Registry` imports, lists, shows, exports and removes adapters; `serve` and `demo` look names up in it. Every write is
atomic: files go to a `.tmp-*` folder inside `adapters/`, are flushed, and are renamed into place, so a crash never
leaves a half-written adapter under its final name (temporary folders are never listed; stale ones are removed by the
next write). Names are plain words (`NAME_RULES`), so a name can never be a path or reach outside the registry.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nomoat.lora.peft_format import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    AdapterError,
    read_adapter_config,
    weights_file,
)
from nomoat.util.errors import NotFoundError
from nomoat.util.files import atomic_dir, fsync_dir, fsync_tree, ordinary_modes, read_json, replace_dir

HOME_ENV = "NOMOAT_HOME"
TMP_PREFIX = ".tmp-"
MAX_NAME = 64
STALE_AFTER_S = 24 * 3600  # a temp folder this old is stale even if its process id has been reused
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
NAME_RULES = f"1-{MAX_NAME} characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-' (a name, never a path)"


class AdapterNotFoundError(NotFoundError, KeyError):
    """No adapter of this name in the registry; the message lists the known names and a close match."""


def validate_name(name: str) -> str:
    r"""Check that `name` is a valid registry name and return it.

    Args:
        name: Candidate adapter name.

    Returns:
        The name, unchanged.

    Raises:
        ValueError: the name is empty, too long, contains a character other than letters, digits, `.`, `_`, `-`
            (so no `/`, `\\`, space or NUL), starts with `.` or `-`, or is `.`/`..`.
    """
    if not isinstance(name, str):
        raise ValueError(f"adapter name must be a string, got {type(name).__name__}; allowed: {NAME_RULES}")
    if not name:
        raise ValueError(f"adapter name is empty; allowed: {NAME_RULES}")
    if len(name) > MAX_NAME:
        raise ValueError(f"adapter name {name[:20]!r}... is {len(name)} characters long; allowed: {NAME_RULES}")
    if name in (".", "..") or name[0] in ".-":
        raise ValueError(f"adapter name {name!r} starts with {name[0]!r}; allowed: {NAME_RULES}")
    if not _NAME_RE.fullmatch(name):
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        raise ValueError(f"adapter name {name!r} contains {', '.join(map(repr, bad))}; allowed: {NAME_RULES}")
    return name


@dataclass
class AdapterInfo:
    """One registry entry, as `Registry.list()` reports it.

    Attributes:
        name: Registry name.
        path: The adapter folder.
        base_model: The base model's path or name (from provenance, else `base_model_name_or_path`).
        r: LoRA rank.
        alpha: LoRA alpha.
        dora: Whether it is a DoRA adapter.
        created: Creation time (UTC, ISO 8601) from `nomoat.json`, else the folder's modification time.
        size_bytes: Total size of the folder's files.
        final_loss: The training loss of the last step, when `nomoat.json` records it.
        error: Why the folder could not be read as an adapter, or None.
    """

    name: str
    path: Path
    base_model: str | None
    r: int | None
    alpha: float | None
    dora: bool
    created: str | None
    size_bytes: int
    final_loss: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict of the fields."""
        return {**asdict(self), "path": str(self.path)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) terminates the process on Windows: rely on the age limit there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def check_adapter_folder(folder: str | os.PathLike) -> Path:
    """Check that a folder is a PEFT LoRA adapter nomoat can load (config and safetensors weights).

    Args:
        folder: The folder to check.

    Returns:
        The folder as a `Path`.

    Raises:
        AdapterError: not a folder, no or unsupported `adapter_config.json`, or no readable safetensors weights.
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise AdapterError(f"{path}: not a folder (give a PEFT adapter folder with {CONFIG_FILE})")
    read_adapter_config(path)
    weights = weights_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise AdapterError(f"{weights}: not a readable safetensors file ({e})") from e
    if not any(".lora_" in k for k in keys):
        raise AdapterError(f"{weights}: holds no LoRA tensors (no key contains '.lora_')")
    return path


class Registry:
    """Named adapters under `home/adapters` (and `home/models`), with atomic writes.

    Args:
        home: The registry's root; default `$NOMOAT_HOME`, else `~/.nomoat`. Folders are created on first write.
    """

    def __init__(self, home: str | os.PathLike | None = None) -> None:
        if home is None:
            home = os.environ.get(HOME_ENV) or "~/.nomoat"
        self.home = Path(home).expanduser()
        self.adapters_dir = self.home / "adapters"
        self.models_dir = self.home / "models"

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # ---- reading -----------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the adapters in the registry, sorted (temporary and hidden folders are skipped)."""
        if not self.adapters_dir.is_dir():
            return []
        out = []
        for entry in self.adapters_dir.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            try:
                validate_name(entry.name)
            except ValueError:
                continue
            out.append(entry.name)
        return sorted(out)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def path(self, name: str) -> Path:
        """The folder of adapter `name`.

        Raises:
            ValueError: `name` is not a valid name.
            AdapterNotFoundError: no adapter of that name (the message lists known names and a close match).
        """
        validate_name(name)
        folder = self.adapters_dir / name
        if folder.is_dir():
            return folder
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listing = f"known adapters: {', '.join(known)}" if known else f"the registry ({self.adapters_dir}) is empty"
        raise AdapterNotFoundError(f"no adapter named {name!r} in the registry{hint} ({listing})")

    def info(self, name: str) -> AdapterInfo:
        """The `AdapterInfo` of one adapter (an unreadable one has `error` set instead of raising)."""
        folder = self.path(name)
        size = _folder_size(folder)
        created = datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
        try:
            config = read_json(folder / CONFIG_FILE, error=AdapterError)
            prov = read_json(folder / PROVENANCE_FILE, missing_ok=True, error=AdapterError)
        except AdapterError as e:
            return AdapterInfo(name, folder, None, None, None, False, created, size, error=str(e))
        base = prov.get("base_model")
        base = base.get("path") if isinstance(base, dict) else base
        metrics = prov.get("metrics") if isinstance(prov.get("metrics"), dict) else {}
        return AdapterInfo(
            name=name, path=folder, base_model=base or config.get("base_model_name_or_path"), r=config.get("r"),
            alpha=config.get("lora_alpha"), dora=bool(config.get("use_dora", False)),
            created=prov.get("created_utc") or prov.get("imported_utc") or created, size_bytes=size,
            final_loss=metrics.get("final_loss"),
        )  # fmt: skip

    def list(self) -> list[AdapterInfo]:
        """Every adapter in the registry, sorted by name."""
        return [self.info(n) for n in self.names()]

    def show(self, name: str) -> dict[str, Any]:
        """Everything known about one adapter.

        Returns:
            A dict with `name`, `path`, `size_bytes`, `files`, `adapter_config` (the raw `adapter_config.json`) and
            `provenance` (the raw `nomoat.json`, `{}` when absent).

        Raises:
            AdapterNotFoundError: no adapter of that name.
            AdapterError: its `adapter_config.json` or `nomoat.json` cannot be read.
        """
        folder = self.path(name)
        prov_file = folder / PROVENANCE_FILE
        return {
            "name": name,
            "path": str(folder),
            "size_bytes": _folder_size(folder),
            "files": sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()),
            "adapter_config": read_json(folder / CONFIG_FILE, error=AdapterError),
            "provenance": read_json(prov_file, missing_ok=True, error=AdapterError),
        }

    # ---- writing -----------------------------------------------------------------------------------------------

    def _tmp(self, name: str, kind: str = "new") -> Path:
        """A fresh temporary folder in `adapters/`, named `.tmp-PID-NAME-KIND-XXXX` so it can be judged stale."""
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.models_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-{name}-{kind}-", dir=self.adapters_dir))

    def clean_stale(self) -> list[Path]:
        """Remove temporary folders left by crashed writes (dead process, or older than a day); returns them."""
        if not self.adapters_dir.is_dir():
            return []
        removed = []
        now = time.time()
        for entry in self.adapters_dir.iterdir():
            if not entry.name.startswith(TMP_PREFIX):
                continue
            pid_text = entry.name[len(TMP_PREFIX) :].split("-", 1)[0]
            try:
                age = now - entry.lstat().st_mtime
            except OSError:
                continue
            pid = int(pid_text) if pid_text.isdigit() else None
            if pid is None or age > STALE_AFTER_S or (pid != os.getpid() and not _pid_alive(pid)):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def _publish(self, tmp: Path, dest: Path) -> None:
        """Rename the complete folder `tmp` to `dest`; an existing `dest` is moved aside first, deleted after.

        The folder gets ordinary modes first (0o755 / 0o644 under the usual umask), so a server running as another
        user can read it; the registry holds no secrets.
        """
        ordinary_modes(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, dest)
        fsync_dir(dest.parent)

    def import_adapter(self, src_dir: str | os.PathLike, name: str | None = None, overwrite: bool = False) -> Path:
        """Copy a PEFT LoRA adapter folder (made by nomoat, by `peft`, or downloaded) into the registry.

        Args:
            src_dir: The adapter folder (`adapter_config.json` + `adapter_model.safetensors`).
            name: Registry name; default the folder's name, or the run's name for a nomoat run's
                `runs/NAME/adapter`.
            overwrite: Replace an adapter of the same name (atomically) instead of refusing.

        Returns:
            The adapter's folder in the registry.

        Raises:
            AdapterError: `src_dir` is not a loadable PEFT LoRA folder.
            ValueError: the name is not valid.
            FileExistsError: an adapter of that name exists and `overwrite` is False.
        """
        src = check_adapter_folder(src_dir).resolve()
        if name is None:
            name = src.parent.name if src.name == "adapter" and src.parent.name else src.name
            try:
                validate_name(name)
            except ValueError as e:
                raise ValueError(f"{e}. Choose a name for {src} (--name NAME)") from None
        validate_name(name)
        dest = self.adapters_dir / name
        if dest.exists() and not overwrite:
            raise FileExistsError(
                f"an adapter named {name!r} is already in the registry ({dest}); remove it, choose another name, "
                "or overwrite it (--force)"
            )
        if dest.resolve() == src:
            raise ValueError(f"{src} is already the registry's adapter {name!r}")
        self.clean_stale()
        tmp = self._tmp(name)
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if not (tmp / PROVENANCE_FILE).is_file():
                prov = {"imported_from": str(src), "imported_utc": _now(), "source": "imported PEFT adapter"}
                (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n", encoding="utf-8")
            self._publish(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def remove(self, name: str) -> None:
        """Delete adapter `name`: it is first renamed to a temporary name, so it vanishes from the registry at once.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        folder = self.path(name)
        self.clean_stale()
        trash = self._tmp(name, "rm")
        os.rmdir(trash)
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def export(self, name: str, dest_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Copy adapter `name` out of the registry into `dest_dir` (written to a temporary sibling, then renamed).

        Args:
            name: The adapter's name.
            dest_dir: Destination folder; it may exist if it is empty.
            overwrite: Replace a non-empty `dest_dir`.

        Returns:
            The destination folder.

        Raises:
            AdapterNotFoundError: no adapter of that name.
            FileExistsError: `dest_dir` is a non-empty folder (or a file) and `overwrite` is False.
        """
        src = self.path(name)
        dest = Path(dest_dir).expanduser()
        if dest.exists() and not dest.is_dir():
            raise FileExistsError(f"{dest} exists and is not a folder")
        if dest.is_dir() and any(dest.iterdir()) and not overwrite:
            raise FileExistsError(f"{dest} is not empty; choose an empty or new folder, or overwrite it (--force)")
        if dest.resolve() == src.resolve() or src.resolve() in dest.resolve().parents:
            raise ValueError(f"cannot export {name!r} into itself ({dest})")
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return dest


__all__ = [
    "AdapterInfo",
    "AdapterNotFoundError",
    "Registry",
    "check_adapter_folder",
    "validate_name",
]
