"""Turn a finished Calibration into artifact tensors and a manifest (without version and files)."""

from __future__ import annotations

from .artifact import layer_tensors
from .calibrate import Calibration
from .manifest import BAND_CONVENTION, inputs_fingerprint, tool_record, utc_now
from .sources import LoadedModel

MANIFEST_SCHEMA_VERSION = 1


def calibration_tensors(calibration: Calibration) -> dict:
    """Return the artifact tensors of every calibrated layer."""
    merged = calibration.merged()
    tensors = {}
    for layer in calibration.model_layers.layers:
        tensors.update(layer_tensors(layer.index, merged[layer.index].means(), layer.rope.omega))
    return tensors


def _common(values):
    values = set(values)
    return values.pop() if len(values) == 1 else None


def geometry_record(calibration: Calibration) -> dict:
    layers = calibration.model_layers.layers
    record = {
        "n_layers": calibration.model_layers.n_layers,
        "calibrated_layers": [layer.index for layer in layers],
        # Top-level values are set only when every calibrated layer agrees; per-layer records rule.
        "n_q_heads": _common(layer.n_q_heads for layer in layers),
        "n_kv_heads": _common(layer.n_kv_heads for layer in layers),
        "head_dim": _common(layer.head_dim for layer in layers),
        "rotary_dims": _common(layer.rope.rotary_dims for layer in layers),
        "layers": [layer.to_json() for layer in layers],
        "skipped_layers": calibration.model_layers.skipped,
    }
    architecture = calibration.model_layers.architecture
    if architecture:
        record["implementation"] = {k: architecture[k] for k in ("model_type", "library", "module") if k in architecture}
    return record


def calibration_settings(calibration: Calibration) -> dict:
    return {
        "sequence_length": calibration.sequence_length,
        "chunk_size": calibration.chunk_size,
        "compute_dtype": calibration.compute_dtype,
    }


def build_manifest(
    loaded: LoadedModel,
    calibration: Calibration,
    corpus_record: dict,
    *,
    blas: dict | None = None,
    convergence: dict | None = None,
) -> dict:
    """Return the manifest of a calibration, ready for a hub to add `artifact_version` and `files`."""
    settings = calibration_settings(calibration)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "model": {
            "id": loaded.model_id,
            "revision": loaded.revision,
            "architecture": loaded.architecture,
            "quantization": loaded.quantization,
            "private": loaded.private,
            "base_model": loaded.base_model,
            "source": loaded.source,
        },
        "geometry": geometry_record(calibration),
        "corpus": corpus_record,
        "calibration": {
            "token_count": calibration.token_count,
            "n_sequences": len(calibration.sequence_stats),
            **settings,
            "band_convention": BAND_CONVENTION,
            "blas": blas or {},
            "seconds": round(calibration.seconds, 3),
        },
        "inputs_sha256": inputs_fingerprint(weights=loaded.weights_fingerprint, corpus=corpus_record, settings=settings),
        "tool": tool_record(),
        "created": utc_now(),
    }
    if convergence is not None:
        manifest["convergence"] = convergence
    return manifest
