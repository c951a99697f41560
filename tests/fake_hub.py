"""A local stand-in for the Hugging Face Hub: an HTTP server answering the requests `huggingface_hub` makes.

`FakeHub` serves repositories held in memory the way the Hub's API does: model info (`/api/models/R[/revision/V]`),
the file tree (`/api/models/R/tree/V`), file downloads (`/R/resolve/V/FILE`: small files with an ETag and
`X-Repo-Commit`; large ones, as LFS files, by a redirect with `X-Linked-Etag` / `X-Linked-Size` to a blob URL that
honours `Range`), errors with the Hub's `X-Error-Code` header (`GatedRepo` 401, `RepoNotFound` 404,
`RevisionNotFound` 404), and the upload side (`/api/repos/create`, `preupload`, an NDJSON `commit`). Tests point
`huggingface_hub` at it with `HF_ENDPOINT`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def git_sha(data: bytes) -> str:
    """The git blob id of a file's bytes (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One repository: its files at one commit, and whether it is gated."""

    files: dict[str, bytes]
    gated: bool = False
    commit: str = ""
    branches: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.recommit()

    def recommit(self) -> None:
        """A new commit id for the current files, `main` pointing at it."""
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + git_sha(self.files[name]).encode())
        self.commit = h.hexdigest()
        self.branches["main"] = self.commit


class FakeHub:
    """The server. Use as a context manager; `endpoint` is the URL to put in `HF_ENDPOINT`.

    Attributes:
        repos: `ORG/NAME` -> `Repo`.
        requests: `(method, path)` of every request served (tests check what was fetched).
        ranges: The `Range` headers of blob downloads (a resumed download asks for the rest only).
        cut_once: sha256 of blobs whose next download stops halfway (the connection drops), once.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[str] = []
        self.cut_once: set[str] = set()
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        # Another host name for the same server: like the Hub's storage, so that huggingface_hub takes the file's
        # metadata from the redirect itself instead of following it.
        self.cdn = f"http://localhost:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_folder(self, repo: str, folder: Path, gated: bool = False, extra: dict[str, bytes] | None = None) -> Repo:
        """Serve every file of `folder` (recursively) as repository `repo`, plus `extra` files."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo] = Repo({**files, **(extra or {})}, gated=gated)
        return self.repos[repo]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    # ---- replies ----

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, value: object, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message,
                                  "Content-Type": "application/json"}, head=head)  # fmt: skip

    def _repo(self, repo_id: str, revision: str | None, head: bool = False) -> tuple[Repo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        if repo.gated and not self.headers.get("authorization"):
            self._error(401, "GatedRepo", "Access to this model is restricted: you must be authenticated", head)
            return None
        commit = repo.branches.get(revision or "main", revision if revision == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None
        return repo, commit

    # ---- routes ----

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._get(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.hub.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            rest = parts[4:]
            revision = rest[1] if rest and rest[0] in ("revision", "tree") and len(rest) > 1 else None
            found = self._repo(repo_id, revision)
            if found is None:
                return
            repo, commit = found
            if rest and rest[0] == "tree":
                self._json([{"type": "file", "path": name, "size": len(data), "oid": git_sha(data),
                             **({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                         "pointerSize": 130}} if name.endswith(LFS_SUFFIXES) else {})}
                            for name, data in sorted(repo.files.items())])  # fmt: skip
                return
            self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                        "gated": "auto" if repo.gated else False, "tags": [],
                        "siblings": [{"rfilename": name} for name in sorted(repo.files)]})  # fmt: skip
            return
        if parts[0] == "cdn" and len(parts) == 2:
            self._blob(parts[1], head)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
            return
        self._error(404, "EntryNotFound", f"no route {path}", head)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        found = self._repo(repo_id, revision, head)
        if found is None:
            return
        repo, commit = found
        if name not in repo.files:
            self._error(404, "EntryNotFound", f"{name} does not exist on {revision}", head)
            return
        data = repo.files[name]
        if name.endswith(LFS_SUFFIXES):  # the Hub redirects LFS files to its storage, naming the blob in headers
            sha = hashlib.sha256(data).hexdigest()
            self._send(302, b"", {"Location": f"{self.hub.cdn}/cdn/{sha}", "X-Linked-Etag": f'"{sha}"',
                                  "X-Linked-Size": str(len(data)), "X-Repo-Commit": commit,
                                  "ETag": f'"{git_sha(data)}"'}, head=head)  # fmt: skip
            return
        self._send(200, data, {"ETag": f'"{git_sha(data)}"', "X-Repo-Commit": commit,
                               "Content-Type": "application/octet-stream"}, head=head)  # fmt: skip

    def _blob(self, sha: str, head: bool) -> None:
        data = next((d for r in self.hub.repos.values() for d in r.files.values()
                     if hashlib.sha256(d).hexdigest() == sha), None)  # fmt: skip
        if data is None:
            self._send(404, b"no such blob", head=head)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            self.hub.ranges.append(rng)
            start = int(rng.removeprefix("bytes=").split("-")[0] or 0)
        body = data[start:]
        if sha in self.hub.cut_once and not head:  # the connection drops halfway through the body
            self.hub.cut_once.discard(sha)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        status = 206 if start else 200
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha}"'}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._send(status, body, headers, head=head)

    def do_POST(self) -> None:  # noqa: N802
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(("POST", path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = path.strip("/").split("/")
        if path == "/api/validate-yaml":
            self._json({})
            return
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.hub.repos:
                self._send(409, json.dumps({"error": "You already created this model repo",
                                            "url": f"{self.hub.endpoint}/{repo_id}"}).encode(),
                           {"Content-Type": "application/json"})  # fmt: skip
                return
            self.hub.repos[repo_id] = Repo({})
            self._json({"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
            return
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
            repo_id = "/".join(parts[2:4])
            repo = self.hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            if repo.gated and not self.headers.get("authorization"):  # writing needs a token with write access
                self._send(401, json.dumps({"error": "Invalid credentials in Authorization header"}).encode())
                return
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                      for f in files]})  # fmt: skip
                return
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(item["value"]["path"], None)
            repo.recommit()
            self._json({"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{repo.commit}",
                        "commitOid": repo.commit, "pullRequestUrl": None})  # fmt: skip
            return
        self._error(404, "EntryNotFound", f"no route {path}")
