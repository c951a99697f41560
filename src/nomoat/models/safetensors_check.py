"""Is a safetensors file whole? A check of its header against its size, before any tensor is read.

A download cut short leaves a file whose header names more bytes than the file holds; reading it fails deep inside
with words about offsets. `check_safetensors` (a file) and `check_complete` (a header already read) say instead
that the file is truncated or corrupt and must be downloaded again.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from nomoat.util.errors import ModelError

_HINT = "download it again (the copy on disk is incomplete or damaged)"


def _corrupt(file: Path, why: str) -> ModelError:
    return ModelError(f"{file}: truncated or corrupt safetensors file ({why})", hint=_HINT)


def check_complete(file: str | os.PathLike, header: dict[str, Any], base: int, size: int) -> None:
    """Raise unless every tensor the header describes lies inside the file.

    Args:
        file: The file (for the message).
        header: Its parsed JSON header (`__metadata__` may be present).
        base: Byte offset where the tensor data starts (8 + header length).
        size: The file's size in bytes.

    Raises:
        ModelError: The file is shorter than its header says, or an entry is malformed.
    """
    end = base
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(Path(file), f"tensor {name} has no valid data_offsets") from None
        if not 0 <= start <= stop:
            raise _corrupt(Path(file), f"tensor {name} has offsets {start}..{stop}")
        end = max(end, base + stop)
    if end > size:
        raise _corrupt(Path(file), f"{size:,} bytes, its header describes {end:,}")


def check_safetensors(file: str | os.PathLike) -> None:
    """Raise unless `file` is a complete safetensors file (reads only its header).

    Raises:
        ModelError: Truncated or corrupt, with a hint to download it again.
    """
    path = Path(file)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise _corrupt(path, f"{size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise _corrupt(path, f"a header of {n:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    check_complete(path, header, 8 + n, size)


__all__ = ["check_complete", "check_safetensors"]
