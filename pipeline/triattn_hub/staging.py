"""Unpublished calibrations: a directory with the tensors and the manifest a hub publishes later.

`calibrate --output DIR` and the GitHub Actions calibration jobs write one of these instead of
publishing, so the job that computes holds no Hub token and a later job publishes. Layout:

  calibration.safetensors    the artifact tensors (no embedded manifest yet)
  unpublished.json           the manifest without `artifact_version` and `files`

The directory appears under its final name only once both files are complete, so an existing
directory is a finished calibration.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ManifestError

TENSORS_NAME = "calibration.safetensors"
MANIFEST_NAME = "unpublished.json"


def is_complete(directory: str | os.PathLike) -> bool:
    """Return True if `directory` holds a complete unpublished calibration."""
    directory = Path(directory)
    return (directory / TENSORS_NAME).is_file() and (directory / MANIFEST_NAME).is_file()


def write_unpublished(directory: str | os.PathLike, tensors: dict, manifest: dict) -> Path:
    """Write tensors and manifest into `directory`, which must not exist yet; return its path.

    Files are written into a sibling temporary directory that is renamed into place.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; remove it or pass another output directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save_file(tensors, str(staging / TENSORS_NAME))
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_unpublished(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Return (tensors, manifest) of an unpublished calibration directory."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not is_complete(directory):
        raise ManifestError(
            f"{directory} is not an unpublished calibration: it needs {TENSORS_NAME} and {MANIFEST_NAME}, "
            "as `triattn-hub calibrate --output` writes them"
        )
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{directory / MANIFEST_NAME} is not valid JSON: {exc}") from None
    return load_file(str(directory / TENSORS_NAME)), manifest
