"""Files written atomically, hashed and read as JSON: the one implementation of each that nomoat uses.

A file or folder is written under a temporary name beside its destination, flushed to disk and renamed into place
(`os.replace`), so a crash leaves either the old version or the new one, never half of either. What is published
gets the permissions a plain `mkdir` / `open` would give it (folders 0o777, files 0o666, less the umask), not the
owner-only modes of `tempfile`, so a server running as another user can read an adapter or an exported model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nomoat.util.errors import NomoatError

_CHUNK = 1 << 22


# POSIX flushes a file through a read-only handle (a copied read-only file too); Windows needs write access.
_FSYNC_MODE = "rb+" if os.name == "nt" else "rb"


def current_umask() -> int:
    """The process's umask, read without changing it where the platform allows (`/proc/self/status`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def ordinary_modes(path: str | os.PathLike) -> None:
    """Give a file, or a folder and everything under it, the modes `mkdir` and `open` would.

    That is 0o777 for folders (and files the owner may execute) and 0o666 for other files, less the umask.
    Symbolic links are left alone.
    """
    path = Path(path)
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        elif p.is_file():
            os.chmod(p, (0o777 if p.stat().st_mode & 0o100 else 0o666) & ~mask)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder` (and the folder itself) to disk, so a rename that follows publishes it whole."""
    folder = Path(folder)
    for f in sorted(folder.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, _FSYNC_MODE) as fh:
                os.fsync(fh.fileno())
    fsync_dir(folder)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it, say) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file path beside `path`; renamed onto `path` when the block ends without an exception.

    For writers that want a file name (safetensors' `save_file`, `Figure.savefig`). The temporary file is removed
    when the block raises. The file gets the permissions a plain `open(path, "w")` would give it (umask applied),
    even where the writer replaced it with a file of its own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path)
    try:
        yield tmp
        ordinary_modes(tmp)
        with open(tmp, _FSYNC_MODE) as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _new_file(path: Path) -> Path:
    """Create an empty file `.NAME.XXXXXXXX.tmp` beside `path`, mode 0o666 less the umask (mkstemp's is 0o600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 2, **dumps: Any) -> None:
    """Write `data` as JSON (with a final newline) to `path` atomically; `dumps` go to `json.dumps`."""
    atomic_write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")


def replace_dir(src: Path, dest: Path) -> None:
    """Rename folder `src` onto `dest`; an existing `dest` is moved aside first, deleted after (restored on error)."""
    if not dest.exists():
        os.replace(src, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[Path]:
    """A temporary folder beside `dest`, flushed and renamed onto `dest` when the block ends without an exception.

    An existing `dest` is replaced whole; on an exception the temporary folder is removed and `dest` is untouched.
    The published tree gets ordinary modes (`ordinary_modes`), not `mkdtemp`'s 0o700.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        ordinary_modes(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """The SHA-256 hex digest of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(
    path: str | os.PathLike,
    *,
    missing_ok: bool = False,
    error: Callable[[str], Exception] = NomoatError,
) -> dict[str, Any]:
    """Read a JSON object from `path`.

    Args:
        path: The file.
        missing_ok: Return {} when the file does not exist (instead of raising).
        error: The exception type raised, with a message naming the file (and line) and what is wrong.

    Raises:
        The `error` type: the file cannot be read, is not valid JSON, or holds something other than an object.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every non-empty line of a JSON-lines file, parsed."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
