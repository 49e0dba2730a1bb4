"""The calibration artifact: calibration.safetensors plus manifest.json in one directory.

Tensors, for each calibrated layer i (layers without RoPE attention are absent, not zeros):
  layers.{i}.q_mean_real, layers.{i}.q_mean_imag   float32 [query heads, bands]  Q-center E[z_f]
  layers.{i}.q_abs_mean                             float32 [query heads, bands]  E|z_f|
  layers.{i}.omega                                  float32 [bands]               rad / position
  layers.{i}.q_real_sq_mean, .q_imag_sq_mean, .q_abs_sq_mean
                                                    float64 [query heads, bands]  second moments
The safetensors metadata contains the manifest without its `files` section under the key
`triattn_hub.manifest`, so the file describes itself; manifest.json adds the sha256 and size
of the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import IntegrityError, ManifestError
from .manifest import validate

ARTIFACT_NAME = "calibration.safetensors"
MANIFEST_NAME = "manifest.json"
METADATA_KEY = "triattn_hub.manifest"
FLOAT32_TENSORS = ("q_mean_real", "q_mean_imag", "q_abs_mean")
FLOAT64_TENSORS = ("q_real_sq_mean", "q_imag_sq_mean", "q_abs_sq_mean")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def layer_tensors(index: int, moments: dict, omega: np.ndarray) -> dict[str, np.ndarray]:
    """Return the artifact tensors of one layer from its moments ([heads, bands]) and omega."""
    tensors = {f"layers.{index}.{name}": np.ascontiguousarray(moments[name], dtype=np.float32) for name in FLOAT32_TENSORS}
    tensors.update({f"layers.{index}.{name}": np.ascontiguousarray(moments[name], dtype=np.float64) for name in FLOAT64_TENSORS})
    tensors[f"layers.{index}.omega"] = np.ascontiguousarray(omega, dtype=np.float32)
    return tensors


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file owner-only; give it the usual mode, so a shared hub is readable.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_artifact(directory: str | os.PathLike, tensors: dict[str, np.ndarray], manifest: dict) -> dict:
    """Write calibration.safetensors and manifest.json into `directory` and return the manifest.

    The returned manifest carries the `files` section. It is validated before anything is
    written; each file appears under its final name only once it is complete.
    """
    from safetensors.numpy import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    embedded = {k: v for k, v in manifest.items() if k != "files"}
    validate({**embedded, "files": {ARTIFACT_NAME: {"sha256": "0" * 64, "size": 0}}})
    check_tensors(tensors, embedded)
    data = save(tensors, metadata={METADATA_KEY: json.dumps(embedded, sort_keys=True)})
    _atomic_write_bytes(directory / ARTIFACT_NAME, data)
    full = {**embedded, "files": {ARTIFACT_NAME: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}}
    validate(full)
    _atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(full, indent=2, sort_keys=True) + "\n").encode())
    return full


def check_tensors(tensors: dict[str, np.ndarray], manifest: dict) -> None:
    """Raise ManifestError unless the tensors match the layers and shapes the manifest declares."""
    expected = set()
    for layer in manifest["geometry"]["layers"]:
        i, heads, bands = layer["index"], layer["n_q_heads"], layer["rope"]["bands"]
        for name in FLOAT32_TENSORS + FLOAT64_TENSORS:
            key = f"layers.{i}.{name}"
            expected.add(key)
            if key not in tensors:
                raise ManifestError(f"tensor {key} is missing for calibrated layer {i}")
            if tuple(tensors[key].shape) != (heads, bands):
                raise ManifestError(f"tensor {key} has shape {tuple(tensors[key].shape)}, but the manifest declares ({heads}, {bands})")
        key = f"layers.{i}.omega"
        expected.add(key)
        if key not in tensors or tuple(tensors[key].shape) != (bands,):
            raise ManifestError(f"tensor {key} is missing or not of shape ({bands},)")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ManifestError(f"tensors not declared by the manifest: {extra[:5]}")


def read_manifest(directory: str | os.PathLike) -> dict:
    """Return the validated manifest.json of an artifact directory."""
    path = Path(directory) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} is missing; this is not a calibration artifact directory") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    return validate(manifest)


def verify_artifact(directory: str | os.PathLike) -> dict:
    """Check an artifact directory and return its manifest.

    Checks the manifest against the schema, every listed file's size and sha256, and that the
    manifest embedded in the safetensors metadata equals manifest.json without `files`.
    Raises IntegrityError or ManifestError naming the file and both values.
    """
    from safetensors import safe_open

    directory = Path(directory)
    manifest = read_manifest(directory)
    for name, record in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != record["size"]:
            raise IntegrityError(f"{path}: size {size} bytes, but the manifest records {record['size']}; delete the copy and fetch it again")
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise IntegrityError(f"{path}: sha256 {digest}, but the manifest records {record['sha256']}; delete the copy and fetch it again")
    with safe_open(str(directory / ARTIFACT_NAME), framework="numpy") as handle:
        embedded = json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
    if embedded != {k: v for k, v in manifest.items() if k != "files"}:
        raise IntegrityError(f"{directory / ARTIFACT_NAME}: the embedded manifest differs from {MANIFEST_NAME}")
    return manifest


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Return the tensors of a calibration.safetensors file and its embedded manifest."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if METADATA_KEY not in metadata:
        raise ManifestError(f"{path} has no {METADATA_KEY} metadata; it was not written by triattn-hub")
    return tensors, json.loads(metadata[METADATA_KEY])
