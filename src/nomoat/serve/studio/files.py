"""Dataset files for the studio: uploads (bounded), the files under `--data-dir` folders, and the data preview.

A dataset is named by a root and a relative path: root `uploads` is the studio's upload folder, root `0`, `1`, ...
the allowed data folders in order. Every path is resolved inside its root (`guard.safe_join`), so a request can
never read anything else. The preview (rendered examples with the trained tokens marked, and the data summary of
`nomoat train`) runs in a child process (`python -m nomoat.cli.studio preview`): reading and tokenizing a big or
broken file never blocks or crashes the server.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from nomoat.serve.errors import APIError
from nomoat.serve.studio.guard import DATA_SUFFIXES, check_file_name, safe_join
from nomoat.serve.studio.settings import StudioSettings
from nomoat.util.files import atomic_write_bytes

MAX_LISTED = 500  # files listed per folder
PREVIEW_TIMEOUT_S = 120.0


def roots(settings: StudioSettings) -> dict[str, Path]:
    """Root name -> folder: `uploads`, then `0`, `1`, ... for the allowed data folders."""
    out = {"uploads": settings.uploads}
    out.update({str(i): Path(d).expanduser() for i, d in enumerate(settings.data_dirs)})
    return out


def resolve(settings: StudioSettings, root: str, path: str) -> Path:
    """The file a `(root, path)` names, refused unless it is an existing data file inside that root."""
    folders = roots(settings)
    if root not in folders:
        raise APIError(403, f"Unknown data folder {root!r}; this server may read: {', '.join(folders)}.", "root",
                       "path_not_allowed")  # fmt: skip
    target = safe_join(folders[root], path)
    if not target.is_file():
        raise APIError(404, f"No dataset file {path!r} in {root}.", "path", "file_not_found")
    if target.suffix.lower() not in DATA_SUFFIXES:
        raise APIError(400, f"{path!r} is not a dataset file ({', '.join(DATA_SUFFIXES)}).", "path", "invalid_value")
    return target


def list_files(settings: StudioSettings) -> list[dict[str, Any]]:
    """The dataset files the studio may read: `{root, path, label, size}` for each."""
    out: list[dict[str, Any]] = []
    for name, folder in roots(settings).items():
        if not folder.is_dir():
            continue
        base = folder.resolve()
        found = 0
        for f in sorted(folder.rglob("*")):
            if found >= MAX_LISTED:
                break
            if not f.is_file() or f.suffix.lower() not in DATA_SUFFIXES:
                continue
            real = f.resolve()
            if real != base and base not in real.parents:  # a symlink out of the folder: not listed, not readable
                continue
            rel = f.relative_to(folder).as_posix()
            label = f"upload: {rel}" if name == "uploads" else f"{folder}/{rel}"
            out.append({"root": name, "path": rel, "label": label, "size": f.stat().st_size})
            found += 1
    return out


def save_upload(settings: StudioSettings, name: str, body: bytes) -> dict[str, Any]:
    """Write an uploaded dataset (atomically) into the upload folder; refused when too large or badly named."""
    check_file_name(name)
    if len(body) > settings.max_upload_bytes:
        raise APIError(413, f"The upload is {len(body)} bytes; this server accepts at most "
                       f"{settings.max_upload_bytes} bytes.", None, "upload_too_large")  # fmt: skip
    if not body.strip():
        raise APIError(400, "The uploaded file is empty.", None, "invalid_value")
    settings.uploads.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(settings.uploads / name, body)
    return {"root": "uploads", "path": name, "label": f"upload: {name}", "size": len(body)}


def preview(settings: StudioSettings, file: Path, model: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run the preview process on `file` with `model`'s tokenizer; its JSON answer (`summary`, `examples`, `error`).

    Args:
        settings: The studio settings (the interpreter).
        file: A resolved dataset file.
        model: The base model folder.
        options: `format`, `seq_len`, `train_on`, `examples` (how many to render).
    """
    cmd = [settings.python, "-W", "ignore::RuntimeWarning", "-m", "nomoat.cli.studio", "preview", str(file),
           "--model", model,
           "--format", str(options.get("format") or "auto"), "--seq-len", str(int(options.get("seq_len") or 1024)),
           "--train-on", str(options.get("train_on") or "assistant"),
           "--examples", str(int(options.get("examples") or 3))]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=PREVIEW_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise APIError(504, f"The preview took longer than {PREVIEW_TIMEOUT_S:.0f} s.", None, "timeout") from None
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise APIError(500, "The preview failed: " + (" ".join(tail) or f"exit status {done.returncode}"), None,
                       "preview_failed") from None  # fmt: skip
