"""A local server that speaks enough of the Hugging Face Hub HTTP protocol for the real
huggingface_hub client (0.36): whoami, repo create, branches, repo info by revision, tree
listing, preupload, the git-LFS batch / upload / verify flow, commits, file resolve with the
headers snapshot_download needs, Space variables, secrets and hardware.

Like the real Hub it advertises Xet storage (an X-Xet-Hash on every LFS download), and a client
that offers the Xet transfer for an upload is refused: it cannot speak Xet's chunk protocol, and
the kit runs with Xet off (docs/publishing.md: "Hub transfers"), so a Xet request here means the kit took a
path its tests do not cover. `xet_requests` lists them.

Everything it received is kept in `requests` so tests can assert on it (and grep it for
secrets). `drop_next(fragment)` makes the next request whose path contains `fragment` read
its body and then lose the connection without answering, like a network failure mid-upload.
`corrupt_next_commit(path)` stores the next commit with that file's content altered, as a
broken storage backend would, so verification after an upload has something to find.

    with FakeHub(tokens={"hf_secret": "alice"}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_secret"}
"""
import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# What the Hub writes into every new repo: these patterns are stored with git LFS.
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.bin", "*.model", "*.pt", "*.pth", "*.safetensors", "*.gguf", "*.onnx", "*.zip", "*.tar.gz"))
LFS_SUFFIXES = tuple(line.split()[0].lstrip("*") for line in GITATTRIBUTES.splitlines())
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub also sends any file of 10 MB or more to LFS
KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


@dataclass
class File:
    content: bytes
    lfs: bool

    def info(self, path: str) -> dict:
        """The tree entry the Hub returns for this file."""
        entry = {"type": "file", "path": path, "size": len(self.content), "oid": self.oid}
        if self.lfs:
            pointer = lfs_pointer(self.content)
            entry.update(oid=git_sha1(pointer), lfs={"oid": self.sha256, "size": len(self.content),
                                                     "pointerSize": len(pointer)})
        return entry

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self) -> str:
        """What preupload reports and the client compares with: sha256 for LFS, git sha1 else."""
        return self.sha256 if self.lfs else git_sha1(self.content)


@dataclass
class Repo:
    kind: str
    id: str
    private: bool
    sdk: str | None = None
    branches: dict = field(default_factory=dict)   # name -> commit sha
    commits: dict = field(default_factory=dict)    # commit sha -> {path: File}
    variables: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)
    hardware: str | None = None

    @property
    def owner(self) -> str:
        return self.id.split("/")[0]

    def files(self, revision: str) -> tuple[str, dict] | None:
        sha = self.branches.get(revision, revision if revision in self.commits else None)
        return (sha, self.commits[sha]) if sha else None


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: bytes


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class FakeHub:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens                  # token -> user name
        self.repos: dict[tuple, Repo] = {}    # (kind, id) -> Repo
        self.lfs: dict[str, bytes] = {}       # sha256 -> content
        self.requests: list[Received] = []
        self._drops: list[str] = []
        self._corrupt: list[str] = []
        self.xet_requests: list[str] = []
        self._lock = threading.RLock()
        self._commits = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def drop_next(self, fragment: str) -> None:
        self._drops.append(fragment)

    def corrupt_next_commit(self, path: str) -> None:
        self._corrupt.append(path)

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        """A model repo holding `files` (what an upload by someone else left); returns its commit."""
        repo = Repo("model", repo_id, private)
        lfs = {path: File(data, path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE)
               for path, data in files.items()}
        with self._lock:
            self.repos[("model", repo_id)] = repo
            return self.commit(repo, "main", {".gitattributes": File(GITATTRIBUTES.encode(), False), **lfs})

    def repo(self, repo_id: str, kind: str = "model") -> Repo:
        return self.repos[(kind, repo_id)]

    def received_text(self, include_auth: bool = False) -> str:
        """Everything clients sent (paths, headers, bodies) as one string, for grepping."""
        parts = []
        for r in self.requests:
            headers = {k: v for k, v in r.headers.items() if include_auth or k.lower() != "authorization"}
            parts += [r.method, r.path, json.dumps(headers), r.body.decode("utf-8", "replace")]
        return "\n".join(parts)

    # ---- request routing ----
    def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes):
        """Returns (status, headers, body bytes)."""
        user = self.tokens.get(headers.get("authorization", "").removeprefix("Bearer "))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "whoami-v2"]:
            if not user:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self.json({"type": "user", "name": user, "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if parts[:2] == ["api", "repos"] and parts[2:] == ["create"]:
            return self.create_repo(user, json.loads(body))
        if any(part.startswith("xet-") for part in parts):  # xet-read-token, xet-write-token
            self.xet_requests.append(path)
            raise HubError(501, "this local Hub does not speak Xet; the kit must transfer over HTTP")
        if parts[:2] == ["api", "validate-yaml"]:
            return self.json({"errors": [], "warnings": []})
        if parts[0] == "api" and parts[1] in KINDS and len(parts) >= 4:
            repo = self.find(KINDS[parts[1]], "/".join(parts[2:4]), user)
            return self.repo_api(repo, user, method, parts[4:], query, body)
        if parts[0] == "_lfs":
            return self.lfs_object(method, parts[1], parts[2:], body)
        kind = KINDS.get(parts[0], "model")
        parts = parts[1:] if parts[0] in KINDS else parts
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            repo = self.find(kind, f"{parts[0]}/{parts[1][:-4]}", user)
            return self.lfs_batch(repo, user, json.loads(body))
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.find(kind, "/".join(parts[:2]), user)
            return self.resolve(repo, method, parts[3], "/".join(parts[4:]))
        raise HubError(404, f"no route for {method} {path}")

    def find(self, kind: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    @staticmethod
    def json(value, status: int = 200, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(value).encode()

    @staticmethod
    def check_write(repo_owner: str, user: str | None) -> None:
        if not user:
            raise HubError(401, "Invalid credentials in Authorization header")
        if user != repo_owner:
            raise HubError(403, f"{user} cannot write to the namespace {repo_owner}")

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{'' if repo.kind == 'model' else repo.kind + 's/'}{repo.id}"

    def create_repo(self, user, payload):
        owner = payload.get("organization") or user
        self.check_write(owner, user)
        kind = payload.get("type") or "model"
        repo_id = f"{owner}/{payload['name']}"
        with self._lock:
            if (kind, repo_id) in self.repos:
                existing = self.repos[(kind, repo_id)]
                return self.json({"error": "You already created this repo", "url": self.repo_url(existing)}, 409)
            repo = Repo(kind, repo_id, bool(payload.get("private")), payload.get("sdk"))
            self.commit(repo, "main", {".gitattributes": File(GITATTRIBUTES.encode(), False)})
            if payload.get("hardware"):
                repo.hardware = payload["hardware"]
            self.repos[(kind, repo_id)] = repo
        return self.json({"url": self.repo_url(repo), "name": repo_id, "id": repo_id})

    def commit(self, repo: Repo, branch: str, files: dict) -> str:
        self._commits += 1
        sha = hashlib.sha1(f"{repo.id}:{self._commits}:{sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def revision(self, repo: Repo, revision: str) -> tuple[str, dict]:
        found = repo.files(revision)
        if found is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return found

    def repo_api(self, repo: Repo, user, method, rest, query, body):
        action = rest[0] if rest else "info"
        if action in ("info", "revision"):
            sha, files = self.revision(repo, rest[1] if rest else "main")
            info = {"id": repo.id, "sha": sha, "private": repo.private, "author": repo.owner,
                    "siblings": [{"rfilename": path} for path in sorted(files)]}
            return self.json({**info, "sdk": repo.sdk} if repo.kind == "space" else info)
        if action == "tree":
            sha, files = self.revision(repo, rest[1])
            return self.json(self.tree(files, "/".join(rest[2:]), query.get("recursive") == ["True"]))
        if action == "runtime":
            return self.json(self.runtime(repo))
        self.check_write(repo.owner, user)
        payload = json.loads(body or b"{}") if action != "commit" else None
        if action == "preupload":
            _, files = self.revision(repo, rest[1])
            return self.json({"files": [self.upload_mode(f, files) for f in payload["files"]]})
        if action == "commit":
            return self.apply_commit(repo, rest[1], body)
        if action == "branch":
            if rest[1] in repo.branches:
                raise HubError(409, f"Reference {rest[1]} already exists")
            sha, files = self.revision(repo, payload.get("startingPoint", "main"))
            with self._lock:
                repo.branches[rest[1]] = sha
            return self.json({})
        if action in ("variables", "secrets"):
            store = getattr(repo, action)
            if method == "DELETE":
                store.pop(payload["key"], None)
            elif method == "POST":
                store[payload["key"]] = {"value": payload["value"], "description": payload.get("description")}
            return self.json(repo.variables if action == "variables" else {})
        if action == "hardware":
            repo.hardware = payload["flavor"]
            return self.json(self.runtime(repo))
        raise HubError(404, f"no route for {method} /api/{repo.kind}s/{repo.id}/{'/'.join(rest)}")

    @staticmethod
    def tree(files: dict, folder: str, recursive: bool) -> list[dict]:
        prefix = folder + "/" if folder else ""
        entries, folders = [], set()
        for path, file in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            below = path[len(prefix):].split("/")
            for depth in range(1, len(below)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(below[:depth]))
            if recursive or len(below) == 1:
                entries.append(file.info(path))
        return [{"type": "directory", "path": p, "oid": git_sha1(p.encode())} for p in sorted(folders)] + entries

    @staticmethod
    def runtime(repo: Repo) -> dict:
        return {"stage": "BUILDING", "hardware": {"current": None, "requested": repo.hardware}}

    def upload_mode(self, spec: dict, files: dict) -> dict:
        path = spec["path"]
        lfs = path.endswith(LFS_SUFFIXES) or spec["size"] >= LFS_MIN_SIZE or b"\0" in base64.b64decode(spec["sample"])
        answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
        if path in files:
            answer["oid"] = files[path].oid
        return answer

    def lfs_batch(self, repo: Repo, user, payload):
        self.check_write(repo.owner, user)
        if "xet" in payload.get("transfers", []):  # the real Hub would answer "xet" here
            self.xet_requests.append(f"{repo.id}: LFS batch offering {payload['transfers']}")
            raise HubError(501, "the client offered the Xet transfer; this local Hub speaks HTTP LFS only")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # known objects need no upload: reruns resume here
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"},
                                    "verify": {"href": f"{self.url}/_lfs/{obj['oid']}/verify"}}
            objects.append(entry)
        return self.json({"transfer": "basic", "objects": objects})

    def lfs_object(self, method, oid, rest, body):
        if method == "PUT" and not rest:
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "content does not match its sha256")
            with self._lock:
                self.lfs[oid] = body
            return self.json({})
        if method == "POST" and rest == ["verify"]:
            expected = json.loads(body)
            if oid not in self.lfs or len(self.lfs[oid]) != expected["size"]:
                raise HubError(404, f"LFS object {oid} was not uploaded")
            return self.json({})
        raise HubError(404, "no such LFS operation")

    def apply_commit(self, repo: Repo, branch: str, body: bytes):
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with self._lock:
            parent = repo.branches[branch]
            files = dict(repo.commits[parent])
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = File(base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs:
                        raise HubError(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                    files[value["path"]] = File(self.lfs[value["oid"]], True)
                elif key == "deletedFile":
                    files.pop(value["path"])
                elif key == "deletedFolder":
                    files = {p: f for p, f in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            for path in [p for p in self._corrupt if p in files]:  # one flipped byte, same size
                data = bytearray(files[path].content)
                data[len(data) // 2] ^= 0xFF
                files[path] = File(bytes(data), files[path].lfs)
                self._corrupt.remove(path)
            sha = self.commit(repo, branch, files)
        return self.json({"success": True, "commitOid": sha, "commitUrl": f"{self.repo_url(repo)}/commit/{sha}",
                          "pullRequestUrl": None})

    def resolve(self, repo: Repo, method: str, revision: str, path: str):
        sha, files = self.revision(repo, revision)
        if path not in files:
            raise HubError(404, f"{path} not found", "EntryNotFound")
        file = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(file.content)}"',
                   "Content-Type": "application/octet-stream"}
        if file.lfs:  # the Hub's LFS files live in Xet storage: it names their Xet hash
            headers.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.content)),
                            "X-Xet-Hash": file.sha256,
                            "X-Xet-Refresh-Route": f"{self.url}/api/{repo.kind}s/{repo.id}/xet-read-token/{sha}"})
        return 200, headers, file.content


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub: clients reuse connections

        def log_message(self, *args):
            pass

        def read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def serve(self):
            url = urlsplit(self.path)
            body = self.read_body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            with hub._lock:
                hub.requests.append(Received(self.command, self.path, dict(self.headers), body))
                drop = next((f for f in hub._drops if f in url.path), None)
                if drop:
                    hub._drops.remove(drop)
            if drop:  # the connection dies before any answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            try:
                status, out_headers, out = hub.handle(self.command, url.path, parse_qs(url.query), headers, body)
            except HubError as e:
                extra = {"X-Error-Code": e.code} if e.code else {}
                status, out_headers, out = hub.json({"error": str(e)}, e.status, {**extra, "X-Error-Message": str(e)})
            self.send_response(status)
            for key, value in {**out_headers, "Content-Length": str(len(out))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = serve

    return Handler
