"""TriAttention key scores from Q-centers, for pre-RoPE and post-RoPE cached keys.

Shapes: a layer's statistics are [heads, bands] (query heads), keys are band parts
[kv_heads, n_keys, bands] (or [heads, n_keys, bands] when already expanded), omega is [bands]
in radians per position, and positions are token indices. Band f of a vector is the complex
number z_f whose real and imaginary parts RoPE rotates together (see `rope.split_bands`).

For a key k cached at position p and a query at position t, the score of query head h is

    trig(t) = sum_f Re(qbar_f * conj(k_f) * exp(i * omega_f * (t - p)))
            = sum_f |qbar_f| |k_f| cos(omega_f (t - p) + arg qbar_f - arg k_f)

averaged over the future query positions t = query_position + offset for every offset,
plus a position-free norm term:

    "mrl":   sum_f (E|q_f| - |qbar_f|) |k_f|   (mean-resultant-length correction)
    "plain": sum_f E|q_f| |k_f|
    "none":  0

where qbar = E[q] is the Q-center. Query head h reads KV head h // (heads / kv_heads).
"""

from __future__ import annotations

import numpy as np

# Future query offsets (in tokens) the trigonometric term is averaged over: 1, 2, 4, ..., 65536.
FUTURE_OFFSETS = tuple(2**i for i in range(17))

NORM_TERMS = ("mrl", "plain", "none")
POOLING = ("max", "mean")


def _centers(q_mean_real, q_mean_imag, q_abs_mean, omega) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    real = np.asarray(q_mean_real, dtype=np.float64)
    imag = np.asarray(q_mean_imag, dtype=np.float64)
    abs_mean = np.asarray(q_abs_mean, dtype=np.float64)
    omega = np.asarray(omega, dtype=np.float64).reshape(-1)
    if real.ndim != 2 or real.shape != imag.shape or real.shape != abs_mean.shape:
        raise ValueError(
            "q_mean_real, q_mean_imag and q_abs_mean must share one shape [heads, bands], "
            f"but got {real.shape}, {imag.shape} and {abs_mean.shape}"
        )
    if omega.size != real.shape[1]:
        raise ValueError(f"omega has {omega.size} bands but the centers have {real.shape[1]}")
    return real + 1j * imag, abs_mean, omega


def _keys(keys_real, keys_imag, n_heads: int, n_bands: int) -> np.ndarray:
    real = np.asarray(keys_real, dtype=np.float64)
    imag = np.asarray(keys_imag, dtype=np.float64)
    if real.ndim != 3 or real.shape != imag.shape or real.shape[2] != n_bands:
        raise ValueError(
            f"keys must be band parts of shape [kv_heads, n_keys, {n_bands}], "
            f"but got {real.shape} and {imag.shape}"
        )
    n_kv = real.shape[0]
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(
            f"{n_heads} query heads cannot be grouped over {n_kv} KV heads: "
            "the KV head count must divide the query head count"
        )
    return real + 1j * imag


def _grouped(values: np.ndarray, n_kv: int) -> np.ndarray:
    """Reshape [heads, bands] to [kv_heads, group, bands]: head h goes to KV head h // group."""
    return values.reshape(n_kv, values.shape[0] // n_kv, values.shape[1])


def _offsets(offsets) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.float64).reshape(-1)
    if offsets.size == 0:
        raise ValueError("offsets is empty: give at least one future query offset")
    return offsets


def _norm_weights(center: np.ndarray, abs_mean: np.ndarray, norm_term: str) -> np.ndarray | None:
    if norm_term == "mrl":
        return abs_mean - np.abs(center)
    if norm_term == "plain":
        return abs_mean
    if norm_term == "none":
        return None
    raise ValueError(f"norm_term={norm_term!r} is not one of {NORM_TERMS}")


def _add_norm_term(trig: np.ndarray, weights: np.ndarray | None, keys: np.ndarray, n_kv: int) -> np.ndarray:
    if weights is None:
        return trig
    norm = np.einsum("kgf,knf->kgn", _grouped(weights, n_kv), np.abs(keys))
    return trig + norm


def score_keys(
    q_mean_real,
    q_mean_imag,
    q_abs_mean,
    omega,
    keys_real,
    keys_imag,
    key_positions,
    query_position: int,
    *,
    offsets=FUTURE_OFFSETS,
    norm_term: str = "mrl",
) -> np.ndarray:
    """Score pre-RoPE cached keys of one layer against the Q-centers, as [heads, n_keys].

    q_mean_real, q_mean_imag, q_abs_mean: [heads, bands], the Q-center E[q] and E|q|.
    omega: [bands], radians per position. keys_real, keys_imag: [kv_heads, n_keys, bands] of
    keys before RoPE. key_positions: [n_keys] token positions of the keys. query_position:
    position of the current query. The trigonometric term is averaged over the queries at
    query_position + offset. Raises ValueError on inconsistent shapes or an unknown norm_term.
    """
    center, abs_mean, omega = _centers(q_mean_real, q_mean_imag, q_abs_mean, omega)
    n_heads, n_bands = center.shape
    keys = _keys(keys_real, keys_imag, n_heads, n_bands)
    n_kv, n_keys = keys.shape[:2]
    positions = np.asarray(key_positions, dtype=np.float64).reshape(-1)
    if positions.size != n_keys:
        raise ValueError(f"key_positions has {positions.size} entries for {n_keys} keys")
    offsets = _offsets(offsets)
    weights = _norm_weights(center, abs_mean, norm_term)

    # exp(i omega (t0 + o - p)) averaged over offsets o factors into a per-key rotation by
    # omega (t0 - p) and a per-band mean over offsets, so no [offsets, keys, bands] array is built.
    offset_mean = np.exp(1j * np.outer(offsets, omega)).mean(axis=0)
    distance = float(query_position) - positions
    rotation = np.exp(1j * np.outer(distance, omega)) * offset_mean
    rotated = np.conj(keys) * rotation[None, :, :]
    trig = np.einsum("kgf,knf->kgn", _grouped(center, n_kv), rotated).real

    return _add_norm_term(trig, weights, keys, n_kv).reshape(n_heads, n_keys)


def score_keys_post_rope(
    q_mean_real,
    q_mean_imag,
    q_abs_mean,
    omega,
    keys_real,
    keys_imag,
    query_position: int,
    *,
    offsets=FUTURE_OFFSETS,
    norm_term: str = "mrl",
) -> np.ndarray:
    """Score cached keys that RoPE has already rotated, as [heads, n_keys].

    Same contract as `score_keys`, but keys_real and keys_imag are the band parts of the
    rotated keys ktilde_f = k_f exp(i omega_f p), so no key positions are needed. With
    a_f + i b_f = qbar_f conj(ktilde_f), the trigonometric term is
    sum_f [a_f cos(omega_f t) - b_f sin(omega_f t)], averaged over t = query_position + offset.
    The norm term is unchanged because RoPE keeps |k_f|.
    """
    center, abs_mean, omega = _centers(q_mean_real, q_mean_imag, q_abs_mean, omega)
    n_heads, n_bands = center.shape
    keys = _keys(keys_real, keys_imag, n_heads, n_bands)
    n_kv, n_keys = keys.shape[:2]
    weights = _norm_weights(center, abs_mean, norm_term)

    times = float(query_position) + _offsets(offsets)
    angles = np.outer(times, omega)
    cos_mean = np.cos(angles).mean(axis=0)
    sin_mean = np.sin(angles).mean(axis=0)
    product = _grouped(center, n_kv)[:, :, None, :] * np.conj(keys)[:, None, :, :]
    trig = (product.real * cos_mean - product.imag * sin_mean).sum(axis=-1)

    return _add_norm_term(trig, weights, keys, n_kv).reshape(n_heads, n_keys)


def pool_gqa(scores, n_kv_heads: int, how: str = "max") -> np.ndarray:
    """Combine the query heads of each GQA group: [heads, n_keys] -> [kv_heads, n_keys].

    Query head h belongs to KV head h // (heads / n_kv_heads). `how` is "max" or "mean".
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [heads, n_keys], but got shape {scores.shape}")
    n_heads = scores.shape[0]
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot be grouped over n_kv_heads={n_kv_heads}")
    grouped = scores.reshape(n_kv_heads, n_heads // n_kv_heads, scores.shape[1])
    if how == "max":
        return grouped.max(axis=1)
    if how == "mean":
        return grouped.mean(axis=1)
    raise ValueError(f"how={how!r} is not one of {POOLING}")
