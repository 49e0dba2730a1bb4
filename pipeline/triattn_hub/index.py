"""The hub index: index.json at a hub's root, listing every model and its versions.

Layout of a hub (a local directory or a Hugging Face dataset repo):
  index.json
  README.md                                   dataset card
  models/{model_id}/{version}/calibration.safetensors
  models/{model_id}/{version}/manifest.json
Versions are named v1, v2, ... per model, are immutable once published, and stay listed.
"""

from __future__ import annotations

import copy
import difflib

from .errors import CalibrationNotFoundError, HubError
from .manifest import utc_now

INDEX_NAME = "index.json"
INDEX_FORMAT = "triattn-hub-index"
INDEX_FORMAT_VERSION = 1


def empty_index() -> dict:
    return {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "updated": None, "models": {}}


def check_index(index: dict, where: str) -> dict:
    """Return `index` if it is a triattn-hub index this version can read; raise HubError if not."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise HubError(f"{where}: {INDEX_NAME} is not a triattn-hub index")
    if index.get("format_version", 0) > INDEX_FORMAT_VERSION:
        raise HubError(
            f"{where}: index format_version {index['format_version']} is newer than this client "
            f"supports ({INDEX_FORMAT_VERSION}); upgrade triattn-hub"
        )
    return index


def version_dir(model_id: str, version: str) -> str:
    """Return the hub-relative directory of one version, with forward slashes."""
    return f"models/{model_id}/{version}"


def find_by_inputs(index: dict, model_id: str, inputs_sha256: str) -> str | None:
    """Return the version of `model_id` calibrated from exactly these inputs, if any."""
    versions = index["models"].get(model_id, {}).get("versions", {})
    for version, entry in versions.items():
        if entry.get("inputs_sha256") == inputs_sha256:
            return version
    return None


def next_version(index: dict, model_id: str) -> str:
    versions = index["models"].get(model_id, {}).get("versions", {})
    numbers = [int(v[1:]) for v in versions if v[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1}"


def version_entry(manifest: dict) -> dict:
    """Return the index entry that summarises one published artifact."""
    geometry = manifest["geometry"]
    return {
        "path": version_dir(manifest["model"]["id"], manifest["artifact_version"]),
        "created": manifest["created"],
        "inputs_sha256": manifest["inputs_sha256"],
        "files": manifest["files"],
        "revision": manifest["model"].get("revision"),
        "architecture": manifest["model"]["architecture"],
        "private": manifest["model"]["private"],
        "base_model": manifest["model"].get("base_model"),
        "corpus": {k: manifest["corpus"].get(k) for k in ("kind", "version", "token_count", "token_ids_sha256")},
        "calibrator_version": manifest["tool"]["calibrator_version"],
        "tool_version": manifest["tool"]["version"],
        "token_count": manifest["calibration"]["token_count"],
        "convergence": manifest.get("convergence", {}).get("verdict", "unchecked"),
        "geometry": {
            "n_layers": geometry["n_layers"],
            "calibrated_layers": geometry["calibrated_layers"],
            "layers": [
                {"index": l["index"], "n_q_heads": l["n_q_heads"], "n_kv_heads": l["n_kv_heads"], "head_dim": l["head_dim"], "rotary_dims": l["rope"]["rotary_dims"]}
                for l in geometry["layers"]
            ],
        },
    }


def add_version(index: dict, manifest: dict) -> dict:
    """Return a copy of `index` with the manifest's version added and marked latest.

    Raises HubError if that version number is already taken by other inputs, since published
    versions are immutable.
    """
    model_id = manifest["model"]["id"]
    version = manifest["artifact_version"]
    updated = copy.deepcopy(index)
    model = updated["models"].setdefault(model_id, {"latest": None, "versions": {}})
    existing = model["versions"].get(version)
    if existing is not None and existing["inputs_sha256"] != manifest["inputs_sha256"]:
        raise HubError(f"{model_id} {version} is already published from other inputs; versions are immutable")
    model["versions"][version] = version_entry(manifest)
    model["latest"] = max(model["versions"], key=lambda v: int(v[1:]))
    updated["updated"] = utc_now()
    return updated


def merge_indexes(ours: dict, theirs: dict) -> dict:
    """Return `theirs` (a newer remote index) with every version of `ours` it lacks added."""
    merged = copy.deepcopy(theirs)
    for model_id, model in ours["models"].items():
        target = merged["models"].setdefault(model_id, {"latest": None, "versions": {}})
        for version, entry in model["versions"].items():
            target["versions"].setdefault(version, entry)
        target["latest"] = max(target["versions"], key=lambda v: int(v[1:]))
    return merged


def resolve(index: dict, model_id: str, version: str | None, where: str) -> tuple[str, dict]:
    """Return (version, entry) for a model id matched in full, the latest unless `version` is set.

    Raises CalibrationNotFoundError naming the hub and the closest calibrated ids.
    """
    model = index["models"].get(model_id)
    if model is None:
        close = difflib.get_close_matches(model_id, list(index["models"]), n=3, cutoff=0.5)
        hint = f"; closest calibrated ids: {', '.join(close)}" if close else ""
        raise CalibrationNotFoundError(f"no calibration for {model_id!r} in {where}{hint}")
    chosen = version or model["latest"]
    if chosen not in model["versions"]:
        raise CalibrationNotFoundError(
            f"{model_id!r} has no version {chosen!r} in {where}; available: {', '.join(sorted(model['versions']))}"
        )
    return chosen, model["versions"][chosen]
