"""A small Hugging Face Hub on 127.0.0.1, speaking the part of the Hub HTTP API the real ``huggingface_hub``
2.x client uses to create a repo, commit files and download them. Tests point the real client at it
(``endpoint=`` / ``HF_ENDPOINT``); nothing in ``huggingface_hub`` is mocked.

Endpoints (model repos only; files are committed inline, as ``"regular"`` uploads, never LFS or Xet)::

    POST /api/repos/create                                 {"name", "organization", "visibility"?, "type"}
    POST /api/validate-yaml                                model-card metadata check
    GET  /api/models/{id}[/revision/{rev}]                 sha and siblings
    GET  /api/models/{id}/tree/{rev}[/{path}]              files and folders (recursive=...)
    POST /api/models/{id}/preupload/{rev}                  upload mode per file: "regular"
    POST /api/models/{id}/commit/{rev}                     NDJSON: header, then file / deletedFile / deletedFolder
    HEAD|GET /{id}/resolve/{rev}/{path}                    file, with ETag and X-Repo-Commit headers

Repos are git-like: every commit holds a whole tree (parent tree + changes) under a sha; branches point at
commits. ``token`` makes writes (and reads of private repos) require ``Authorization: Bearer <token>``.
``fail_commits`` answers the next n commit requests with a 500 after everything before them succeeded,
to test a push that fails midway. ``requests`` records ``(method, path)`` of everything served.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["HubServer"]

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$"), "tree"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class _Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str | None:
        return self.branches.get(rev) or (rev if rev in self.commits else None)


class _Reply(Exception):
    """Raised by a handler to answer with ``status``, a JSON ``body`` and extra ``headers``."""

    def __init__(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class HubServer:
    """Start with ``with HubServer() as hub:``; ``hub.url`` is the endpoint to give the client."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.repos: dict[str, _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> HubServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The tree of ``repo_id`` at ``rev`` (for assertions)."""
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(rev)])

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)

    # ----------------------------------------------------------------- plumbing
    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(req.path)
        path = unquote(parts.path)
        with self._lock:
            self.requests.append((method, path))
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        auth = req.headers.get("Authorization", "")
        try:
            for verb, pattern, name in _ROUTES:
                match = pattern.match(path)
                if verb == method and match:
                    args = {k: v for k, v in match.groupdict().items() if v is not None}
                    with self._lock:
                        status, payload, headers = getattr(self, f"_{name}")(
                            body=body, query=parse_qs(parts.query), auth=auth, method=method, **args
                        )
                    break
            else:
                raise _Reply(404, {"error": f"test hub: no route for {method} {path}"})
        except _Reply as reply:
            status, payload, headers = reply.status, reply.body, reply.headers
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        headers.setdefault("Content-Length", str(len(data)))
        for key, value in headers.items():
            req.send_header(key, value)
        req.end_headers()
        if method != "HEAD":
            req.wfile.write(data)

    def _authorised(self, auth: str) -> bool:
        return self.token is None or auth == f"Bearer {self.token}"

    def _require_write(self, auth: str) -> None:
        if not self._authorised(auth):
            raise _Reply(401, {"error": "Invalid credentials in Authorization header"},
                         {"X-Error-Message": "Invalid credentials in Authorization header"})

    def _repo(self, repo_id: str, auth: str) -> _Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised(auth)):
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _sha(self, repo: _Repo, rev: str) -> str:
        sha = repo.resolve(unquote(rev))
        if sha is None:
            raise _Reply(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return sha

    def _new_commit(self, repo: _Repo, branch: str, tree: dict[str, bytes], message: str) -> str:
        digest = hashlib.sha1(json.dumps([repo.branches.get(branch), message, sorted(
            (p, git_blob_sha(c)) for p, c in tree.items())]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = tree
        repo.branches[branch] = sha
        return sha

    # ----------------------------------------------------------------- endpoints
    def _create_repo(self, body: bytes, auth: str, **_) -> tuple:
        self._require_write(auth)
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise _Reply(400, {"error": "test hub: model repos only"})
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": url})
        repo = _Repo(private=payload.get("visibility") == "private")
        self.repos[repo_id] = repo
        self._new_commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         "initial commit")
        return 200, {"url": url, "name": repo_id}, {}

    def _validate_yaml(self, body: bytes, **_) -> tuple:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if match is None:
            errors.append({"message": "no YAML metadata block"})
        else:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                meta, errors = None, [{"message": f"invalid YAML: {err}"}]
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
            elif isinstance(meta, dict):
                base = meta.get("base_model")
                if base is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
                    errors.append({"message": f"\"base_model\" must be a model id, got {base!r}"})
                if not isinstance(meta.get("tags", []), list):
                    errors.append({"message": "\"tags\" must be a list"})
        if errors:
            raise _Reply(400, {"errors": errors, "warnings": []})
        return 200, {"errors": [], "warnings": []}, {}

    def _repo_info(self, repo: str, auth: str, rev: str = "main", **_) -> tuple:
        r = self._repo(repo, auth)
        sha = self._sha(r, rev)
        files = r.commits[sha]
        siblings = [{"rfilename": p, "size": len(c), "blobId": git_blob_sha(c)} for p, c in sorted(files.items())]
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "siblings": siblings,
                     "tags": [], "library_name": None}, {}

    def _tree(self, repo: str, rev: str, auth: str, query: dict, path: str = "", **_) -> tuple:
        r = self._repo(repo, auth)
        files = r.commits[self._sha(r, rev)]
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{path.strip('/')}/" if path else ""
        entries, folders = [], set()
        for p, content in sorted(files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):  # folders on the way
                if recursive or i == 1:
                    folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": p, "size": len(content), "oid": git_blob_sha(content)})
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
        return 200, entries, {}

    def _preupload(self, repo: str, rev: str, body: bytes, auth: str, **_) -> tuple:
        self._require_write(auth)
        r = self._repo(repo, auth)
        sha = r.resolve(unquote(rev))
        existing = r.commits[sha] if sha else {}
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_sha(existing[f["path"]]) if f["path"] in existing else None}
            for f in json.loads(body)["files"]
        ]
        return 200, {"files": files, "commitOid": sha}, {}

    def _commit(self, repo: str, rev: str, body: bytes, auth: str, **_) -> tuple:
        self._require_write(auth)
        r = self._repo(repo, auth)
        if self.fail_commits > 0:
            self.fail_commits -= 1
            raise _Reply(500, {"error": "test hub: simulated failure while committing"})
        branch = unquote(rev)
        if branch not in r.branches:
            raise _Reply(404, {"error": f"Invalid rev id: {branch}"}, {"X-Error-Code": "RevisionNotFound"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, {"error": "the first line must be the commit header"})
        tree = dict(r.commits[r.branches[branch]])
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _Reply(400, {"error": f"unsupported encoding {value.get('encoding')!r}"})
                tree[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                tree = {p: c for p, c in tree.items() if not p.startswith(folder)}
            else:
                raise _Reply(400, {"error": f"test hub: unsupported commit operation {key!r} (no LFS here)"})
        sha = self._new_commit(r, branch, tree, lines[0]["value"].get("summary", ""))
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}, {}

    def _resolve(self, repo: str, rev: str, path: str, auth: str, method: str, **_) -> tuple:
        r = self._repo(repo, auth)
        sha = self._sha(r, rev)
        files = r.commits[sha]
        if path not in files:
            raise _Reply(404, {"error": f"Entry not found: {path}"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
        content = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"', "Content-Type": "application/octet-stream",
                   "Content-Length": str(len(content))}
        return 200, content, headers
