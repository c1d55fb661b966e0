"""A Hugging Face Hub served from memory through an ``httpx2.MockTransport``: the model-info and
tree APIs and ``resolve`` (HEAD + GET) of the files of local model folders, as huggingface_hub
2.x reads them. Nothing goes to the network. Every request is recorded (``hub.requests``).

Use::

    hub = FakeHub()
    hub.add_repo("someone/tiny-dinov3", folder)       # files of a save_pretrained folder
    hub.install()                                     # huggingface_hub's HTTP client -> this Hub

``hub.modes[repo_id]``: ``"gated"`` (the API answers, files give 401/403 ``GatedRepo`` as the
real Hub does), ``"not_found"`` (401 ``RepoNotFound`` everywhere) or ``"connect"`` (no connection).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

GATED_MSG = "Access to model {m} is restricted. You must have access to it and be authenticated to access it. Please log in."


class FakeHub:
    def __init__(self):
        self.repos: dict = {}
        self.modes: dict = {}
        self.requests: list = []
        self._lock = threading.Lock()

    def add_repo(self, repo_id: str, folder, gated: bool = False, extra: dict | None = None) -> str:
        """Serve every file of ``folder`` (plus ``extra`` {name: bytes}) as ``repo_id``; returns the commit."""
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        files.update(extra or {})
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()).hexdigest()
        self.repos[repo_id] = {"sha": sha, "files": files}
        if gated:
            self.modes[repo_id] = "gated"
        return sha

    def install(self) -> None:
        import httpx2
        import huggingface_hub.utils._http as hub_http

        hub_http.time.sleep = lambda s: None  # no waiting between retries
        hub_http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handler)))
        hub_http.close_session()

    # ------------------------------------------------------------------ answers
    def _entries(self, repo):
        out = []
        for name, data in repo["files"].items():
            sha256 = hashlib.sha256(data).hexdigest()
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if name.endswith((".safetensors", ".bin")):
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out

    def handler(self, request):
        import httpx2

        path = str(request.url.path)
        with self._lock:
            self.requests.append((request.method, path))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            repo_id = "/".join(rest.split("/")[:2])
            tail = rest.split("/")[2:]
        else:
            repo_id = "/".join(path.strip("/").split("/")[:2])
            tail = path.strip("/").split("/")[2:]
        mode = self.modes.get(repo_id)
        repo = self.repos.get(repo_id)
        if mode == "connect":
            raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
        if repo is None or mode == "not_found":
            return httpx2.Response(401, headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, request=request)
        if path.startswith("/api/models/"):
            if tail[:1] == ["tree"]:
                return httpx2.Response(200, json=self._entries(repo), request=request)
            siblings = [{"rfilename": e["path"], "size": e["size"], "blobId": e["oid"],  # the model API says sha256, the tree oid
                         **({"lfs": {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}} if "lfs" in e else {})}
                        for e in self._entries(repo)]
            body = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": False,
                    "gated": "manual" if mode == "gated" else False, "siblings": siblings}
            return httpx2.Response(200, json=body, request=request)
        if tail[:1] != ["resolve"] or len(tail) < 3:
            return httpx2.Response(404, request=request)
        if mode == "gated":
            auth = request.headers.get("authorization", "")
            return httpx2.Response(403 if auth else 401, headers={"X-Error-Code": "GatedRepo", "X-Error-Message": GATED_MSG.format(m=repo_id)}, request=request)
        name = "/".join(tail[2:])
        data = repo["files"].get(name)
        if data is None:
            return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"}, request=request)
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers, request=request)
        return httpx2.Response(200, headers=headers, content=data, request=request)

    def count(self, method: str = None, contains: str = "") -> int:
        return sum(1 for m, p in self.requests if (method is None or m == method) and contains in p)
