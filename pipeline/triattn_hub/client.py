"""Resolve and fetch calibrations by model id.

This is the light path: it imports neither mlx, prefect nor datasets, so `triattn-hub fetch`
starts quickly and works where mlx is not installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .artifact import ARTIFACT_NAME, MANIFEST_NAME, verify_artifact
from .errors import CalibrationNotFoundError, IntegrityError
from .hub import hub_addresses, open_hub
from .index import resolve

logger = logging.getLogger(__name__)


@dataclass
class Resolved:
    """A fetched, verified calibration."""

    model_id: str
    version: str
    hub: str
    directory: Path
    manifest: dict

    @property
    def path(self) -> Path:
        return self.directory / ARTIFACT_NAME


def fetch(
    model_id: str,
    *,
    version: str | None = None,
    hubs: list[str] | None = None,
    output: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Resolved:
    """Find `model_id` in the first hub that has it, verify it, and return where it is.

    The model id is matched in full. Before returning, the artifact's sha256 and size and its
    manifest are checked. With `output`, calibration.safetensors and manifest.json are copied
    into that directory. Raises CalibrationNotFoundError (naming every hub searched and the
    closest ids), IntegrityError, ManifestError, or a HubError subclass.
    """
    addresses = hub_addresses(hubs)
    misses = []
    for address in addresses:
        hub = open_hub(address, token=token, endpoint=endpoint)
        index = hub.read_index()
        try:
            chosen, entry = resolve(index, model_id, version, address)
        except CalibrationNotFoundError as exc:
            misses.append(str(exc))
            continue
        directory = hub.fetch_version(model_id, chosen, entry)
        manifest = verify_artifact(directory)
        if manifest["files"] != entry["files"]:
            raise IntegrityError(f"{address}: {model_id} {chosen}: files differ from the index entry")
        if output is not None:
            directory = copy_artifact(directory, Path(output))
        logger.info("resolved %s %s from %s", model_id, chosen, address)
        return Resolved(model_id, chosen, address, directory, manifest)
    raise CalibrationNotFoundError("; ".join(misses) if misses else f"no hubs to search for {model_id!r}")


def copy_artifact(source: Path, target: Path) -> Path:
    """Copy an artifact's two files into `target` atomically (file by file) and return `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (ARTIFACT_NAME, MANIFEST_NAME):
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        os.close(fd)
        try:
            shutil.copyfile(source / name, tmp)
            os.replace(tmp, target / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target
