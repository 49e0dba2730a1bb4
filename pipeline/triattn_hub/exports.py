"""Write a calibration in the formats that existing TriAttention consumers read.

Formats:

native
    calibration.safetensors + manifest.json, as published (see artifact.py).

mlx-vlm
    The file that the TriAttention KV cache of the MLX-VLM pull request 985 reads
    (Blaizzy/mlx-vlm, mlx_vlm/triattention.py, `load_calibration`). It is a safetensors file
    with `layer.{i}.q_center_real`, `layer.{i}.q_center_imag` and `layer.{i}.q_mean_norm`,
    float32 [query heads, rotated dims / 2], for EVERY layer i of the model. Its only metadata
    are the strings `n_layers`, `n_q_heads` and `n_kv_heads`. Query head h belongs to KV head
    h // (n_q_heads / n_kv_heads). The consumer takes one RoPE configuration and one head
    count from the first non-sliding attention layer and applies them to every layer.

    How that consumer pairs RoPE components: it decides from the model's `rope.traditional`
    flag, believing that `traditional=True` means half-split pairs. In MLX it is the other
    way round (`traditional=False` rotates (f, f + d/2), `traditional=True` rotates
    (2f, 2f + 1)). So for a `traditional=False` model, which is nearly every model, it reads
    its band j from components (2j, 2j + 1). Those are the real parts of two different
    frequencies (or the imaginary parts, for the upper half), and it scores them with omega_j.
    For a `traditional=True` model it reads (j, j + d/2), again two frequencies. It splits the
    post-RoPE keys the same way at run time, so no reordering of the statistics can make its
    trigonometric term correct: the keys it pairs do not rotate together. The export therefore
    refuses unless the caller picks one of two explicit pairings:

    - `pairing="rope"`: band j of the file is the model's true band j (the pair RoPE rotates
      at omega_j). Correct for a consumer that pairs components as the model's RoPE does (the
      pull request with its two `traditional` branches swapped); wrong with it as published.
    - `pairing="pr985"`: bug-compatible with the pull request as published. Band j holds the
      mean of the two components the consumer pairs there, which equals what its own
      calibration computes, and `q_mean_norm` holds sqrt(E[a^2] + E[b^2]) of that pair, an
      upper bound of the E|a + ib| its calibration measures (the artifact keeps per-component
      second moments, not the joint distribution of two components from different bands).

    Layers the format cannot represent: layers that were not calibrated (no RoPE attention)
    are zero-filled, as the pull request does. A sliding-window layer whose geometry differs
    from the reference layer (for example Gemma head sizes 256 next to 512, or another RoPE
    base) is zero-filled with a warning: the consumer keeps sliding layers in their rotating
    cache and never scores them. A global layer that differs (head counts, head size, rotated
    dims, layout or omega) cannot be written, and the export raises ExportError. The consumer
    computes omega itself from `nn.RoPE` as base^(-2f/d) / scale, which is wrong when
    scale != 1 (MLX multiplies positions by scale). It reads other RoPE modules only when they
    have both `_freqs` and `rotated_dims` attributes, and rejects the rest. The export warns in
    both cases, because the file cannot fix them.

triattention-npz
    The `.npz` the MLX loader of the TriAttention repository (WeianMao/triattention,
    triattention/mlx/triattention_mlx.py, `load_stats`) reads: arrays
    `l_{L}_h_{H}_q_mean_real`, `l_{L}_h_{H}_q_mean_imag`, `l_{L}_h_{H}_q_abs_mean`, float32
    [head_dim / 2], for layer L and head H. That loader scores the heads of the KV cache, so H
    counts KV heads: each array holds the statistics pooled over the query heads of that KV
    head's group (the mean of their Q-centers and of their E|q|, which is the Q-center and
    E|q| of the group's queries taken together). It inverts RoPE as half-split over the whole
    head with omega_f = rope_theta^(-2f/head_dim), taking head_dim and rope_theta from its
    own configuration, so the export requires the half layout, rotary dims equal to head_dim
    and a plain geometric omega, and stores `rope_theta`, `head_dim`, `n_kv_heads`, `layers`
    and the manifest JSON under keys that loader ignores, so the values to configure it with
    travel with the file. Layers whose geometry differs from the reference layer are left out
    with a warning; that loader scores a layer without statistics by key norm alone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifact import ARTIFACT_NAME, MANIFEST_NAME, load_tensors, verify_artifact
from .errors import ExportError

logger = logging.getLogger(__name__)

NATIVE = "native"
MLX_VLM = "mlx-vlm"
TRIATTENTION_NPZ = "triattention-npz"
FORMATS = (NATIVE, MLX_VLM, TRIATTENTION_NPZ)
PAIRINGS = ("rope", "pr985")
MLX_VLM_FILE = "triattention_calibration.safetensors"
NPZ_FILE = "triattention_stats.npz"
# Relative tolerance for two layers' omega to count as the same RoPE (both are stored float32).
OMEGA_RTOL = 1e-6


@dataclass
class ExportResult:
    """Files written by one export and the warnings about what their consumer will do."""

    format: str
    paths: list[Path]
    warnings: list[str] = field(default_factory=list)


def export_calibration(directory: str | os.PathLike, fmt: str, output: str | os.PathLike, *, pairing: str | None = None) -> ExportResult:
    """Verify the artifact in `directory` and write it in format `fmt` into the directory `output`.

    Raises ExportError when the format cannot hold this calibration correctly (see the module
    docstring), or when `fmt` or `pairing` is not one of FORMATS / PAIRINGS.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    directory, output = Path(directory), Path(output)
    manifest = verify_artifact(directory)
    output.mkdir(parents=True, exist_ok=True)
    if fmt == NATIVE:
        from .client import copy_artifact

        copy_artifact(directory, output)
        return ExportResult(fmt, [output / ARTIFACT_NAME, output / MANIFEST_NAME])
    tensors, _ = load_tensors(directory / ARTIFACT_NAME)
    if fmt == MLX_VLM:
        arrays, metadata, warnings = mlx_vlm_tensors(tensors, manifest, pairing=pairing)
        from safetensors.numpy import save_file

        path = output / MLX_VLM_FILE
        save_file(arrays, str(path), metadata=metadata)
    else:
        arrays, warnings = triattention_npz_arrays(tensors, manifest)
        path = output / NPZ_FILE
        np.savez(path, **arrays)
    for warning in warnings:
        logger.warning("%s export of %s: %s", fmt, manifest["model"]["id"], warning)
    return ExportResult(fmt, [path], warnings)


# Geometry shared by the two consumer formats


def _reference_layer(manifest: dict) -> dict:
    """Return the layer a consumer takes its RoPE and head counts from: the first global one."""
    layers = manifest["geometry"]["layers"]
    return next((layer for layer in layers if layer["type"] == "global"), layers[0])


def _same_geometry(layer: dict, reference: dict, tensors: dict) -> str | None:
    """Return how `layer` differs from `reference` (None when a consumer can treat them alike)."""
    for key in ("n_q_heads", "n_kv_heads", "head_dim"):
        if layer[key] != reference[key]:
            return f"{key} {layer[key]} instead of {reference[key]}"
    for key in ("layout", "rotary_dims"):
        if layer["rope"][key] != reference["rope"][key]:
            return f"RoPE {key} {layer['rope'][key]} instead of {reference['rope'][key]}"
    omega = tensors[f"layers.{layer['index']}.omega"].astype(np.float64)
    expected = tensors[f"layers.{reference['index']}.omega"].astype(np.float64)
    if not np.allclose(omega, expected, rtol=OMEGA_RTOL, atol=0.0):
        return "a different omega (another RoPE base or scaling)"
    return None


def _component_map(layout: str, rotary_dims: int) -> dict[int, tuple[int, str]]:
    """Map each rotated component index of a head vector to (band, "re" or "im")."""
    from .rope import band_indices

    real, imag = band_indices(layout, rotary_dims)
    mapping = {int(c): (f, "re") for f, c in enumerate(real)}
    mapping.update({int(c): (f, "im") for f, c in enumerate(imag)})
    return mapping


# MLX-VLM pull request 985


def pr985_pairs(reference: dict, omega: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the component indices (c1, c2) that the published pull request reads as its bands.

    It reads `traditional=True` models as half-split and `traditional=False` models as
    interleaved, the reverse of MLX. For ProportionalRoPE it first gathers the rotated
    components [0, r/2) and [d/2, d/2 + r/2), r being the rotated dims, then splits that
    portion the same way.
    """
    traditional = reference["rope"]["layout"] == "traditional"
    if reference["rope"]["class"] == "ProportionalRoPE":
        half = reference["head_dim"] // 2
        rotated_half = int(np.count_nonzero(omega > 0))
        portion = np.concatenate([np.arange(rotated_half), half + np.arange(rotated_half)])
    else:
        portion = np.arange(reference["rope"]["rotary_dims"])
    n = portion.size // 2
    if traditional:
        return portion[:n], portion[n:]
    return portion[0::2], portion[1::2]


def _consumer_bands(reference: dict, omega: np.ndarray) -> int:
    if reference["rope"]["class"] == "ProportionalRoPE":
        return int(np.count_nonzero(omega > 0))
    return reference["rope"]["rotary_dims"] // 2


def _component_stats(tensors: dict, index: int, mapping: dict, component: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean, mean square) [heads] of one component of the pre-RoPE query."""
    if component not in mapping:
        raise ExportError(f"layer {index}: component {component} is not rotated, so the artifact contains no statistics for it")
    band, part = mapping[component]
    mean = tensors[f"layers.{index}.q_mean_{'real' if part == 're' else 'imag'}"][:, band]
    square = tensors[f"layers.{index}.q_{'real' if part == 're' else 'imag'}_sq_mean"][:, band]
    return mean.astype(np.float64), square.astype(np.float64)


def _layer_pr985(tensors: dict, layer: dict, pairs: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    index = layer["index"]
    mapping = _component_map(layer["rope"]["layout"], layer["rope"]["rotary_dims"])
    real, imag, norm = [], [], []
    for c1, c2 in zip(*pairs):
        mean1, square1 = _component_stats(tensors, index, mapping, int(c1))
        mean2, square2 = _component_stats(tensors, index, mapping, int(c2))
        (band1, part1), (band2, part2) = mapping[int(c1)], mapping[int(c2)]
        real.append(mean1)
        imag.append(mean2)
        if band1 == band2 and (part1, part2) == ("re", "im"):
            norm.append(tensors[f"layers.{index}.q_abs_mean"][:, band1].astype(np.float64))
        else:
            norm.append(np.sqrt(square1 + square2))
    return tuple(np.stack(values, axis=1).astype(np.float32) for values in (real, imag, norm))


def _layer_rope(tensors: dict, layer: dict, n_bands: int) -> tuple[np.ndarray, ...]:
    index = layer["index"]
    return tuple(
        np.ascontiguousarray(tensors[f"layers.{index}.{name}"][:, :n_bands], dtype=np.float32)
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean")
    )


def mlx_vlm_tensors(tensors: dict, manifest: dict, *, pairing: str | None) -> tuple[dict, dict, list[str]]:
    """Return (tensors, metadata, warnings) of the MLX-VLM pull request 985 calibration file."""
    if pairing not in PAIRINGS:
        raise ExportError(
            "the MLX-VLM TriAttention consumer (pull request 985) pairs RoPE components from the "
            "model's `traditional` flag read the wrong way round, so its scores mix two frequencies in "
            "every band whatever the file holds; choose pairing 'rope' (true bands, correct for a consumer "
            "that pairs as the model's RoPE does) or 'pr985' (what the published pull request computes)"
        )

    geometry = manifest["geometry"]
    reference = _reference_layer(manifest)
    n_q, n_kv = reference["n_q_heads"], reference["n_kv_heads"]
    if n_q % n_kv:
        raise ExportError(f"{n_q} query heads do not split evenly over {n_kv} KV heads; the format cannot group them")
    omega = tensors[f"layers.{reference['index']}.omega"].astype(np.float64)
    n_bands = _consumer_bands(reference, omega)
    pairs = pr985_pairs(reference, omega) if pairing == "pr985" else None

    warnings = []
    rope = reference["rope"]
    scale = rope.get("settings", {}).get("scale", 1.0)
    if rope["class"] == "RoPE" and scale not in (None, 1, 1.0):
        warnings.append(
            f"the consumer computes omega as base^(-2f/d) / scale but MLX multiplies positions by scale={scale}, "
            "so its omega is off by a factor scale^2; the file cannot correct that"
        )
    if rope["class"] != "RoPE":
        # NOTE: the ProportionalRoPE of mlx-lm 0.32.2 and mlx-vlm 0.7.10 has `_freqs` but no
        # `rotated_dims`, so whether the consumer accepts it depends on the mlx-vlm version.
        warnings.append(
            f"the consumer reads omega from {rope['class']} only if the module has `_freqs` and "
            "`rotated_dims` attributes, and rejects the model otherwise"
        )

    layers = {layer["index"]: layer for layer in geometry["layers"]}
    zeros = np.zeros((n_q, n_bands), dtype=np.float32)
    out = {}
    zero_filled = []
    for i in range(geometry["n_layers"]):
        layer = layers.get(i)
        difference = _same_geometry(layer, reference, tensors) if layer is not None else "not calibrated"
        if difference is None:
            values = _layer_pr985(tensors, layer, pairs) if pairs is not None else _layer_rope(tensors, layer, n_bands)
        elif layer is None or layer["type"] == "sliding":
            zero_filled.append(f"{i} ({difference})")
            values = (zeros, zeros, zeros)
        else:
            raise ExportError(
                f"global attention layer {i} differs from layer {reference['index']}: {difference}. "
                "The MLX-VLM format has one geometry for all layers, so it cannot represent this model"
            )
        for name, value in zip(("q_center_real", "q_center_imag", "q_mean_norm"), values):
            out[f"layer.{i}.{name}"] = np.ascontiguousarray(value, dtype=np.float32)

    if zero_filled:
        warnings.append(
            "zero-filled layers (sliding layers the consumer does not score, or layers without RoPE "
            f"attention): {', '.join(zero_filled)}"
        )
    metadata = {"n_layers": str(geometry["n_layers"]), "n_q_heads": str(n_q), "n_kv_heads": str(n_kv)}
    return out, metadata, warnings


# TriAttention repository, MLX loader


def plain_rope_theta(omega: np.ndarray, head_dim: int, declared: float | None = None) -> float | None:
    """Return theta when omega_f = theta^(-2f/head_dim) for every band, else None.

    `declared` (the rope base the manifest records) is returned when it fits, because theta
    recomputed from float32 omega is off in its last digits (100000.124 for 1e5).
    """
    omega = np.asarray(omega, dtype=np.float64)
    if omega.size < 2 or not np.all(omega > 0) or abs(omega[0] - 1.0) > 1e-6:
        return None
    theta = float(declared) if declared else float(omega[1] ** (-head_dim / 2.0))
    expected = theta ** (-2.0 * np.arange(omega.size) / head_dim)
    if not np.allclose(omega, expected, rtol=1e-5, atol=0.0):
        return None
    return theta


def triattention_npz_arrays(tensors: dict, manifest: dict) -> tuple[dict, list[str]]:
    """Return (arrays, warnings) of the TriAttention MLX loader's `.npz` file."""
    reference = _reference_layer(manifest)
    rope = reference["rope"]
    head_dim = reference["head_dim"]
    if rope["layout"] != "half":
        raise ExportError(
            "the TriAttention MLX loader inverts RoPE as half-split pairs (f, f + d/2), but this model "
            "rotates traditional pairs (2f, 2f + 1); the format cannot represent it"
        )
    if rope["rotary_dims"] != head_dim:
        raise ExportError(
            f"the TriAttention MLX loader rotates the whole head ({head_dim} dims), but this model rotates "
            f"{rope['rotary_dims']}; the format cannot represent partial rotary embeddings"
        )

    omega = tensors[f"layers.{reference['index']}.omega"].astype(np.float64)
    theta = plain_rope_theta(omega, head_dim, rope.get("settings", {}).get("base")) or plain_rope_theta(omega, head_dim)
    if theta is None:
        raise ExportError(
            "the TriAttention MLX loader builds omega as rope_theta^(-2f/head_dim), but this model's RoPE "
            f"({rope['class']}) uses scaled or non-geometric frequencies; the format cannot represent them"
        )
    n_q, n_kv = reference["n_q_heads"], reference["n_kv_heads"]
    if n_q % n_kv:
        raise ExportError(f"{n_q} query heads do not split evenly over {n_kv} KV heads; the format cannot group them")
    group = n_q // n_kv

    arrays, written, left_out = {}, [], []
    for layer in manifest["geometry"]["layers"]:
        difference = _same_geometry(layer, reference, tensors)
        if difference is not None:
            left_out.append(f"{layer['index']} ({difference})")
            continue
        index = layer["index"]
        stats = {
            name: tensors[f"layers.{index}.{name}"].astype(np.float64).reshape(n_kv, group, -1).mean(axis=1)
            for name in ("q_mean_real", "q_mean_imag", "q_abs_mean")
        }
        for head in range(n_kv):
            for name, values in stats.items():
                arrays[f"l_{index}_h_{head}_{name}"] = values[head].astype(np.float32)
        written.append(index)

    warnings = [
        f"configure the loader with head_dim={head_dim} and rope_theta={theta:.10g}; it does not read them from the file"
    ]
    if left_out:
        warnings.append(f"layers left out (the loader scores them by key norm only): {', '.join(left_out)}")
    arrays["rope_theta"] = np.array(theta, dtype=np.float64)
    arrays["head_dim"] = np.array(head_dim, dtype=np.int64)
    arrays["n_kv_heads"] = np.array(n_kv, dtype=np.int64)
    arrays["layers"] = np.array(written, dtype=np.int64)
    arrays["triattn_hub_manifest"] = np.array(json.dumps(manifest, sort_keys=True))
    return arrays, warnings
