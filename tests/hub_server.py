"""A strict, in-memory Hugging Face Hub for tests, served over real HTTP on 127.0.0.1.

It implements the endpoints that huggingface_hub 2.4 calls for what triattn-hub does, with
the request and response shapes read from that library's source (hf_api.py, _commit_api.py,
lfs.py, file_download.py, _oidc.py):

  POST /api/repos/create                             create a repo (409 if it exists)
  GET  /api/{type}s/{id}[/revision/{rev}]            repo info, `sha` is the resolved commit
  GET  /api/models                                  list model repos (author, filter, search, limit, expand)
  POST /api/validate-yaml                            README.md front matter check
  POST /api/{type}s/{id}/preupload/{rev}             upload mode per file (lfs per .gitattributes)
  POST /{prefix}{id}.git/info/lfs/objects/batch      LFS batch API, "basic" transfer
  PUT  {cdn}/lfs-upload/{sha256}?sig=                LFS object upload (sha256 and size checked)
  POST /lfs-verify/{sha256}                          LFS verify
  POST /api/{type}s/{id}/commit/{rev}                ndjson commit; 412 on a stale parentCommit
  POST /api/{type}s/{id}/tag/{rev}                   create a tag (409 if it exists)
  GET  /api/{type}s/{id}/refs                        branches and tags
  GET  /api/{type}s/{id}/tree/{rev}[/{path}]         tree listing
  HEAD/GET /{prefix}{id}/resolve/{rev}/{path}        X-Repo-Commit, ETag; LFS files redirect (302)
                                                     to a second origin (the "CDN") with
                                                     X-Linked-Etag / X-Linked-Size, as the Hub does
  GET  {cdn}/cdn/{sha256}?sig=                       LFS content; rejects an Authorization header
  POST /oauth/token                                  RFC 8693 token exchange (trusted publishers)
  GET  /github/id-token                              replaces GitHub's OIDC id-token service

Repos keep a git-like history: commits with parents and trees of content-addressed blobs
(git blob sha1 oids, LFS objects by sha256). Access control follows the Hub. An unknown token
gets 401 "Invalid credentials in Authorization header" on every route. A private repo returns
401 RepoNotFound without a token and 404 RepoNotFound to a token without access. A gated repo
returns 401 or 403 GatedRepo on file downloads. Anything the server does not implement
returns 404 with X-Error-Code UnknownRoute and is recorded in `unknown_routes`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
DEFAULT_GITATTRIBUTES = (
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.npz filter=lfs diff=lfs merge=lfs -text\n"
    "*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    "*.gguf filter=lfs diff=lfs merge=lfs -text\n"
)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Blob:
    """One file version: regular content, or an LFS pointer to an object of `lfs_size` bytes."""

    data: bytes
    lfs_sha256: str | None = None
    lfs_size: int | None = None

    @property
    def oid(self) -> str:
        return git_blob_oid(self.data)

    @property
    def size(self) -> int:
        return self.lfs_size if self.lfs_sha256 else len(self.data)


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, Blob]
    title: str
    description: str
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    gated: bool = False
    gated_allowed: set[str] = field(default_factory=set)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass
class User:
    name: str
    orgs: set[str] = field(default_factory=set)

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


class HubError(Exception):
    """An HTTP error the handler turns into a response."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class HubState:
    """Repos, users, LFS objects and the request log. Every mutation takes `lock`."""

    def __init__(self):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.users: dict[str, User] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_expected: dict[str, int] = {}
        self.secret = secrets.token_bytes(16)
        self.requests: list[tuple[str, str, int]] = []
        self.unknown_routes: list[str] = []
        self.commit_counter = 0
        # GitHub OIDC emulation: the request token GitHub gives the job, the id tokens it mints,
        # and which resource each id token is trusted to publish to.
        self.github_request_token: str | None = None
        self.trusted_publishers: dict[str, str] = {}
        self.id_token_audiences: list[str] = []
        self.exchanged_tokens: list[str] = []
        # Test hooks: run before a commit request is applied (outside the lock).
        self.before_commit = None
        self._commit_barrier: threading.Barrier | None = None

    # Users, repos and commits

    def add_user(self, name: str, token: str, orgs=()) -> User:
        user = User(name, set(orgs))
        with self.lock:
            self.users[token] = user
        return user

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", headers={})
            repo = Repo(repo_type, repo_id, private, gated)
            self.repos[key] = repo
            self.apply_commit(repo, "main", {".gitattributes": Blob(DEFAULT_GITATTRIBUTES.encode())}, [], "initial commit", "")
            return repo

    def apply_commit(self, repo: Repo, branch: str, added: dict[str, Blob], deleted: list[str], title: str, description: str) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].tree) if parent else {}
            for path in deleted:
                if path in tree:
                    del tree[path]
                else:
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"cannot delete {path}: not found", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
            tree.update(added)
            self.commit_counter += 1
            record = json.dumps(
                {"parent": parent, "tree": sorted((p, b.oid) for p, b in tree.items()), "title": title, "n": self.commit_counter}
            ).encode()
            sha = hashlib.sha1(record).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.commits[sha] = Commit(sha, parent, tree, title, description, date)
            repo.branches[branch] = sha
            return sha

    def add_files(self, repo_type: str, repo_id: str, files: dict[str, bytes], title: str = "add files") -> str:
        """Commit files directly (test setup); files matching .gitattributes LFS patterns become LFS."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            head = repo.commits[repo.branches["main"]]
            blobs = {}
            for path, data in files.items():
                if is_lfs_path(head.tree, path):
                    sha = hashlib.sha256(data).hexdigest()
                    self.lfs_objects[sha] = data
                    blobs[path] = Blob(lfs_pointer(sha, len(data)), sha, len(data))
                else:
                    blobs[path] = Blob(data)
            return self.apply_commit(repo, "main", blobs, [], title, "")

    def history(self, repo_type: str, repo_id: str, branch: str = "main") -> list[Commit]:
        """Return the commits of a branch, newest first, following parents."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            out, sha = [], repo.branches[branch]
            while sha:
                out.append(repo.commits[sha])
                sha = repo.commits[sha].parent
            return out

    def read_file(self, repo_type: str, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            blob = repo.commits[resolve_revision(repo, revision)].tree[path]
            return self.lfs_objects[blob.lfs_sha256] if blob.lfs_sha256 else blob.data

    def hold_commits(self, count: int, timeout: float = 30.0) -> None:
        """Make the next `count` commit requests wait for each other, so they race on one parent."""
        self._commit_barrier = threading.Barrier(count, timeout=timeout)

    # Access control

    def user_for(self, authorization: str | None) -> User | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        with self.lock:
            user = self.users.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def repo_for_read(self, repo_type: str, repo_id: str, user: User | None) -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or (user is not None and user.can_write(repo.namespace)))
        if not visible:
            if user is None:
                raise HubError(401, "Repository not found", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def repo_for_write(self, repo_type: str, repo_id: str, user: User | None) -> Repo:
        repo = self.repo_for_read(repo_type, repo_id, user)
        if user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if not user.can_write(repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def sign(self, sha256: str) -> str:
        return hmac.new(self.secret, sha256.encode(), "sha256").hexdigest()


def is_lfs_path(tree: dict[str, Blob], path: str) -> bool:
    attributes = tree.get(".gitattributes")
    if attributes is None:
        return False
    name = path.rsplit("/", 1)[-1]
    for line in attributes.data.decode().splitlines():
        parts = line.split()
        if len(parts) >= 2 and "filter=lfs" in parts[1:]:
            pattern = parts[0]
            target = path if "/" in pattern else name
            if fnmatch.fnmatchcase(target, pattern):
                return True
    return False


def resolve_revision(repo: Repo, revision: str) -> str:
    if revision in repo.branches:
        return repo.branches[revision]
    if revision in repo.tags:
        return repo.tags[revision]
    if revision in repo.commits:
        return revision
    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def check_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def check_front_matter(content: str) -> None:
    """Raise HubError 400 when README.md front matter is not a YAML mapping."""
    if not content.startswith("---\n"):
        return
    end = content.find("\n---", 4)
    if end < 0:
        raise HubError(400, "README.md front matter is not closed by ---")
    try:
        data = yaml.safe_load(content[4:end])
    except yaml.YAMLError as exc:
        raise HubError(400, f"Invalid YAML in README.md front matter: {exc}")
    if data is not None and not isinstance(data, dict):
        raise HubError(400, "README.md front matter must be a YAML mapping")


# Properties GET /api/models may return, as `expand` names them (huggingface_hub 2.4,
# ExpandModelProperty_T). The server fills the ones listed in `model_record`.
MODEL_EXPAND = {
    "author", "cardData", "config", "createdAt", "disabled", "downloads", "downloadsAllTime", "gated", "gguf",
    "inference", "inferenceProviderMapping", "lastModified", "library_name", "likes", "mask_token", "model-index",
    "pipeline_tag", "private", "safetensors", "sha", "siblings", "spaces", "tags", "transformersInfo",
    "trendingScore", "widgetData", "resourceGroup", "evalResults",
}


def safetensors_parameter_count(data: bytes) -> dict[str, int]:
    """Return {dtype: element count} from a safetensors file's header, as the Hub reports it."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    counts: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in entry["shape"]:
            count *= size
        counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + count
    return counts


def model_record(state: "HubState", repo: "Repo") -> dict:
    """Return a model repo as GET /api/models lists it, read from its main branch.

    Tags are the README front matter's `tags`, the config's model_type, and "safetensors"
    when the repo has such files. `safetensors` counts the parameters in their headers.
    """
    with state.lock:
        sha = repo.branches["main"]
        commit = repo.commits[sha]
        files = {path: state.lfs_objects[b.lfs_sha256] if b.lfs_sha256 else b.data for path, b in commit.tree.items()}
    config = json.loads(files["config.json"]) if "config.json" in files else None
    tags = []
    readme = files.get("README.md", b"").decode("utf-8", "replace")
    if readme.startswith("---\n") and readme.find("\n---", 4) > 0:
        front = yaml.safe_load(readme[4 : readme.find("\n---", 4)]) or {}
        tags.extend(front.get("tags", []))
    if config and "model_type" in config:
        tags.append(config["model_type"])
    parameters: dict[str, int] = {}
    for path, data in files.items():
        if path.endswith(".safetensors"):
            tags.append("safetensors")
            for dtype, count in safetensors_parameter_count(data).items():
                parameters[dtype] = parameters.get(dtype, 0) + count
    record = {
        "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
        "id": repo.repo_id,
        "author": repo.namespace,
        "sha": sha,
        "lastModified": commit.date,
        "private": repo.private,
        "gated": "auto" if repo.gated else False,
        "disabled": False,
        "tags": list(dict.fromkeys(tags)),
        "downloads": 0,
        "likes": 0,
        "siblings": [{"rfilename": path} for path in sorted(files)],
    }
    if config is not None:
        record["config"] = {key: config[key] for key in ("model_type", "architectures") if key in config}
    if parameters:
        record["safetensors"] = {"parameters": parameters, "total": sum(parameters.values())}
    return record


class Handler(BaseHTTPRequestHandler):
    """Routes one request; `server.hub` is the HubServer."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean; the state records requests
        pass

    # Plumbing

    @property
    def hub(self) -> "HubServer":
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def state(self) -> HubState:
        return self.hub.state

    def body(self) -> bytes:
        return self._body

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(length) if length else b""

    def json_body(self) -> dict:
        try:
            value = json.loads(self.body() or b"null")
        except json.JSONDecodeError:
            raise HubError(400, "request body is not valid JSON")
        if not isinstance(value, dict):
            raise HubError(400, "request body must be a JSON object")
        return value

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, content_type="application/json"):
        if raw is not None:
            data = raw
        elif payload is None:
            data = b""
        else:
            data = json.dumps(payload).encode()
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        with self.state.lock:
            self.state.requests.append((self.command, self.path, status))

    def fail(self, error: HubError):
        headers = dict(error.headers)
        headers["X-Error-Message"] = error.message
        if error.code:
            headers["X-Error-Code"] = error.code
        self.send(error.status, {"error": error.message}, headers)

    def dispatch(self):
        # Read the whole body first, so an early error response leaves the keep-alive
        # connection at a request boundary.
        self._body = self.read_body()
        try:
            self.route()
        except HubError as error:
            self.fail(error)
        except Exception as exc:  # a bug in the test server: return 500 so the test fails loudly
            self.send(500, {"error": f"test server error: {type(exc).__name__}: {exc}"})

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = dispatch

    # Routing

    def route(self):
        parts = urllib.parse.urlsplit(self.path)
        segments = [urllib.parse.unquote(s) for s in parts.path.split("/")[1:]]
        query = dict(urllib.parse.parse_qsl(parts.query))
        on_cdn = self.server.server_address[1] == self.hub.cdn_port
        if on_cdn:
            return self.route_cdn(segments, query)
        if segments[:1] == ["github"]:
            return self.github_id_token(query)
        user = self.state.user_for(self.headers.get("Authorization"))
        method = self.command
        if segments == ["oauth", "token"] and method == "POST":
            return self.oauth_token()
        if segments[:1] == ["api"]:
            return self.route_api(segments[1:], query, user)
        if segments[:1] == ["lfs-verify"] and method == "POST":
            return self.lfs_verify(segments[1], user)
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type = REPO_TYPES[segments[0]]
            segments = segments[1:]
        if len(segments) >= 3 and segments[1].endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(repo_type, f"{segments[0]}/{segments[1][:-4]}", user)
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(repo_type, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]), user)
        self.unknown()

    def unknown(self):
        with self.state.lock:
            self.state.unknown_routes.append(f"{self.command} {self.path}")
        raise HubError(404, f"unknown route {self.command} {self.path}", "UnknownRoute")

    def route_api(self, segments, query, user):
        method = self.command
        if segments == ["repos", "create"] and method == "POST":
            return self.create_repo(user)
        if segments == ["validate-yaml"] and method == "POST":
            return self.validate_yaml()
        if segments == ["models"] and method == "GET":
            return self.list_models(user)
        if len(segments) < 3 or segments[0] not in REPO_TYPES:
            return self.unknown()
        repo_type = REPO_TYPES[segments[0]]
        repo_id = f"{segments[1]}/{segments[2]}"
        rest = segments[3:]
        if not rest and method == "GET":
            return self.repo_info(repo_type, repo_id, "main", user)
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            return self.repo_info(repo_type, repo_id, rest[1], user)
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            return self.preupload(repo_type, repo_id, rest[1], user)
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            return self.commit(repo_type, repo_id, rest[1], user)
        if len(rest) == 2 and rest[0] == "tag" and method == "POST":
            return self.create_tag(repo_type, repo_id, rest[1], user)
        if rest == ["refs"] and method == "GET":
            return self.refs(repo_type, repo_id, user, query)
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            return self.tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query, user)
        return self.unknown()

    # Repos

    def create_repo(self, user):
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = self.json_body()
        name = payload.get("name")
        namespace = payload.get("organization") or user.name
        repo_type = payload.get("type") or "model"
        if not isinstance(name, str) or not name or repo_type not in URL_PREFIX:
            raise HubError(400, "create repo needs a name and a valid type")
        if not user.can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        visibility = payload.get("visibility")
        if visibility not in (None, "public", "private"):
            raise HubError(400, f"invalid visibility {visibility!r}")
        private = visibility == "private" or payload.get("private") is True
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
        try:
            self.state.create_repo(repo_type, repo_id, private=private)
        except HubError as error:
            error.headers = {}
            self.send(409, {"error": error.message, "url": url}, {"X-Error-Message": error.message})
            return
        self.send(200, {"url": url, "name": repo_id, "id": repo_id})

    def repo_info(self, repo_type, repo_id, revision, user):
        repo = self.state.repo_for_read(repo_type, repo_id, user)
        with self.state.lock:
            sha = resolve_revision(repo, revision)
            commit = repo.commits[sha]
            siblings = [{"rfilename": path} for path in sorted(commit.tree)]
        self.send(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo.namespace,
                "sha": sha,
                "lastModified": commit.date,
                "private": repo.private,
                "gated": "auto" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            },
        )

    def list_models(self, user):
        """GET /api/models: model repos the caller may read, filtered as the Hub's model search does."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        unknown = sorted(set(query) - {"author", "filter", "search", "limit", "expand", "full", "config", "cardData"})
        if unknown:
            raise HubError(400, f"unsupported query parameters: {unknown}")
        expand = query.get("expand")
        if expand and ({"full", "config", "cardData"} & set(query)):
            raise HubError(400, "expand cannot be combined with full, config or cardData")
        bad = sorted(set(expand or ()) - MODEL_EXPAND)
        if bad:
            raise HubError(400, f"invalid expand values: {bad}")
        author = query.get("author", [None])[0]
        search = query.get("search", [None])[0]
        filters = query.get("filter", [])
        limit = int(query["limit"][0]) if "limit" in query else None
        with self.state.lock:
            repos = [repo for (kind, _), repo in sorted(self.state.repos.items()) if kind == "model"]
        results = []
        for repo in repos:
            if repo.private and not (user is not None and user.can_write(repo.namespace)):
                continue
            if author is not None and repo.namespace != author:
                continue
            if search is not None and search.lower() not in repo.repo_id.lower():
                continue
            record = model_record(self.state, repo)
            if any(tag not in record["tags"] for tag in filters):
                continue
            if expand:
                record = {key: value for key, value in record.items() if key in expand or key in ("_id", "id")}
            results.append(record)
        self.send(200, results[:limit] if limit is not None else results)

    def validate_yaml(self):
        payload = self.json_body()
        content = payload.get("content")
        if not isinstance(content, str) or payload.get("repoType") not in URL_PREFIX:
            raise HubError(400, "validate-yaml needs content and repoType")
        try:
            check_front_matter(content)
        except HubError as error:
            self.send(400, {"errors": [{"message": error.message}], "warnings": []}, {"X-Error-Message": error.message})
            return
        self.send(200, {"errors": [], "warnings": []})

    # Uploads and commits

    def preupload(self, repo_type, repo_id, revision, user):
        repo = self.state.repo_for_write(repo_type, repo_id, user)
        payload = self.json_body()
        files = payload.get("files")
        if not isinstance(files, list) or not files:
            raise HubError(400, "preupload needs a non-empty files list")
        with self.state.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
        answer = []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("size"), int) or not isinstance(item.get("sample"), str):
                raise HubError(400, "each preupload file needs path, sample (base64) and size")
            path = check_path(item.get("path", ""))
            base64.b64decode(item["sample"], validate=True)
            existing = head.tree.get(path)
            lfs = is_lfs_path(head.tree, path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.lfs_sha256 else existing.oid
            answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self.send(200, {"files": answer, "commitOid": head.sha})

    def lfs_batch(self, repo_type, repo_id, user):
        if LFS_CONTENT_TYPE not in (self.headers.get("Accept") or ""):
            raise HubError(406, f"LFS batch requests must accept {LFS_CONTENT_TYPE}")
        self.state.repo_for_write(repo_type, repo_id, user)
        payload = self.json_body()
        if payload.get("operation") != "upload" or payload.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "only sha256 uploads are supported")
        if "basic" not in (payload.get("transfers") or ["basic"]):
            raise HubError(400, "only the basic transfer is supported")
        objects = []
        for item in payload.get("objects") or []:
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or len(oid) != 64 or not isinstance(size, int):
                raise HubError(400, "each LFS object needs a sha256 oid and an integer size")
            with self.state.lock:
                present = oid in self.state.lfs_objects
                if not present:
                    self.state.lfs_expected[oid] = size
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not present:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.cdn_url}/lfs-upload/{oid}?sig={self.state.sign(oid)}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(entry)
        self.send(200, {"transfer": "basic", "objects": objects}, content_type=LFS_CONTENT_TYPE)

    def lfs_verify(self, oid, user):
        if user is None:
            raise HubError(401, "LFS verify needs authentication")
        payload = self.json_body()
        with self.state.lock:
            data = self.state.lfs_objects.get(oid)
        if data is None or payload.get("oid") != oid or payload.get("size") != len(data):
            raise HubError(404, f"LFS object {oid} was not uploaded with size {payload.get('size')}")
        self.send(200, {})

    def commit(self, repo_type, repo_id, revision, user):
        repo = self.state.repo_for_write(repo_type, repo_id, user)
        if not (self.headers.get("Content-Type") or "").startswith("application/x-ndjson"):
            raise HubError(400, "commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in self.body().decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first ndjson line must be the commit header")
        header = lines[0]["value"]
        if not isinstance(header.get("summary"), str) or not header["summary"].strip():
            raise HubError(400, "commit summary must not be empty")

        hook = self.state.before_commit
        if hook is not None:
            self.state.before_commit = None
            hook()
        barrier = self.state._commit_barrier
        if barrier is not None:
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                pass
            self.state._commit_barrier = None

        added, deleted = {}, []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = check_path(value.get("path", ""))
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"{path}: only base64 file content is supported")
                data = base64.b64decode(value["content"], validate=True)
                if path == "README.md":
                    check_front_matter(data.decode())
                added[path] = Blob(data)
            elif key == "lfsFile":
                oid = value.get("oid")
                with self.state.lock:
                    data = self.state.lfs_objects.get(oid)
                if value.get("algo") != "sha256" or data is None:
                    raise HubError(422, f"{path}: LFS object {oid} was never uploaded")
                if "size" in value and value["size"] != len(data):
                    raise HubError(422, f"{path}: LFS object size {value['size']} != {len(data)}")
                added[path] = Blob(lfs_pointer(oid, len(data)), oid, len(data))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(path)
            else:
                raise HubError(400, f"unknown commit operation {key!r}")

        with self.state.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = repo.branches[revision]
            parent = header.get("parentCommit")
            if parent is not None and not (len(parent) >= 7 and head.startswith(parent)):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            sha = self.state.apply_commit(repo, revision, added, deleted, header["summary"], header.get("description", ""))
        url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self.send(200, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""})

    def create_tag(self, repo_type, repo_id, revision, user):
        repo = self.state.repo_for_write(repo_type, repo_id, user)
        payload = self.json_body()
        tag = payload.get("tag")
        if not isinstance(tag, str) or not tag or ".." in tag or tag.endswith((".", "/", ".lock")) or " " in tag:
            raise HubError(400, f"invalid tag name {tag!r}")
        with self.state.lock:
            sha = resolve_revision(repo, revision)
            if tag in repo.tags or tag in repo.branches:
                raise HubError(409, f"Tag {tag} already exists")
            repo.tags[tag] = sha
        self.send(200, {})

    # Reads

    def refs(self, repo_type, repo_id, user, query):
        repo = self.state.repo_for_read(repo_type, repo_id, user)
        with self.state.lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(repo.branches.items())]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
        payload = {"branches": branches, "converts": [], "tags": tags}
        if query.get("include_prs"):
            payload["pullRequests"] = []
        self.send(200, payload)

    def tree(self, repo_type, repo_id, revision, path, query, user):
        repo = self.state.repo_for_read(repo_type, repo_id, user)
        recursive = query.get("recursive", "").lower() in ("1", "true")
        with self.state.lock:
            commit = repo.commits[resolve_revision(repo, revision)]
            tree = dict(commit.tree)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in tree):
            raise HubError(404, f"{path} not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        entries, folders = [], set()
        for file_path in sorted(tree):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            if "/" in rest:
                parts = rest.split("/")
                depth = range(1, len(parts)) if recursive else range(1, 2)
                for i in depth:
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            blob = tree[file_path]
            item = {"type": "file", "oid": blob.oid, "size": blob.size, "path": file_path}
            if blob.lfs_sha256:
                item["lfs"] = {"oid": blob.lfs_sha256, "size": blob.lfs_size, "pointerSize": len(blob.data)}
            entries.append(item)
        for folder in sorted(folders):
            entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
        self.send(200, entries)

    def resolve(self, repo_type, repo_id, revision, path, user):
        repo = self.state.repo_for_read(repo_type, repo_id, user)
        if repo.gated and (user is None or user.name not in repo.gated_allowed) and not (user and user.can_write(repo.namespace)):
            status = 401 if user is None else 403
            raise HubError(status, f"Access to {repo_id} is restricted; you must be authenticated and accepted", "GatedRepo")
        with self.state.lock:
            sha = resolve_revision(repo, revision)
            blob = repo.commits[sha].tree.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if blob.lfs_sha256:
            headers.update(
                {
                    "ETag": f'"{blob.oid}"',
                    "X-Linked-Etag": f'"{blob.lfs_sha256}"',
                    "X-Linked-Size": str(blob.lfs_size),
                    "Location": f"{self.hub.cdn_url}/cdn/{blob.lfs_sha256}?sig={self.state.sign(blob.lfs_sha256)}",
                }
            )
            self.send(302, None, headers)
            return
        headers["ETag"] = f'"{blob.oid}"'
        self.send_content(blob.data, headers)

    def send_content(self, data: bytes, headers: dict):
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and self.command == "GET":
            start_text, _, end_text = requested[6:].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(data) - 1
            if start >= len(data):
                raise HubError(416, "requested range not satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self.send(206, raw=data[start : end + 1], headers=headers, content_type="application/octet-stream")
            return
        self.send(200, raw=data, headers=headers, content_type="application/octet-stream")

    # The CDN origin: signed URLs, never an Authorization header

    def route_cdn(self, segments, query):
        if self.headers.get("Authorization"):
            raise HubError(400, "signed CDN URLs must not carry an Authorization header")
        if len(segments) != 2 or not hmac.compare_digest(query.get("sig", ""), self.state.sign(segments[1])):
            raise HubError(403, "invalid or missing URL signature")
        oid = segments[1]
        if segments[0] == "lfs-upload" and self.command == "PUT":
            data = self.body()
            with self.state.lock:
                expected = self.state.lfs_expected.get(oid)
                if expected is None or expected != len(data) or hashlib.sha256(data).hexdigest() != oid:
                    raise HubError(400, f"uploaded content does not match oid {oid} and size {expected}")
                self.state.lfs_objects[oid] = data
            self.send(200, None, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
            return
        if segments[0] == "cdn" and self.command in ("GET", "HEAD"):
            with self.state.lock:
                data = self.state.lfs_objects.get(oid)
            if data is None:
                raise HubError(404, "no such object")
            self.send_content(data, {"ETag": f'"{oid}"'})
            return
        self.unknown()

    # OIDC

    def github_id_token(self, query):
        expected = self.state.github_request_token
        if not expected or self.headers.get("Authorization") != f"Bearer {expected}":
            raise HubError(401, "bad GitHub Actions request token")
        audience = query.get("audience")
        if not audience:
            raise HubError(400, "audience is required")
        with self.state.lock:
            self.state.id_token_audiences.append(audience)
            id_token = next(iter(self.state.trusted_publishers), "untrusted-id-token")
        self.send(200, {"count": 1, "value": id_token})

    def oauth_token(self):
        payload = self.json_body()
        if payload.get("grant_type") != "urn:ietf:params:oauth:grant-type:token-exchange":
            raise HubError(400, "unsupported grant_type")
        if payload.get("subject_token_type") != "urn:ietf:params:oauth:token-type:id_token":
            raise HubError(400, "unsupported subject_token_type")
        resource = payload.get("resource")
        with self.state.lock:
            trusted = self.state.trusted_publishers.get(payload.get("subject_token"))
        if trusted is None or trusted != resource:
            raise HubError(401, "id token is not trusted for this resource")
        namespace = resource.split("/")[-2]
        token = "hf_oidc_" + secrets.token_hex(8)
        self.state.add_user(f"oidc-{namespace}", token, orgs=[namespace])
        with self.state.lock:
            self.state.exchanged_tokens.append(token)
        self.send(200, {"access_token": token, "token_type": "bearer", "expires_in": 3600})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class HubServer:
    """The test Hub on an ephemeral 127.0.0.1 port, plus its CDN origin on a second port."""

    def __init__(self, state: HubState | None = None):
        self.state = state or HubState()
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self.port = self.cdn_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn_port}"

    def start(self) -> "HubServer":
        for _ in range(2):
            server = _Server(("127.0.0.1", 0), Handler)
            server.hub = self
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.port = self._servers[0].server_address[1]
        self.cdn_port = self._servers[1].server_address[1]
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """Run the server in the foreground for manual checks: python tests/hub_server.py TOKEN USER."""
    import sys

    server = HubServer().start()
    if len(sys.argv) >= 3:
        server.state.add_user(sys.argv[2], sys.argv[1])
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
