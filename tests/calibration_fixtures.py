"""Hand-built calibrations (tensors + manifest valid against the schema) for hub and export tests.

The statistics come from a seeded random query distribution, so they are consistent with one
another (E|z| >= |E z|, second moments >= squared means), but no model is run.
"""

from __future__ import annotations

import hashlib

import numpy as np

from triattn_hub.artifact import layer_tensors
from triattn_hub.manifest import tool_record, utc_now


def plain_omega(base: float, rotary_dims: int) -> np.ndarray:
    return base ** (-np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)


def sample_moments(heads: int, bands: int, rng: np.random.Generator, samples: int = 64) -> dict:
    """Return the six per-band moments of `samples` random complex queries per head."""
    center = rng.normal(size=(heads, bands)) + 1j * rng.normal(size=(heads, bands))
    z = center[None] + 0.5 * (rng.normal(size=(samples, heads, bands)) + 1j * rng.normal(size=(samples, heads, bands)))
    return {
        "q_mean_real": z.real.mean(0),
        "q_mean_imag": z.imag.mean(0),
        "q_abs_mean": np.abs(z).mean(0),
        "q_real_sq_mean": (z.real**2).mean(0),
        "q_imag_sq_mean": (z.imag**2).mean(0),
        "q_abs_sq_mean": (np.abs(z) ** 2).mean(0),
    }


def layer_record(index, *, heads, kv_heads, head_dim, rotary_dims, layout, base, kind="global", rope_class="RoPE", scale=1.0):
    return {
        "index": index,
        "type": kind,
        "window": 512 if kind == "sliding" else None,
        "n_q_heads": heads,
        "n_kv_heads": kv_heads,
        "head_dim": head_dim,
        "q_norm": False,
        "rope": {
            "class": rope_class,
            "layout": layout,
            "head_dim": head_dim,
            "rotary_dims": rotary_dims,
            "bands": rotary_dims // 2,
            "input_scale": 1.0,
            "settings": {"dims": rotary_dims, "traditional": layout == "traditional", "base": base, "scale": scale},
        },
    }


def make_calibration(
    model_id: str,
    *,
    n_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    rotary_dims: int | None = None,
    layout: str = "half",
    base: float = 10000.0,
    private: bool = False,
    seed: int = 0,
    layers: list[dict] | None = None,
    base_model: str | None = None,
) -> tuple[dict, dict]:
    """Return (tensors, manifest without artifact_version/files) for a fake calibration.

    By default every layer is a global layer with the same geometry. For mixed geometries pass
    `layers`, records as `layer_record` builds them; indexes left out are not calibrated.
    """
    rotary_dims = rotary_dims or head_dim
    if layers is None:
        layers = [
            layer_record(i, heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary_dims=rotary_dims, layout=layout, base=base)
            for i in range(n_layers)
        ]
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        rope = layer["rope"]
        omega = plain_omega(rope["settings"]["base"], rope["rotary_dims"]) * rope["settings"].get("scale", 1.0)
        tensors.update(layer_tensors(layer["index"], sample_moments(layer["n_q_heads"], rope["bands"], rng), omega))
    token_ids_sha = hashlib.sha256(f"{model_id}-{seed}-tokens".encode()).hexdigest()
    manifest = {
        "schema_version": 1,
        "model": {
            "id": model_id,
            "revision": None,
            "architecture": "LlamaForCausalLM",
            "quantization": None,
            "private": private,
            "base_model": base_model,
            "source": {"kind": "hf"},
        },
        "geometry": {
            "n_layers": n_layers,
            "calibrated_layers": [layer["index"] for layer in layers],
            "n_q_heads": heads,
            "n_kv_heads": kv_heads,
            "head_dim": head_dim,
            "rotary_dims": rotary_dims,
            "layers": layers,
            "skipped_layers": [
                {"index": i, "reason": "no RoPE attention"} for i in range(n_layers) if i not in {l["index"] for l in layers}
            ],
        },
        "corpus": {"kind": "builtin", "version": "v1", "token_count": 4096, "token_ids_sha256": token_ids_sha},
        "calibration": {
            "token_count": 4096,
            "sequence_length": 1024,
            "chunk_size": 256,
            "n_sequences": 4,
            "compute_dtype": "float32",
        },
        "convergence": {"verdict": "passed"},
        "inputs_sha256": hashlib.sha256(f"{model_id}-{seed}-inputs".encode()).hexdigest(),
        "tool": tool_record(),
        "created": utc_now(),
    }
    return tensors, manifest
