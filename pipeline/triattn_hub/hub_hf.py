"""A hub in a Hugging Face dataset repo, addressed as `hf://datasets/ORG/NAME`.

The repo has the layout index.py describes. A read resolves `index.json` on the branch (main)
to one commit sha and downloads every other file pinned to that sha with `hf_hub_download`.
So a fetch never mixes two states of the repo, and a fetched calibration stays usable offline
from the Hugging Face cache.

One publish is one commit (`HfApi.create_commit`) holding the artifact, its manifest, the
updated index.json and the dataset card, sent with `parent_commit` set to the commit whose
index was read. When another publish moved the branch first, the Hub returns 412. Then the
index is read again at the new head, the version is assigned again, and the commit is retried.

Tags: each published version gets the git tag `{model id with "/" replaced by "--"}--{version}`,
for example `HuggingFaceTB--SmolLM2-135M-Instruct--v1`, pointing at a commit that contains it.
Hugging Face repo ids cannot contain "--", so a tag names exactly one model version.

Endpoint and token are passed explicitly to every huggingface_hub call, because that library
reads HF_ENDPOINT only when it is imported. Tokens are never logged, printed or stored.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from . import __version__
from .artifact import ARTIFACT_NAME, MANIFEST_NAME, write_artifact
from .card import render_card
from .errors import AccessDeniedError, HubError, OfflineError, PrivateModelError
from .hub_local import PublishResult
from .index import INDEX_NAME, add_version, check_index, empty_index, find_by_inputs, next_version

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
ADDRESS_PREFIX = "hf://datasets/"
REPO_TYPE = "dataset"
DEFAULT_REVISION = "main"
# Publish attempts before giving up when other publishes keep moving the branch.
MAX_PUBLISH_ATTEMPTS = 8
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# GitHub Actions OIDC token exchange (Hugging Face "trusted publishers"): the grant and subject
# token types of RFC 8693, as huggingface_hub 2.4 sends them in huggingface_hub/_oidc.py.
OIDC_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
OIDC_SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
_OIDC_REFRESH_MARGIN_SECONDS = 300
_oidc_cache: dict[tuple[str, str], tuple[str, float]] = {}
_oidc_lock = threading.Lock()


def resolve_endpoint(explicit: str | None = None) -> str:
    """Return the Hub endpoint: `explicit`, else $HF_ENDPOINT read now, else huggingface.co."""
    endpoint = explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    return endpoint.rstrip("/")


def github_oidc_available() -> bool:
    """Return True inside a GitHub Actions job that may request an OIDC id token."""
    return bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") and os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"))


def _post_json(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json", **headers}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def _get_json(url: str, headers: dict, timeout: float) -> dict:
    request = urllib.request.Request(url, headers=headers, method="GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def exchange_github_oidc_token(endpoint: str, resource: str, *, timeout: float = 30.0) -> str:
    """Exchange the GitHub Actions OIDC id token for a short-lived Hub token scoped to `resource`.

    This is how a CI job publishes without a stored HF_TOKEN secret. GitHub gives a job that
    declares `permissions: id-token: write` two variables, ACTIONS_ID_TOKEN_REQUEST_URL and
    ACTIONS_ID_TOKEN_REQUEST_TOKEN. Step 1 sends GET to that URL with `audience=<endpoint>` added
    to its query and the request token as bearer token. The JSON reply's `value` is a signed id
    token naming the repository and workflow. Step 2 sends an RFC 8693 token exchange, POST
    `{endpoint}/oauth/token` with JSON fields grant_type, subject_token_type, subject_token and
    resource (for example `datasets/ORG/NAME`). The Hub checks the id token against the trusted
    publishers configured on that repo and returns `access_token` and `expires_in`.

    Neither token is logged or written to disk; the Hub token is kept in memory until five
    minutes before it expires. Raises AccessDeniedError when a step is refused, OfflineError
    when a host cannot be reached, and HubError when the variables are missing.
    """
    endpoint = endpoint.rstrip("/")
    key = (endpoint, resource)
    with _oidc_lock:
        cached = _oidc_cache.get(key)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
    request_url = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    request_token = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not request_url or not request_token:
        raise HubError(
            "ACTIONS_ID_TOKEN_REQUEST_URL and ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set; "
            "give the GitHub Actions job `permissions: id-token: write`"
        )
    parts = urllib.parse.urlsplit(request_url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + [("audience", endpoint)]
    id_token_url = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    try:
        reply = _get_json(id_token_url, {"Authorization": f"Bearer {request_token}"}, timeout)
        id_token = reply["value"]
        exchanged = _post_json(
            f"{endpoint}/oauth/token",
            {
                "grant_type": OIDC_GRANT_TYPE,
                "subject_token_type": OIDC_SUBJECT_TOKEN_TYPE,
                "subject_token": id_token,
                "resource": resource,
            },
            {},
            timeout,
        )
        token = exchanged["access_token"]
        expires_in = int(exchanged.get("expires_in", 3600))
    except urllib.error.HTTPError as exc:
        raise AccessDeniedError(
            f"GitHub OIDC token exchange for {resource} at {endpoint} failed with HTTP {exc.code}; "
            "configure this workflow as a trusted publisher of the repo, or set HF_TOKEN"
        ) from None
    except urllib.error.URLError as exc:
        raise OfflineError(f"GitHub OIDC token exchange for {resource}: cannot reach {exc.reason}") from None
    except (KeyError, TypeError, ValueError):
        raise AccessDeniedError(
            f"GitHub OIDC token exchange for {resource} at {endpoint} returned an unexpected reply"
        ) from None
    with _oidc_lock:
        _oidc_cache[key] = (token, time.monotonic() + max(expires_in - _OIDC_REFRESH_MARGIN_SECONDS, 0))
    logger.info("obtained a Hub token for %s from the GitHub OIDC token exchange", resource)
    return token


def resolve_token(explicit: str | None, *, endpoint: str, resource: str | None, write: bool) -> str | None:
    """Return the token for Hub requests, or None to send none.

    Order: `explicit`, $HF_TOKEN (or $HUGGING_FACE_HUB_TOKEN), the GitHub OIDC exchange for
    `resource` inside GitHub Actions, then the login stored by `hf auth login`. A failed OIDC
    exchange raises when writing. When reading, it is logged and the next source is tried, so
    that public hubs stay readable from CI jobs that are not trusted publishers.
    """
    if explicit:
        return explicit
    from_env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if from_env and from_env.strip():
        return from_env.strip()
    if resource is not None and github_oidc_available():
        try:
            return exchange_github_oidc_token(endpoint, resource)
        except (AccessDeniedError, OfflineError):
            if write:
                raise
            logger.warning("GitHub OIDC token exchange for %s failed; reading without it", resource)
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as exc:  # huggingface_hub raises OIDCError and others for a broken login setup
        raise AccessDeniedError(f"cannot read the stored Hugging Face login: {type(exc).__name__}") from None


def version_tag(model_id: str, version: str) -> str:
    """Return the git tag of one published version (see the module docstring)."""
    return f"{model_id.replace('/', '--')}--{version}"


def parse_address(address: str) -> str:
    """Return the repo id of an `hf://datasets/ORG/NAME` address; raise HubError for other forms."""
    if not address.startswith(ADDRESS_PREFIX):
        raise HubError(f"hub address {address!r} is not of the form hf://datasets/ORG/NAME")
    repo_id = address[len(ADDRESS_PREFIX):].strip("/")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(f"hub address {address!r} does not name a dataset repo; use hf://datasets/ORG/NAME")
    return repo_id


def is_offline_error(exc: BaseException) -> bool:
    """Return True for errors that mean the Hub could not be reached (or offline mode is on)."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError))


def translate_error(exc: BaseException, where: str, *, had_token: bool):
    """Return the triattn-hub error for a huggingface_hub or network error (to raise `from None`)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return AccessDeniedError(f"{where}: the repo is gated; request access on its page and log in with that account")
    if isinstance(exc, RepositoryNotFoundError):
        if had_token:
            return AccessDeniedError(f"{where}: repo not found, or the token in use cannot read it; check the address")
        return AccessDeniedError(
            f"{where}: repo not found, or private and no token was sent; check the address, "
            "or set HF_TOKEN or run `hf auth login`"
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{where}: revision not found")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403):
        return AccessDeniedError(
            f"{where}: the Hub rejected the credentials (HTTP {exc.response.status_code}); "
            "check HF_TOKEN or `hf auth login`, and that the token may access this repo"
        )
    if is_offline_error(exc):
        return OfflineError(
            f"{where}: the Hub cannot be reached (or HF_HUB_OFFLINE is set) and nothing usable is cached; "
            "fetch once while online"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubError(f"{where}: Hub request failed with HTTP {status}")
    return HubError(f"{where}: {type(exc).__name__}: {exc}")


class HfHub:
    """A hub in a Hugging Face dataset repo; see the module docstring for the commit protocol."""

    def __init__(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        revision: str = DEFAULT_REVISION,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.repo_id = repo_id
        self.endpoint = resolve_endpoint(endpoint)
        self.revision = revision
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.address = ADDRESS_PREFIX + repo_id
        # Commit sha of the last index read; later downloads are pinned to it.
        self.commit: str | None = None
        self._explicit_token = token
        self._tokens: dict[bool, str | None] = {}

    @classmethod
    def from_address(
        cls,
        address: str,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> "HfHub":
        return cls(parse_address(address), token=token, endpoint=endpoint, cache_dir=cache_dir)

    def __repr__(self) -> str:
        return f"HfHub({self.address!r}, endpoint={self.endpoint!r})"

    def _token(self, write: bool = False) -> str | None:
        if write not in self._tokens:
            self._tokens[write] = resolve_token(
                self._explicit_token, endpoint=self.endpoint, resource=f"datasets/{self.repo_id}", write=write
            )
        return self._tokens[write]

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, library_name="triattn-hub", library_version=__version__)

    def _error(self, exc: BaseException, action: str, write: bool = False):
        return translate_error(exc, f"{self.address} ({action})", had_token=self._token(write) is not None)

    def _download(self, filename: str, revision: str, *, write: bool = False) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(
            hf_hub_download(
                self.repo_id,
                filename,
                repo_type=REPO_TYPE,
                revision=revision,
                endpoint=self.endpoint,
                token=self._token(write) or False,
                cache_dir=self.cache_dir,
            )
        )

    # Reading

    def read_index(self, commit: str | None = None, *, write: bool = False) -> dict:
        """Return the index at `commit`, or at the branch head, and remember that commit.

        Offline, or when the Hub cannot be reached, the head recorded in the local cache by the
        last online read is used. Raises OfflineError when nothing is cached, AccessDeniedError
        for private or gated repos without a usable token, HubError otherwise.
        """
        from huggingface_hub.errors import RemoteEntryNotFoundError

        revision = commit or self.revision
        try:
            path = self._download(INDEX_NAME, revision, write=write)
        except RemoteEntryNotFoundError as exc:
            head = exc.response.headers.get("X-Repo-Commit") if exc.response is not None else None
            self.commit = commit or head
            logger.info("%s has no %s yet at %s", self.address, INDEX_NAME, self.commit)
            return empty_index()
        except Exception as exc:
            raise self._error(exc, f"reading {INDEX_NAME} at {revision}", write) from None
        resolved = path.parent.name
        if not _COMMIT_SHA.match(resolved):
            raise HubError(f"{self.address}: {INDEX_NAME} was not served from a commit snapshot ({path})")
        self.commit = resolved
        try:
            return check_index(json.loads(path.read_text(encoding="utf-8")), f"{self.address}@{resolved}")
        except json.JSONDecodeError as exc:
            raise HubError(f"{self.address}@{resolved}: {INDEX_NAME} is not valid JSON: {exc}") from None

    def fetch_version(self, model_id: str, version: str, entry: dict) -> Path:
        """Download one version pinned to the commit of the last index read; return its directory."""
        if self.commit is None:
            raise HubError(f"{self.address}: read the index before fetching {model_id} {version}")
        directory = None
        for name in [MANIFEST_NAME, *entry["files"]]:
            try:
                path = self._download(f"{entry['path']}/{name}", self.commit)
            except Exception as exc:
                raise self._error(exc, f"downloading {model_id} {version} {name} at {self.commit}") from None
            directory = path.parent
        return directory

    def download_file(self, filename: str, commit: str | None = None) -> Path:
        """Download one file of the repo at `commit` (default: the commit of the last index read)."""
        revision = commit or self.commit or self.revision
        try:
            return self._download(filename, revision)
        except Exception as exc:
            raise self._error(exc, f"downloading {filename} at {revision}") from None

    # Publishing

    def head_commit(self, *, write: bool = False) -> tuple[str, bool]:
        """Return (sha of the branch head, whether the repo is private), read from the Hub."""
        try:
            info = self._api().dataset_info(self.repo_id, revision=self.revision, token=self._token(write) or False)
        except Exception as exc:
            raise self._error(exc, "reading repo info", write) from None
        return info.sha, bool(info.private)

    def _ensure_repo(self, private_model: bool) -> bool:
        """Create the repo if missing (private when the model is private); return whether it is private."""
        from huggingface_hub.errors import RepositoryNotFoundError

        token = self._token(write=True)
        try:
            info = self._api().dataset_info(self.repo_id, revision=self.revision, token=token or False)
            return bool(info.private)
        except RepositoryNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, "reading repo info", True) from None
        try:
            self._api().create_repo(self.repo_id, repo_type=REPO_TYPE, private=private_model, token=token, exist_ok=True)
        except Exception as exc:
            raise self._error(exc, "creating the repo", True) from None
        logger.info("created %s repo %s", "private" if private_model else "public", self.address)
        return private_model

    def publish(self, tensors: dict, manifest: dict, *, allow_public: bool = False) -> PublishResult:
        """Publish one calibration in one commit and tag it; return where it is.

        As LocalHub.publish: `manifest` has no `artifact_version` or `files` yet; identical inputs
        return the existing version with `created=False`. A calibration of a private or gated
        model (manifest model.private) goes only to a private repo. A public repo raises
        PrivateModelError unless `allow_public`, and a missing repo is created private for it.
        Raises AccessDeniedError without a write token, HubError when the branch moved on every
        one of MAX_PUBLISH_ATTEMPTS attempts.
        """
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError

        model_id = manifest["model"]["id"]
        if self._token(write=True) is None:
            raise AccessDeniedError(
                f"publishing to {self.address} needs a write token; set HF_TOKEN, run `hf auth login`, "
                "or run in GitHub Actions with `permissions: id-token: write`"
            )
        private_model = bool(manifest["model"]["private"])
        repo_private = self._ensure_repo(private_model)
        if private_model and not repo_private and not allow_public:
            raise PrivateModelError(
                f"{model_id} is a private or gated model and {self.address} is public; publish to a "
                "private hub, or pass allow_public=True to publish its calibration publicly anyway"
            )
        for attempt in range(1, MAX_PUBLISH_ATTEMPTS + 1):
            parent, _ = self.head_commit(write=True)
            index = self.read_index(parent, write=True)
            existing = find_by_inputs(index, model_id, manifest["inputs_sha256"])
            if existing is not None:
                return self._existing_result(index, model_id, existing, parent)
            version = next_version(index, model_id)
            with tempfile.TemporaryDirectory(prefix="triattn-publish-") as staging:
                full = write_artifact(staging, tensors, {**manifest, "artifact_version": version})
                updated = add_version(index, full)
                entry = updated["models"][model_id]["versions"][version]
                operations = [
                    CommitOperationAdd(f"{entry['path']}/{name}", str(Path(staging) / name))
                    for name in (ARTIFACT_NAME, MANIFEST_NAME)
                ]
                operations.append(CommitOperationAdd(INDEX_NAME, (json.dumps(updated, indent=2, sort_keys=True) + "\n").encode()))
                operations.append(CommitOperationAdd("README.md", render_card(updated).encode()))
                try:
                    commit = self._api().create_commit(
                        self.repo_id,
                        operations,
                        commit_message=f"Publish {model_id} {version}",
                        commit_description=f"inputs_sha256 {manifest['inputs_sha256']}",
                        repo_type=REPO_TYPE,
                        revision=self.revision,
                        parent_commit=parent,
                        token=self._token(write=True),
                    )
                except HfHubHTTPError as exc:
                    if exc.response is not None and exc.response.status_code == 412:
                        logger.info(
                            "%s moved past %s while publishing %s %s (attempt %d of %d); reading the index again",
                            self.address, parent[:12], model_id, version, attempt, MAX_PUBLISH_ATTEMPTS,
                        )
                        time.sleep(random.uniform(0.05, 0.25) * attempt)
                        continue
                    raise self._error(exc, f"committing {model_id} {version}", True) from None
                except Exception as exc:
                    raise self._error(exc, f"committing {model_id} {version}", True) from None
            self.commit = commit.oid
            self._tag(model_id, version, commit.oid)
            logger.info("published %s %s to %s at %s", model_id, version, self.address, commit.oid)
            return PublishResult(model_id, version, True, f"{self.address}@{commit.oid}/{entry['path']}", full)
        raise HubError(
            f"{self.address}: the branch {self.revision} moved on each of {MAX_PUBLISH_ATTEMPTS} publish "
            f"attempts for {model_id}; publish again later"
        )

    def _existing_result(self, index: dict, model_id: str, version: str, commit: str) -> PublishResult:
        entry = index["models"][model_id]["versions"][version]
        logger.info("%s %s already contains these inputs; nothing published", model_id, version)
        self._tag(model_id, version, commit)
        manifest_path = self.download_file(f"{entry['path']}/{MANIFEST_NAME}", commit)
        stored = json.loads(manifest_path.read_text(encoding="utf-8"))
        return PublishResult(model_id, version, False, f"{self.address}@{commit}/{entry['path']}", stored)

    def _tag(self, model_id: str, version: str, commit: str) -> None:
        """Tag `commit` for this version unless the tag exists (tags are never moved)."""
        tag = version_tag(model_id, version)
        try:
            refs = self._api().list_repo_refs(self.repo_id, repo_type=REPO_TYPE, token=self._token(write=True))
            if any(existing.name == tag for existing in refs.tags):
                return
            self._api().create_tag(
                self.repo_id,
                tag=tag,
                tag_message=f"{model_id} {version}",
                revision=commit,
                repo_type=REPO_TYPE,
                token=self._token(write=True),
                exist_ok=True,
            )
        except Exception as exc:
            raise self._error(
                exc, f"tagging {tag}; the version is published, publish again to add the missing tag", True
            ) from None
        logger.info("tagged %s at %s", tag, commit[:12])
