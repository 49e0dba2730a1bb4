"""Resolve and fetch calibrations by model id.

This is the light path: it imports neither mlx, prefect nor datasets, so `triattn-hub fetch`
starts quickly and works where mlx is not installed.

Search: hubs are tried in order (`--hub`, else $TRIATTN_HUB, else the local default hub then
hub.PUBLIC_HUB). A hub without the model id is skipped. Any other failure of a hub (access
denied, offline with nothing cached, a broken index) stops the search, so that a private hub
listed first is never silently passed over. Model ids are matched in full.

Base-model fallback: when no hub has the id, the model's config.json and README.md may declare
a base model. They are read from `model_path`, else from the model's own Hub repo. The base
model's calibration is used only after its layers, heads, head size, rotated dims and omega
match (base_model.py), and with a warning.

Lockfile: `lock` names a JSON file recording, per requested model id, the hub, commit,
version, calibrated model id and artifact sha256. When it has an entry for the model, fetch
reads exactly that hub at that commit and checks the sha256; otherwise it resolves normally
and adds the entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .artifact import _umask, ARTIFACT_NAME, MANIFEST_NAME, verify_artifact
from .errors import AccessDeniedError, CalibrationNotFoundError, HubError, IntegrityError, ModelSourceError, OfflineError
from .hub import hub_addresses, is_remote
from .index import resolve

logger = logging.getLogger(__name__)

LOCK_FORMAT = "triattn-hub-lock"
LOCK_FORMAT_VERSION = 1


@dataclass
class Resolved:
    """A fetched, verified calibration.

    `model_id` is the id the calibration was computed for; it differs from `requested_id` when
    the base-model fallback was used. `commit` is the hub commit read (None for local hubs).
    """

    model_id: str
    version: str
    hub: str
    directory: Path
    manifest: dict
    requested_id: str | None = None
    commit: str | None = None
    via_base_model: bool = False
    warnings: list[str] = field(default_factory=list)
    exported: list[Path] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.directory / ARTIFACT_NAME


def open_hub(address: str, *, token=None, endpoint=None, cache_dir=None):
    """Return the hub backend for an address (LocalHub, or HfHub using `cache_dir`)."""
    if is_remote(address):
        from .hub_hf import HfHub

        return HfHub.from_address(address, token=token, endpoint=endpoint, cache_dir=cache_dir)
    from .hub_local import LocalHub

    return LocalHub(address)


def fetch(
    model_id: str,
    *,
    version: str | None = None,
    hubs: list[str] | None = None,
    output: str | os.PathLike | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    lock: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    export_format: str = "native",
    pairing: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Resolved:
    """Find `model_id` in the first hub that has it, verify it, and return where it is.

    Before returning, the artifact's sha256 and size and its manifest are checked. With
    `output`, the calibration is written into that directory in `export_format` (see
    exports.py; `pairing` applies to the mlx-vlm format). Raises CalibrationNotFoundError
    (naming every hub searched and the closest ids), AccessDeniedError, OfflineError,
    IntegrityError, GeometryMismatchError, ExportError, ManifestError or HubError.
    """
    from .exports import NATIVE, export_calibration

    if export_format != NATIVE and output is None:
        raise HubError(f"export format {export_format!r} needs an output directory (--output DIR)")
    locked = read_lock(lock, model_id) if lock is not None else None
    if locked is not None:
        if version is not None and version != locked["version"]:
            raise HubError(
                f"{lock} pins {model_id} to {locked['version']}, but version {version} was requested; "
                "remove the entry from the lockfile to re-resolve"
            )
        resolved = _fetch_locked(model_id, locked, token=token, endpoint=endpoint, cache_dir=cache_dir)
    else:
        resolved = _search(model_id, version, hub_addresses(hubs), token=token, endpoint=endpoint, model_path=model_path, cache_dir=cache_dir)
        if lock is not None:
            write_lock(lock, model_id, resolved)
    convergence = resolved.manifest.get("convergence", {})
    if convergence.get("published_unconverged"):
        message = (
            f"{resolved.model_id} {resolved.version} failed the convergence gate and was published anyway; "
            "its Q-centers may be noisy (see `triattn-hub report`)"
        )
        logger.warning(message)
        resolved.warnings.append(message)
    if output is not None:
        result = export_calibration(resolved.directory, export_format, output, pairing=pairing)
        resolved.exported = result.paths
        resolved.warnings.extend(result.warnings)
        if export_format == NATIVE:
            resolved.directory = Path(output)
    return resolved


def _verified(hub, address: str, model_id: str, chosen: str, entry: dict) -> tuple[Path, dict]:
    directory = hub.fetch_version(model_id, chosen, entry)
    manifest = verify_artifact(directory)
    if manifest["files"] != entry["files"]:
        raise IntegrityError(f"{address}: {model_id} {chosen}: files differ from the index entry")
    if manifest["model"]["id"] != model_id or manifest["artifact_version"] != chosen:
        raise IntegrityError(
            f"{address}: {entry['path']} contains {manifest['model']['id']} {manifest['artifact_version']}, "
            f"the index says {model_id} {chosen}"
        )
    return directory, manifest


def _search(model_id, version, addresses, *, token, endpoint, model_path, cache_dir) -> Resolved:
    indexes, misses = [], []
    for address in addresses:
        if not is_remote(address) and not Path(address).expanduser().is_dir():
            misses.append(f"hub directory {address} does not exist")
            continue
        hub = open_hub(address, token=token, endpoint=endpoint, cache_dir=cache_dir)
        index = hub.read_index()
        indexes.append((address, hub, index))
        try:
            chosen, entry = resolve(index, model_id, version, address)
        except CalibrationNotFoundError as exc:
            misses.append(str(exc))
            continue
        directory, manifest = _verified(hub, address, model_id, chosen, entry)
        logger.info("resolved %s %s from %s", model_id, chosen, address)
        return Resolved(model_id, chosen, address, directory, manifest, model_id, getattr(hub, "commit", None))
    if not addresses:
        raise CalibrationNotFoundError(f"no hubs to search for {model_id!r}")
    if model_path is None and endpoint is None and not any(is_remote(a) for a in addresses):
        # Only local hubs were searched: reading the model's card from the Hub would be the
        # only network access of this fetch, so it takes an explicit --model-path or --endpoint.
        raise CalibrationNotFoundError(
            "; ".join(misses) + "; to fall back to a base model, pass --model-path DIR (or --endpoint URL) "
            "so its config can be read"
        )
    return _base_model_fallback(model_id, version, indexes, misses, token=token, endpoint=endpoint, model_path=model_path, cache_dir=cache_dir)


def _base_model_fallback(model_id, version, indexes, misses, *, token, endpoint, model_path, cache_dir) -> Resolved:
    from .artifact import load_tensors
    from .base_model import check_entry_geometry, check_omega, declared_base_model, read_model_files

    searched = "; ".join(misses)
    try:
        config, readme = read_model_files(model_id, model_path=model_path, endpoint=endpoint, token=token, cache_dir=cache_dir)
    except AccessDeniedError:
        raise
    except (ModelSourceError, OfflineError, HubError) as exc:
        raise CalibrationNotFoundError(f"{searched}; its config could not be read to look for a base model: {exc}") from None
    base_id = declared_base_model(config, readme)
    if base_id is None or base_id == model_id:
        raise CalibrationNotFoundError(f"{searched}; the model declares no base model to fall back to")
    for address, hub, index in indexes:
        try:
            chosen, entry = resolve(index, base_id, version, address)
        except CalibrationNotFoundError:
            continue
        check_entry_geometry(config, entry, model_id=model_id, base_id=base_id)
        directory, manifest = _verified(hub, address, base_id, chosen, entry)
        tensors, _ = load_tensors(directory / ARTIFACT_NAME)
        check_omega(config, manifest, tensors, model_id=model_id, base_id=base_id)
        warning = (
            f"no calibration for {model_id}; using {base_id} {chosen} from {address}, the base model it declares, "
            "after checking layers, heads, head size, rotated dims and omega"
        )
        logger.warning("%s", warning)
        return Resolved(base_id, chosen, address, directory, manifest, model_id, getattr(hub, "commit", None), True, [warning])
    raise CalibrationNotFoundError(f"{searched}; its base model {base_id} has no calibration in these hubs either")


# Lockfile


def read_lock(lock: str | os.PathLike, model_id: str) -> dict | None:
    """Return the lockfile entry of `model_id`, or None when the file or the entry is absent."""
    path = Path(lock)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HubError(f"lockfile {path} is not valid JSON: {exc}; fix or delete it") from None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT:
        raise HubError(f"{path} is not a triattn-hub lockfile")
    if data.get("format_version", 0) > LOCK_FORMAT_VERSION:
        raise HubError(f"lockfile {path} has format_version {data['format_version']}; upgrade triattn-hub")
    return data.get("calibrations", {}).get(model_id)


def write_lock(lock: str | os.PathLike, requested_id: str, resolved: Resolved) -> None:
    """Add or replace the entry of `requested_id` in the lockfile, atomically."""
    path = Path(lock)
    data = {"format": LOCK_FORMAT, "format_version": LOCK_FORMAT_VERSION, "calibrations": {}}
    if path.exists():
        read_lock(path, requested_id)
        data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("calibrations", {})[requested_id] = {
        "hub": resolved.hub,
        "commit": resolved.commit,
        "model_id": resolved.model_id,
        "version": resolved.version,
        "sha256": resolved.manifest["files"][ARTIFACT_NAME]["sha256"],
        "via_base_model": resolved.via_base_model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("locked %s to %s %s at %s in %s", requested_id, resolved.model_id, resolved.version, resolved.hub, path)


def _fetch_locked(requested_id: str, locked: dict, *, token, endpoint, cache_dir) -> Resolved:
    address, model_id, version = locked["hub"], locked["model_id"], locked["version"]
    hub = open_hub(address, token=token, endpoint=endpoint, cache_dir=cache_dir)
    index = hub.read_index(locked["commit"]) if locked.get("commit") else hub.read_index()
    chosen, entry = resolve(index, model_id, version, address)
    if entry["files"][ARTIFACT_NAME]["sha256"] != locked["sha256"]:
        raise IntegrityError(
            f"{address}: {model_id} {version} has sha256 {entry['files'][ARTIFACT_NAME]['sha256']}, "
            f"the lockfile records {locked['sha256']}"
        )
    directory, manifest = _verified(hub, address, model_id, chosen, entry)
    logger.info("fetched %s %s from %s as the lockfile records", model_id, version, address)
    warnings = []
    if locked.get("via_base_model"):
        warnings.append(f"the lockfile resolves {requested_id} to the calibration of its base model {model_id}")
    return Resolved(model_id, chosen, address, directory, manifest, requested_id, getattr(hub, "commit", None), bool(locked.get("via_base_model")), warnings)


def copy_artifact(source: Path, target: Path) -> Path:
    """Copy an artifact's two files into `target` atomically (file by file) and return `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in (ARTIFACT_NAME, MANIFEST_NAME):
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        os.close(fd)
        try:
            shutil.copyfile(source / name, tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it owner-only
            os.replace(tmp, target / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return target


def check_against_model(resolved: Resolved, source: str) -> dict:
    """Check a fetched calibration against the live model it is meant for, and return the report.

    Loads the model from `source` (a model directory, a .gguf file or `package:NAME`), measures
    each layer's omega by rotating basis vectors through its live RoPE module, and compares
    omega, head counts and head sizes with the artifact. Raises GeometryMismatchError with both
    values on any difference. This imports mlx, so it runs only when asked for.
    """
    from .blas import enable_fast_cpu_blas

    enable_fast_cpu_blas()
    from .artifact import load_tensors
    from .model_check import layers_from_artifact, verify_against_model
    from .sources import load_model

    loaded = load_model(resolved.model_id, source=source, compute_dtype=None)
    tensors, _ = load_tensors(resolved.path)
    return verify_against_model(layers_from_artifact(resolved.manifest, tensors), loaded.model)
