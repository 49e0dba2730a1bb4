"""RoPE bands and omega, read from a live RoPE module and checked by rotating basis vectors.

Band f is the pair of components that RoPE rotates together at angular frequency omega_f
(radians per position), seen as the complex number z_f. RoPE at position p maps z_f to
z_f * exp(i * omega_f * p). Half-split RoPE (mlx `traditional=False`, Hugging Face
`rotate_half`) pairs components (f, f + rotary_dims / 2). Traditional RoPE (mlx
`traditional=True`) pairs (2f, 2f + 1). Components at or beyond `rotary_dims` are not rotated
and belong to no band.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import RopeError

logger = logging.getLogger(__name__)

HALF = "half"
TRADITIONAL = "traditional"

# Positions used to measure omega: each step refines the estimate of the previous one, and
# the ratio of 8 keeps the phase unwrapping unambiguous while float32 error stays below 1e-7.
_MEASURE_POSITIONS = (1, 8, 64, 512, 4096, 32768, 262144, 2097152)
OMEGA_RTOL = 1e-5


@dataclass(frozen=True)
class RopeGeometry:
    """Band layout and frequencies of one attention layer's RoPE."""

    layout: str
    head_dim: int
    rotary_dims: int
    omega: np.ndarray = field(repr=False)
    input_scale: float
    rope_class: str
    settings: dict

    @property
    def n_bands(self) -> int:
        return self.rotary_dims // 2

    def to_json(self) -> dict:
        """Return the manifest record of this geometry (omega itself goes into the artifact)."""
        return {
            "class": self.rope_class,
            "layout": self.layout,
            "head_dim": self.head_dim,
            "rotary_dims": self.rotary_dims,
            "bands": self.n_bands,
            # Bands with omega 0 (proportional RoPE) are paired but never rotated.
            "rotated_bands": int(np.count_nonzero(self.omega)),
            "input_scale": self.input_scale,
            "settings": self.settings,
        }


def band_indices(layout: str, rotary_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the component indices of the real and imaginary parts of every band."""
    n_bands = rotary_dims // 2
    if layout == HALF:
        real = np.arange(n_bands)
        return real, real + n_bands
    if layout == TRADITIONAL:
        real = 2 * np.arange(n_bands)
        return real, real + 1
    raise RopeError(f"unknown RoPE layout {layout!r}; expected {HALF!r} or {TRADITIONAL!r}")


def split_bands(x: np.ndarray, layout: str, rotary_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Split vectors [..., head_dim] into band real and imaginary parts [..., bands]."""
    real, imag = band_indices(layout, rotary_dims)
    return x[..., real], x[..., imag]


def merge_bands(
    real: np.ndarray, imag: np.ndarray, layout: str, head_dim: int
) -> np.ndarray:
    """Place band values [..., bands] back into vectors [..., head_dim], zeros elsewhere."""
    n_bands = real.shape[-1]
    out = np.zeros(real.shape[:-1] + (head_dim,), dtype=np.result_type(real, imag))
    real_idx, imag_idx = band_indices(layout, 2 * n_bands)
    out[..., real_idx] = real
    out[..., imag_idx] = imag
    return out


def _rope_settings(module) -> dict:
    settings = {}
    for name in (
        "dims", "traditional", "base", "scale", "max_position_embeddings",
        "original_max_position_embeddings", "mscale",
    ):
        value = getattr(module, name, None)
        if isinstance(value, (bool, int, float, str)):
            settings[name] = value
    return settings


def _declared_omega(module, rotary_dims: int) -> tuple[np.ndarray | None, str]:
    """Return omega as the module's attributes define it, or None when they do not."""
    freqs = getattr(module, "_freqs", None)
    if freqs is not None:
        # mx.fast.rope divides positions by `freqs`, so omega is its reciprocal. An infinite
        # entry means a band that is carried along but never rotated (omega 0).
        periods = np.asarray(freqs, dtype=np.float64).reshape(-1)
        with np.errstate(divide="ignore"):
            omega = np.where(np.isinf(periods), 0.0, 1.0 / periods)
        return omega[: rotary_dims // 2], "_freqs"
    inv_freq = getattr(module, "inv_freq", None)
    if inv_freq is not None:
        # Hugging Face style embeddings (M-RoPE) store omega itself.
        omega = np.asarray(inv_freq, dtype=np.float64).reshape(-1)
        return omega[: rotary_dims // 2], "inv_freq"
    base = getattr(module, "base", None)
    if type(module).__name__ == "RoPE" and base is not None:
        scale = float(getattr(module, "scale", 1.0))
        exponents = np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims
        return scale * float(base) ** (-exponents), "base_and_scale"
    return None, "measured"


def _apply(module, x: np.ndarray, offset: int) -> np.ndarray:
    import mlx.core as mx

    out = module(mx.array(x, dtype=mx.float32), offset=offset)
    return np.array(out.astype(mx.float32), dtype=np.float64)


def measure_rope(module, head_dim: int, layout: str, rotary_dims: int) -> tuple[np.ndarray, float]:
    """Measure omega [bands] and the input scale of a RoPE module by rotating basis vectors.

    Each band's real basis vector goes through the module at growing positions. The phase at
    position 1 gives a first omega; each later position refines it after unwrapping by the
    previous estimate. Raises RopeError if the module mixes bands or leaves the pair plane.
    """
    n_bands = rotary_dims // 2
    real_idx, imag_idx = band_indices(layout, rotary_dims)
    basis = np.zeros((1, n_bands, 1, head_dim))
    basis[0, np.arange(n_bands), 0, real_idx] = 1.0

    at_zero = _apply(module, basis, 0)[0, :, 0, :]
    input_scale = float(np.median(np.abs(at_zero[np.arange(n_bands), real_idx])))
    if not input_scale > 0:
        raise RopeError(f"{type(module).__name__} maps basis vectors to zero; cannot read its bands")

    omega = None
    for position in _MEASURE_POSITIONS:
        out = _apply(module, basis, position)[0, :, 0, :] / input_scale
        re = out[np.arange(n_bands), real_idx]
        im = out[np.arange(n_bands), imag_idx]
        leak = out.copy()
        leak[np.arange(n_bands), real_idx] = 0.0
        leak[np.arange(n_bands), imag_idx] = 0.0
        if position == 1 and np.abs(leak).max() > 1e-3:
            raise RopeError(
                f"{type(module).__name__} does not rotate the ({layout}) component pairs "
                f"it was assumed to rotate: the band layout or rotary_dims={rotary_dims} is wrong"
            )
        phase = np.arctan2(im, re)
        if omega is None:
            omega = phase
            continue
        turns = np.round((omega * position - phase) / (2 * math.pi))
        omega = (phase + 2 * math.pi * turns) / position
    return omega, input_scale


def read_rope(module, head_dim: int) -> RopeGeometry:
    """Read the band layout, rotary dims and omega of a live mlx RoPE module.

    Omega comes from the module's own attributes (`_freqs`, or base and scale for `nn.RoPE`)
    and is cross-checked against `measure_rope`; a module with neither attribute uses the
    measured omega. Raises RopeError when the two disagree by more than OMEGA_RTOL relative,
    or when the module's rotation depends on the sequence length (dynamic NTK scaling).
    """
    rope_class = type(module).__name__
    if rope_class == "DynamicNTKScalingRoPE":
        raise RopeError(
            "dynamic NTK RoPE changes omega with the sequence length, so no fixed calibration "
            "exists for it; calibrate the model with static rope_scaling instead"
        )
    # SuScaledRoPE (longrope) names its rotated width `dim`, the other mlx modules `dims`.
    rotary_dims = int(getattr(module, "dims", None) or getattr(module, "dim", None) or head_dim)
    if rotary_dims > head_dim or rotary_dims % 2:
        raise RopeError(f"{rope_class} rotates {rotary_dims} dims, which does not fit head_dim={head_dim}")
    layout = TRADITIONAL if getattr(module, "traditional", False) else HALF

    measured, input_scale = measure_rope(module, head_dim, layout, rotary_dims)
    declared, source = _declared_omega(module, rotary_dims)
    if declared is None:
        omega = measured
    else:
        scale = np.maximum(np.abs(declared), 1e-12)
        worst = int(np.argmax(np.abs(measured - declared) / scale))
        rel = float(np.abs(measured[worst] - declared[worst]) / scale[worst])
        if rel > OMEGA_RTOL and abs(measured[worst] - declared[worst]) > 1e-9:
            raise RopeError(
                f"{rope_class}: omega of band {worst} is {declared[worst]:.9g} by its attributes "
                f"but the module rotates by {measured[worst]:.9g} rad/position (relative error {rel:.2e})"
            )
        omega = declared
    settings = _rope_settings(module)
    settings["omega_source"] = source
    return RopeGeometry(
        layout=layout,
        head_dim=head_dim,
        rotary_dims=rotary_dims,
        omega=np.asarray(omega, dtype=np.float64),
        input_scale=input_scale,
        rope_class=rope_class,
        settings=settings,
    )


def check_omega(expected: np.ndarray, actual: np.ndarray, *, what: str, rtol: float = OMEGA_RTOL) -> None:
    """Raise RopeError naming both values when two omega vectors differ beyond rtol."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        raise RopeError(f"{what}: {expected.shape[-1]} bands expected, {actual.shape[-1]} found")
    scale = np.maximum(np.abs(expected), 1e-12)
    rel = np.abs(actual - expected) / scale
    rel[np.abs(actual - expected) <= 1e-9] = 0.0
    if rel.size and rel.max() > rtol:
        band = int(np.argmax(rel))
        raise RopeError(
            f"{what}: omega of band {band} is {actual[band]:.9g} but {expected[band]:.9g} was expected "
            f"(relative error {rel[band]:.2e} > {rtol:g})"
        )
