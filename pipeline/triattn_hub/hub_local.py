"""A hub in a local directory, laid out as the Hugging Face dataset repo is (see index.py).

Publishing is atomic: the artifact is written into a staging directory inside the hub,
renamed into place, and only then is index.json replaced, all under an exclusive lock. A
failure at any step leaves index.json and every published version as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .artifact import _atomic_write_bytes, _umask, write_artifact
from .card import render_card
from .errors import HubError
from .index import INDEX_NAME, add_version, check_index, empty_index, find_by_inputs, next_version, version_dir

logger = logging.getLogger(__name__)


@dataclass
class PublishResult:
    """Outcome of a publish: the version that contains these inputs and whether it is new."""

    model_id: str
    version: str
    created: bool
    location: str
    manifest: dict


class LocalHub:
    """A hub in a local directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.address = str(self.root)

    def __repr__(self) -> str:
        return f"LocalHub({self.address!r})"

    def read_index(self) -> dict:
        """Return the hub's index (an empty one if the hub does not exist yet)."""
        path = self.root / INDEX_NAME
        if not path.exists():
            return empty_index()
        try:
            return check_index(json.loads(path.read_text(encoding="utf-8")), self.address)
        except json.JSONDecodeError as exc:
            raise HubError(f"{path} is not valid JSON: {exc}") from None

    def version_path(self, entry: dict) -> Path:
        return self.root / entry["path"]

    @contextlib.contextmanager
    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def publish(self, tensors: dict, manifest: dict) -> PublishResult:
        """Publish one calibration and return where it is.

        `manifest` has no `artifact_version` or `files` yet: the hub assigns the next version,
        unless a version with the same `inputs_sha256` exists, in which case nothing is written
        and that version is returned with `created=False`.
        """
        model_id = manifest["model"]["id"]
        with self._locked():
            index = self.read_index()
            existing = find_by_inputs(index, model_id, manifest["inputs_sha256"])
            if existing is not None:
                entry = index["models"][model_id]["versions"][existing]
                logger.info("%s %s already contains these inputs; nothing published", model_id, existing)
                stored = json.loads((self.version_path(entry) / "manifest.json").read_text(encoding="utf-8"))
                return PublishResult(model_id, existing, False, str(self.version_path(entry)), stored)
            version = next_version(index, model_id)
            final = self.root / version_dir(model_id, version)
            if final.exists():
                raise HubError(
                    f"{final} exists but {INDEX_NAME} does not list it; move it aside and publish again"
                )
            staging_root = self.root / ".staging"
            staging_root.mkdir(exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=staging_root))
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it owner-only
            try:
                full = write_artifact(staging, tensors, {**manifest, "artifact_version": version})
                updated = add_version(index, full)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, final)
                try:
                    _atomic_write_bytes(self.root / INDEX_NAME, (json.dumps(updated, indent=2, sort_keys=True) + "\n").encode())
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _atomic_write_bytes(self.root / "README.md", render_card(updated).encode())
        logger.info("published %s %s to %s", model_id, version, self.address)
        return PublishResult(model_id, version, True, str(final), full)

    def fetch_version(self, model_id: str, version: str, entry: dict) -> Path:
        """Return the local directory of a published version (no copy is needed)."""
        path = self.version_path(entry)
        if not path.is_dir():
            raise HubError(f"{self.address}: {model_id} {version} is in {INDEX_NAME} but {path} is missing")
        return path
