"""A fake Hugging Face Hub for the tests: dataset repos served from local folders on 127.0.0.1, no internet.

It answers exactly what huggingface_hub's ``HfFileSystem`` asks to ``info``, ``ls``, ``exists``, ``cat_file`` and
``open(...).read()`` a file of a dataset repo at ``main`` (huggingface_hub 2.4.0):

- ``GET /api/datasets/ORG/NAME`` (and ``.../revision/REV``): the repo exists (``resolve_path``, once per
  filesystem instance). JSON ``{"id", "sha", "private", "siblings": [{"rfilename"}], ...}``.
- ``GET /api/datasets/ORG/NAME/tree/REV[/PATH]?recursive=&expand=``: a folder's entries (``ls``, and ``info``,
  which lists the parent folder). JSON ``[{"type": "file"|"directory", "oid", "size", "path"}]``.
- ``POST /api/datasets/ORG/NAME/paths-info/REV`` (form: ``paths``, ``expand``): the entries of those paths
  (``info(..., refresh=True)``).
- ``GET`` / ``HEAD /datasets/ORG/NAME/resolve/REV/PATH``: the file's bytes; ``Range: bytes=a-b`` answers 206 with
  ``Content-Range`` (ranged ``cat_file``, buffered ``open``), ``Range: bytes=a-`` too (streamed ``read()``).

Files are plain git blobs: no ``lfs``, no ``xetHash`` in the entries and no ``X-Xet-*`` headers, so the client
never tries the Xet protocol; no token is asked for. A file's ``oid`` (and ETag) is its git blob id (SHA-1 of
``blob SIZE\\0`` + bytes): stable while the bytes are, new when they change. Errors carry the Hub's
``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), which huggingface_hub turns into
its typed errors (``HfFileSystem`` into ``FileNotFoundError``).

``plan(method, target, range_header)`` injects faults, like tests/pipeline/test_transport.py's ``FaultyS3Proxy``:
``None`` (answer normally), ``("status", code)`` (answer that status, no error code), ``("cut", n)`` (announce
the full answer, send ``n`` body bytes, drop the connection). ``target`` is the request's path and query as sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Plan = Callable[[str, str, "str | None"], "tuple[str, int] | None"]

REVISION = "main"
_API = re.compile(r"/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<rest>.*))?")
_RESOLVE = re.compile(r"/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_DATE = "2024-01-01T00:00:00.000Z"


def git_blob_id(data: bytes) -> str:
    """What the Hub calls a (non-LFS) file's ``oid``: git's blob id of the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HfHub:
    """A running fake Hub: ``endpoint`` (``http://127.0.0.1:PORT``, for ``HfFileSystem(endpoint=...)``,
    ``storage.hf.endpoint_url`` or ``HF_ENDPOINT``), ``requests`` (``(method, target, Range header)`` of every
    request, in order) and ``plan`` (the fault hook; may be replaced between tests)."""

    endpoint: str
    repos: dict[str, Path]
    plan: Plan | None = None
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def gets(self, path_part: str = "/resolve/") -> list[str | None]:
        """The Range headers of the GETs whose target contains ``path_part`` (the file reads, by default)."""
        return [r for m, t, r in self.requests if m == "GET" and path_part in t]

    # ------------------------------------------------------------------------------------------- repo content

    def _root(self, repo: str) -> Path | None:
        root = self.repos.get(repo)
        return root if root is not None and root.is_dir() else None

    def _entry(self, root: Path, rel: str) -> dict[str, Any] | None:
        """The tree entry of ``rel`` (a path inside the repo), or None when there is nothing there."""
        target = root / rel
        if not rel or ".." in Path(rel).parts or not (target.is_file() or target.is_dir()):
            return None
        if target.is_file():
            data = target.read_bytes()
            return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": rel}
        listing = sorted(p.name for p in target.iterdir())
        return {"type": "directory", "oid": hashlib.sha1("\n".join(listing).encode()).hexdigest(), "size": 0,
                "path": rel}

    def _files(self, root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def _sha(self, root: Path) -> str:
        """The commit ``main`` points at: changes whenever a file does."""
        digest = hashlib.sha1()
        for rel in self._files(root):
            digest.update(f"{rel} {git_blob_id((root / rel).read_bytes())}\n".encode())
        return digest.hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length
    hub: HfHub
    log_file: Any
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        with self.lock:
            self.log_file.write(f"{self.address_string()} {format % args}\n")
            self.log_file.flush()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._serve()

    do_HEAD = do_POST = do_GET  # noqa: N815

    # -------------------------------------------------------------------------------------------- answers

    def _serve(self) -> None:
        hub = self.hub
        range_header = self.headers.get("Range")
        with self.lock:
            hub.requests.append((self.command, self.path, range_header))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        action = hub.plan(self.command, self.path, range_header) if hub.plan else None
        if action and action[0] == "status":
            self._error(action[1], None, "injected")
            return
        cut = action[1] if action and action[0] == "cut" else None
        parts = urllib.parse.urlsplit(self.path)
        path = parts.path
        if m := _RESOLVE.fullmatch(path):
            self._resolve(m.group("repo"), urllib.parse.unquote(m.group("rev")),
                          urllib.parse.unquote(m.group("path")), range_header, cut)
            return
        if (m := _API.fullmatch(path)) and self.command in ("GET", "POST"):
            self._api(m.group("repo"), m.group("rest") or "", urllib.parse.parse_qs(parts.query), body, cut)
            return
        self._error(404, None, f"no such route: {self.command} {path}")

    def _api(self, repo: str, rest: str, query: dict[str, list[str]], body: bytes, cut: int | None) -> None:
        hub = self.hub
        root = hub._root(repo)
        if root is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        head, _, tail = rest.partition("/")
        if self.command == "GET" and (not rest or head == "revision"):
            if head == "revision" and urllib.parse.unquote(tail) not in (REVISION, hub._sha(root)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {urllib.parse.unquote(tail)}")
                return
            files = hub._files(root)
            self._json({"_id": hub._sha(root)[:24], "id": repo, "author": repo.split("/")[0], "sha": hub._sha(root),
                        "private": False, "gated": False, "disabled": False, "lastModified": _DATE,
                        "createdAt": _DATE, "tags": [], "downloads": 0, "likes": 0,
                        "siblings": [{"rfilename": f} for f in files]}, cut)
            return
        if head not in ("tree", "paths-info"):
            self._error(404, None, f"no such route: {self.command} /api/datasets/{repo}/{rest}")
            return
        revision, _, rel = tail.partition("/")
        revision, rel = urllib.parse.unquote(revision), urllib.parse.unquote(rel).strip("/")
        if revision not in (REVISION, hub._sha(root)):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        if head == "paths-info" and self.command == "POST":
            form = urllib.parse.parse_qs(body.decode())
            entries = [e for p in form.get("paths", []) if (e := hub._entry(root, p.strip("/"))) is not None]
            self._json(entries, cut)
            return
        if head == "tree" and self.command == "GET":
            folder = root / rel if rel else root
            if not folder.is_dir() or (rel and hub._entry(root, rel) is None):
                self._error(404, "EntryNotFound", f"{rel} does not exist on \"{revision}\"")
                return
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            found = folder.rglob("*") if recursive else folder.iterdir()
            names = sorted(p.relative_to(root).as_posix() for p in found)
            entries = [e for n in names if (e := hub._entry(root, n)) is not None]
            # the Hub lists folders before files ("tree first")
            self._json(sorted(entries, key=lambda e: (e["type"] != "directory", e["path"])), cut)
            return
        self._error(405, None, "method not allowed")

    def _resolve(self, repo: str, revision: str, rel: str, range_header: str | None, cut: int | None) -> None:
        hub = self.hub
        root = hub._root(repo)
        if root is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        sha = hub._sha(root)
        if revision not in (REVISION, sha):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return
        entry = hub._entry(root, rel)
        if entry is None or entry["type"] != "file":
            self._error(404, "EntryNotFound", "Entry not found")
            return
        data = (root / rel).read_bytes()
        size, status, start, end = len(data), 200, 0, len(data) - 1
        wanted = _RANGE.fullmatch((range_header or "").strip())
        if wanted and (wanted.group(1) or wanted.group(2)):
            if wanted.group(1):
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)), size - 1) if wanted.group(2) else size - 1
            else:  # bytes=-N: the last N bytes
                start = max(0, size - int(wanted.group(2)))
            if start >= size or start > end:
                self._error(416, "RangeNotSatisfiable", "Requested Range Not Satisfiable",
                            {"Content-Range": f"bytes */{size}"})
                return
            status = 206
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": f'"{entry["oid"]}"', "X-Repo-Commit": sha, "Content-Disposition":
                   f'inline; filename="{Path(rel).name}"'}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, data[start:end + 1], headers, cut)

    # ------------------------------------------------------------------------------------------- sending

    def _json(self, value: Any, cut: int | None) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, cut)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, None)

    def _send(self, status: int, body: bytes, headers: dict[str, str], cut: int | None) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is None:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])  # the whole answer announced, part of it sent, the connection dropped
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def hf_hub_server(repos: dict[str, Path], log_dir: Path, plan: Plan | None = None) -> Iterator[HfHub]:
    """Serve the dataset repos ``{"org/name": folder}`` (each folder's files are the repo's files at ``main``)
    on 127.0.0.1 at a free port; the access log goes to ``log_dir/hf_hub.log``. Yields the ``HfHub``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "hf_hub.log").open("a") as log_file:
        hub = HfHub(endpoint="", repos=dict(repos), plan=plan)
        handler = type("HubHandler", (_Handler,), {"hub": hub, "log_file": log_file, "lock": threading.Lock()})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.handle_error = lambda request, address: None  # a dropped connection is the point of a cut
        hub.endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield hub
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)
