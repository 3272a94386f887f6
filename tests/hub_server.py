"""A Hugging Face hub on 127.0.0.1 for tests: the file-resolve endpoint huggingface_hub downloads from.

``GET|HEAD /{owner}/{name}/resolve/{revision}/{filename}`` answers as the hub does for an LFS file:
``X-Repo-Commit`` (the commit the revision names), ``X-Linked-Etag`` (the file's sha256, quoted),
``X-Linked-Size``, ``Content-Length``, byte ranges on GET; 404 with the hub's ``X-Error-Code``
(RepoNotFound, RevisionNotFound, EntryNotFound) otherwise. Point a process at it with
``HF_ENDPOINT=server.url``. Repositories are edited while it runs (``publish`` moves a branch to a new
commit); ``requests`` lists (method, path) of what was asked.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self._n = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit of ``repo_id`` holding ``files``, and ``branch`` moved to it; returns the commit."""
        self._n += 1
        commit = hashlib.sha1(f"{repo_id}:{self._n}".encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["commits"][commit] = dict(files)
        repo["refs"][branch] = commit
        return commit

    def gets(self, filename: str) -> int:
        return sum(1 for m, p in self.requests if m == "GET" and p.endswith("/" + filename))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path))
        parts = h.path.split("?")[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, 404, "RepoNotFound")
        repo_id, rev, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound")
        commit = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if commit is None:
            return self._error(h, 404, "RevisionNotFound")
        data = repo["commits"][commit].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        start = 0
        rng = h.headers.get("Range")
        if body and rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0] or 0)
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if body:
            h.wfile.write(data[start:])

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, code: int, error_code: str) -> None:
        h.send_response(code)
        h.send_header("X-Error-Code", error_code)
        h.send_header("X-Error-Message", error_code)
        h.send_header("Content-Length", "0")
        h.end_headers()
