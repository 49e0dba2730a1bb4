"""Check a calibration's per-layer geometry against the live model it is about to be used with.

Meant to run at fetch time and before publishing. Omega is measured from the model's own RoPE modules
by rotating basis vectors (rope.measure_rope), not read from a config, so a calibration made
with the wrong rope base, for another model, or with another layer layout is caught.
"""

from __future__ import annotations

import logging

import numpy as np

from .capture import find_attention_layers
from .errors import GeometryMismatchError, ManifestError, RopeError
from .rope import OMEGA_RTOL, check_omega, measure_rope

logger = logging.getLogger(__name__)

GEOMETRY_FIELDS = ("n_q_heads", "n_kv_heads", "head_dim", "rotary_dims")


def _format_indices(indices) -> str:
    return "[" + ", ".join(str(i) for i in sorted(indices)) + "]"


def verify_against_model(layers: dict, model, *, rtol: float = OMEGA_RTOL) -> dict:
    """Raise GeometryMismatchError unless `layers` describes the calibrated layers of `model`.

    `layers` maps each calibrated layer index to a dict with "omega" (array [bands]) and the
    integers "n_q_heads", "n_kv_heads", "head_dim" and "rotary_dims". An optional "layout"
    ("half" or "traditional") is compared too. The set of layer indices must equal the RoPE
    attention layers that `find_attention_layers` finds in the model, every geometry field must
    match, and omega must match the omega measured from the live RoPE module within `rtol`
    relative. Error messages carry both values. Returns a summary with the number of layers
    checked and the largest relative omega difference.
    """
    live = find_attention_layers(model)
    live_by_index = {layer.index: layer for layer in live.layers}
    expected = {int(index): spec for index, spec in layers.items()}

    if set(expected) != set(live_by_index):
        missing = set(live_by_index) - set(expected)
        extra = set(expected) - set(live_by_index)
        raise GeometryMismatchError(
            f"the calibration covers layers {_format_indices(expected)} but the model "
            f"({live.n_layers} layers) has RoPE attention layers {_format_indices(live_by_index)}; "
            f"missing from the calibration: {_format_indices(missing)}, not in the model: "
            f"{_format_indices(extra)}. Use a calibration made for this model"
        )

    measured_cache: dict[tuple, np.ndarray] = {}
    worst = 0.0
    for index in sorted(expected):
        spec = expected[index]
        layer = live_by_index[index]
        live_values = {
            "n_q_heads": layer.n_q_heads,
            "n_kv_heads": layer.n_kv_heads,
            "head_dim": layer.head_dim,
            "rotary_dims": layer.rope.rotary_dims,
        }
        for name in GEOMETRY_FIELDS:
            if name not in spec:
                raise GeometryMismatchError(f"layer {index}: the calibration does not record {name}")
            if int(spec[name]) != live_values[name]:
                raise GeometryMismatchError(
                    f"layer {index}: {name} is {int(spec[name])} in the calibration but "
                    f"{live_values[name]} in the model"
                )
        layout = spec.get("layout")
        if layout is not None and layout != layer.rope.layout:
            raise GeometryMismatchError(
                f"layer {index}: RoPE layout is {layout!r} in the calibration but "
                f"{layer.rope.layout!r} in the model"
            )

        key = (id(layer.rope_module), layer.head_dim)
        if key not in measured_cache:
            measured_cache[key], _ = measure_rope(
                layer.rope_module, layer.head_dim, layer.rope.layout, layer.rope.rotary_dims
            )
        measured = measured_cache[key]
        omega = np.asarray(spec["omega"], dtype=np.float64).reshape(-1)
        try:
            check_omega(measured, omega, what=f"layer {index}, calibration against the omega measured from the model's RoPE", rtol=rtol)
        except RopeError as exc:
            raise GeometryMismatchError(
                f"{exc}. The calibration was made with other RoPE settings or for another model"
            ) from None
        scale = np.maximum(np.abs(measured), 1e-12)
        difference = np.abs(omega - measured)
        relative = np.where(difference <= 1e-9, 0.0, difference / scale)
        worst = max(worst, float(relative.max(initial=0.0)))

    logger.info("calibration geometry matches the model on %d layers (max omega rel. diff %.2e)", len(expected), worst)
    return {"layers_checked": len(expected), "max_omega_relative_difference": worst}


def layers_from_calibration(model_layers) -> dict:
    """Return the `layers` argument of verify_against_model for a ModelLayers of a calibration."""
    return {
        layer.index: {
            "omega": layer.rope.omega,
            "n_q_heads": layer.n_q_heads,
            "n_kv_heads": layer.n_kv_heads,
            "head_dim": layer.head_dim,
            "rotary_dims": layer.rope.rotary_dims,
            "layout": layer.rope.layout,
        }
        for layer in model_layers.layers
    }


def layers_from_artifact(manifest: dict, tensors: dict) -> dict:
    """Return the `layers` argument of verify_against_model for an artifact.

    `manifest` is the artifact's manifest (or its "geometry" section) and `tensors` its
    tensors, which hold omega as `layers.{i}.omega`. Raises ManifestError when a layer's
    omega tensor is missing.
    """
    geometry = manifest.get("geometry", manifest)
    layers = {}
    for record in geometry["layers"]:
        index = int(record["index"])
        name = f"layers.{index}.omega"
        if name not in tensors:
            raise ManifestError(f"tensor {name} is missing for calibrated layer {index}")
        layers[index] = {
            "omega": np.asarray(tensors[name], dtype=np.float64),
            "n_q_heads": record["n_q_heads"],
            "n_kv_heads": record["n_kv_heads"],
            "head_dim": record["head_dim"],
            "rotary_dims": record["rope"]["rotary_dims"],
            "layout": record["rope"].get("layout"),
        }
    return layers
