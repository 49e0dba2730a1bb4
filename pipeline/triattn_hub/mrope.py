"""M-RoPE (multimodal RoPE, as in Qwen2.5-VL) seen at text positions, and its capture tap.

M-RoPE gives every token three positions (temporal, height, width) and assigns each band to
one of them (`mrope_section` counts the bands per axis). Text tokens carry the same value on
all three axes, so for text each band rotates by omega_f times that text position, like
plain RoPE. Calibration feeds text only. `TextPositionRoPE` exposes the model's own
`rotary_emb.apply_rotary` as a `rope(x, offset=...)` module at text positions, so the
ordinary RoPE reading and checks apply to it. `MRopeTap` records the pre-RoPE queries and
keys that the attention passes to `apply_rotary`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import UnsupportedModelError

AXIS_NAMES = ("temporal", "height", "width")


def is_mrope_module(module) -> bool:
    """Return True for a rotary embedding that applies M-RoPE through `apply_rotary`."""
    return callable(getattr(module, "apply_rotary", None)) and hasattr(module, "mrope_section")


def text_position_ids(offset, length: int, batch: int) -> mx.array:
    """Return M-RoPE position ids [3, batch, length] for text tokens starting at `offset`."""
    positions = mx.arange(length) + offset
    return mx.broadcast_to(positions[None, None, :], (3, batch, length))


class TextPositionRoPE(nn.Module):
    """The rotation that an M-RoPE embedding applies to text tokens, as `rope(x, offset)`."""

    def __init__(self, rotary_emb: nn.Module):
        super().__init__()
        self.rotary_emb = rotary_emb
        self.dims = int(rotary_emb.dim)
        self.traditional = getattr(rotary_emb, "pairing", "half_split") == "even_odd"
        self.base = float(rotary_emb.base)
        self.mrope_section = [int(s) for s in rotary_emb.mrope_section]
        self.style = str(getattr(rotary_emb, "style", "unknown"))

    @property
    def inv_freq(self) -> mx.array:
        return self.rotary_emb.inv_freq

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        position_ids = text_position_ids(offset, x.shape[2], x.shape[0])
        rotated, _ = self.rotary_emb.apply_rotary(x, x, position_ids, unsqueeze_dim=1)
        return rotated


def measure_band_axes(rope: TextPositionRoPE, head_dim: int) -> list[int]:
    """Return, per band, the position axis (0 temporal, 1 height, 2 width) that rotates it.

    Each axis in turn gets position 1 while the other two stay at 0, and the bands whose
    basis vector gains an imaginary part are that axis's. (The real part would miss slow
    bands: cos(omega) rounds to 1 in float32 for omega below about 3e-4.) Raises
    UnsupportedModelError if a band moves under no axis or under more than one.
    """
    n_bands = rope.dims // 2
    if rope.traditional:
        real_idx = 2 * np.arange(n_bands)
        imag_idx = real_idx + 1
    else:
        real_idx = np.arange(n_bands)
        imag_idx = real_idx + n_bands
    basis = np.zeros((1, n_bands, 1, head_dim), dtype=np.float32)
    basis[0, np.arange(n_bands), 0, real_idx] = 1.0
    x = mx.array(basis)
    moved = np.zeros((3, n_bands), dtype=bool)
    for axis in range(3):
        position_ids = np.zeros((3, 1, 1), dtype=np.int32)
        position_ids[axis] = 1
        out, _ = rope.rotary_emb.apply_rotary(x, x, mx.array(position_ids), unsqueeze_dim=1)
        out = np.array(out.astype(mx.float32))[0, :, 0, :]
        moved[axis] = out[np.arange(n_bands), imag_idx] != 0.0
    counts = moved.sum(axis=0)
    if not np.all(counts == 1):
        bad = int(np.argmax(counts != 1))
        raise UnsupportedModelError(
            f"M-RoPE band {bad} rotates under {int(counts[bad])} position axes, expected exactly one. "
            "This M-RoPE layout is not supported"
        )
    return [int(a) for a in np.argmax(moved, axis=0)]


def mrope_record(rope: TextPositionRoPE, head_dim: int) -> dict:
    """Return the manifest record of an M-RoPE layer's band layout."""
    return {
        "section": rope.mrope_section,
        "style": rope.style,
        "axes": list(AXIS_NAMES),
        "band_axis": measure_band_axes(rope, head_dim),
        "text_positions": "equal on all axes, so band f rotates by omega_f * position",
    }


class MRopeTap(nn.Module):
    """Stand-in for an M-RoPE `rotary_emb` that records what `apply_rotary` receives."""

    def __init__(self, inner: nn.Module, record):
        super().__init__()
        self.inner = inner
        # A plain attribute, not an mlx child, so it stays out of the parameter tree.
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name):
        # Attention and model code read attributes of the embedding (fused_apply, dim, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "inner" not in self:
                raise
            return getattr(self["inner"], name)

    def apply_rotary(self, q, k, position_ids, *args, **kwargs):
        axes_equal = mx.all(position_ids == position_ids[:1]).item()
        if not axes_equal:
            raise UnsupportedModelError(
                "M-RoPE position ids differ between the temporal, height and width axes, but "
                "calibration takes text-only input, where all three are equal. Pass token ids only"
            )
        offset = position_ids.reshape(-1)[0]
        self._record(q, offset)
        self._record(k, offset)
        return self.inner.apply_rotary(q, k, position_ids, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)
