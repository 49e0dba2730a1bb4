"""Streaming per-head, per-band statistics of pre-RoPE queries.

For band values z = a + i b of one layer, `BandStats` keeps float64 running sums over tokens of
a, b, |z| and of their squares, per query head and band. Memory does not grow with the number
of tokens, merging two accumulators is exact, and the sums of squares give standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUM_NAMES = ("real", "imag", "abs", "real_sq", "imag_sq", "abs_sq")


@dataclass
class BandStats:
    """Running sums over tokens of one layer's band values, each of shape [heads, bands]."""

    n_heads: int
    n_bands: int
    count: int = 0
    sums: dict | None = None

    def __post_init__(self):
        if self.sums is None:
            self.sums = {name: np.zeros((self.n_heads, self.n_bands)) for name in SUM_NAMES}

    def update(self, real: np.ndarray, imag: np.ndarray) -> None:
        """Add tokens given as band parts of shape [heads, tokens, bands]."""
        real = np.asarray(real, dtype=np.float64)
        imag = np.asarray(imag, dtype=np.float64)
        if real.shape != imag.shape or real.ndim != 3 or real.shape[0] != self.n_heads or real.shape[2] != self.n_bands:
            raise ValueError(
                f"expected band parts of shape [{self.n_heads}, tokens, {self.n_bands}], "
                f"got {real.shape} and {imag.shape}"
            )
        magnitude = np.hypot(real, imag)
        self.sums["real"] += real.sum(axis=1)
        self.sums["imag"] += imag.sum(axis=1)
        self.sums["abs"] += magnitude.sum(axis=1)
        self.sums["real_sq"] += np.einsum("htf,htf->hf", real, real)
        self.sums["imag_sq"] += np.einsum("htf,htf->hf", imag, imag)
        self.sums["abs_sq"] += np.einsum("htf,htf->hf", magnitude, magnitude)
        self.count += real.shape[1]

    def merge(self, other: "BandStats") -> "BandStats":
        """Return the statistics of both token sets together."""
        if (other.n_heads, other.n_bands) != (self.n_heads, self.n_bands):
            raise ValueError("cannot merge statistics of different shapes")
        sums = {name: self.sums[name] + other.sums[name] for name in SUM_NAMES}
        return BandStats(self.n_heads, self.n_bands, self.count + other.count, sums)

    def means(self) -> dict[str, np.ndarray]:
        """Return E[a], E[b], E|z| and the second moments, keyed by artifact tensor name."""
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        n = float(self.count)
        return {
            "q_mean_real": self.sums["real"] / n,
            "q_mean_imag": self.sums["imag"] / n,
            "q_abs_mean": self.sums["abs"] / n,
            "q_real_sq_mean": self.sums["real_sq"] / n,
            "q_imag_sq_mean": self.sums["imag_sq"] / n,
            "q_abs_sq_mean": self.sums["abs_sq"] / n,
        }


def mean_resultant_length(mean_real, mean_imag, abs_mean) -> np.ndarray:
    """Return R = |E z| / E|z| per head and band (0 where E|z| is 0)."""
    center = np.hypot(mean_real, mean_imag)
    abs_mean = np.asarray(abs_mean, dtype=np.float64)
    return np.divide(center, abs_mean, out=np.zeros_like(center, dtype=np.float64), where=abs_mean > 0)


def standard_errors(moments: dict, count: int) -> dict[str, np.ndarray]:
    """Return the standard errors of E[a], E[b] and E|z| from first and second moments.

    Tokens of one sequence are correlated, so these understate the true error; the split-half
    comparison in the convergence check measures it without that assumption.
    """
    if count < 2:
        raise ValueError("standard errors need at least two tokens")
    out = {}
    for mean_name, sq_name, label in (
        ("q_mean_real", "q_real_sq_mean", "real"),
        ("q_mean_imag", "q_imag_sq_mean", "imag"),
        ("q_abs_mean", "q_abs_sq_mean", "abs"),
    ):
        variance = np.maximum(moments[sq_name] - moments[mean_name] ** 2, 0.0) * count / (count - 1)
        out[label] = np.sqrt(variance / count)
    return out
