"""The studio's safety checks: same-origin requests for state-changing routes, and file access inside allowed folders.

The API key is checked before any studio route runs (`/v1/studio` sits under the `/v1` prefix that
`nomoat.serve.middleware.APIKeyMiddleware` protects). What this module adds: a browser page from another site may
not make this server change anything (`check_origin`), and a file name from a request never reaches outside the
folders the server was allowed to read or its own upload folder (`safe_join`).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import Request

from nomoat.serve.errors import APIError

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _default_port(scheme: str) -> int:
    return 443 if scheme in ("https", "wss") else 80


def _host_port(netloc: str, scheme: str) -> tuple[str, int]:
    split = urlsplit(f"{scheme}://{netloc}")
    return (split.hostname or "").lower(), split.port or _default_port(scheme)


async def check_origin(request: Request) -> None:
    """Refuse (403) a state-changing request that a page of another origin sent.

    Browsers send `Origin` on every POST, PUT and DELETE from a page; it must name this server (scheme-less compare
    of host and port with the `Host` header). Requests without `Origin` are not from a cross-site page (curl, SDKs)
    unless `Sec-Fetch-Site` says so.
    """
    origin = request.headers.get("origin")
    host = request.headers.get("host", "")
    scheme = request.url.scheme
    if origin is None:
        if request.headers.get("sec-fetch-site") == "cross-site":
            raise APIError(403, "Cross-site requests may not change this server's state.", None, "bad_origin")
        return
    split = urlsplit(origin)
    if origin == "null" or not split.hostname:
        raise APIError(403, f"Origin {origin!r} may not change this server's state.", None, "bad_origin")
    given = (split.hostname.lower(), split.port or _default_port(split.scheme))
    if given != _host_port(host, scheme):
        raise APIError(403, f"Origin {origin} is not this server ({host}); the request was refused.", None,
                       "bad_origin")  # fmt: skip


def check_file_name(name: str) -> str:
    """A plain file name for an upload (letters, digits, `._-`, a data suffix), or a 400."""
    if not _FILE_NAME.fullmatch(name) or name in (".", ".."):
        raise APIError(400, f"File name {name!r} is not allowed: use letters, digits, '.', '_' and '-' only.",
                       "name", "invalid_file_name")  # fmt: skip
    if not name.lower().endswith(DATA_SUFFIXES):
        raise APIError(400, f"File name {name!r} must end in one of {', '.join(DATA_SUFFIXES)}.", "name",
                       "invalid_file_name")  # fmt: skip
    return name


def safe_join(root: Path, relative: str) -> Path:
    """`root/relative` resolved, refusing (403) anything that ends up outside `root` (`..`, absolute, symlinks).

    Args:
        root: An allowed folder.
        relative: A path from a request, relative to `root`.

    Returns:
        The resolved file path, inside the resolved `root`.
    """
    base = root.resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute() or relative.startswith(("/", "\\")):
        raise APIError(403, f"Path {relative!r} is outside the allowed folders.", "path", "path_not_allowed")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise APIError(403, f"Path {relative!r} is outside the allowed folders.", "path", "path_not_allowed")
    return target
