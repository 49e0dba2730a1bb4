"""Metrics that compare two estimates of per-head, per-band query statistics.

An estimate of one layer is `q_mean_real`, `q_mean_imag` and `q_abs_mean` of shape [heads, bands]
(a mapping, or a `BandStats`). `head_metrics` compares the Q-centers and mean magnitudes head
by head, and `score_agreement` compares the rankings of held-out keys scored with each set of
centers. `DEFINITIONS` states each number in words for the manifest. Everything here is numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .scoring import FUTURE_OFFSETS, pool_gqa, score_keys
from .stats import BandStats, mean_resultant_length, standard_errors

MEAN_NAMES = ("q_mean_real", "q_mean_imag", "q_abs_mean")
SIMILARITY_METRICS = ("cosine",)
ERROR_METRICS = ("center_rel_error", "abs_rel_error", "phase_error", "mrl_error_dominant", "mrl_error_energy")
# Top-B overlaps are reported for B = L / fraction, with L the held-out sequence length.
TOP_FRACTIONS = (16, 8, 4)
DOMINANT_BANDS = 2

DEFINITIONS = {
    "cosine": (
        "Cosine similarity of the Q-centers of one (layer, query head) as real vectors of length "
        "2 x bands (real parts, then imaginary parts), estimate against reference. A phase error "
        "lowers it. 1 when both centers are zero, 0 when only one is."
    ),
    "center_rel_error": (
        "||c_A - c_B|| / ||c_B|| with c the complex Q-center vector over bands, A the estimate and "
        "B the reference (0 when both are zero, null when only c_B is)."
    ),
    "abs_rel_error": "||m_A - m_B|| / ||m_B|| with m the vector of mean magnitudes E|q_f| over bands.",
    "phase_error": (
        "Mean over bands of |arg c_A,f - arg c_B,f| wrapped to [0, pi], weighted by |c_B,f|, in radians."
    ),
    "mrl_error_dominant": (
        "Mean over the 2 bands with the largest reference E|q_f| of |R_A,f - R_B,f|, where "
        "R_f = |E q_f| / E|q_f| is the mean resultant length."
    ),
    "mrl_error_energy": (
        "Mean over all bands of |R_A,f - R_B,f| weighted by the reference (E|q_f|)^2."
    ),
    "relative_se": (
        "Standard-error bound of the reference: sqrt(sum_f SE(Re c_f)^2 + SE(Im c_f)^2) / ||c|| per "
        "(layer, query head), SE from the stored first and second moments assuming independent "
        "tokens (this understates the error of correlated tokens)."
    ),
    "spearman": (
        "Spearman rank correlation (average ranks for ties) between the key scores of one (layer, "
        "KV head) from the estimate and from the reference. Scores: scoring.score_keys with "
        "norm_term 'mrl' over offsets 1..65536 at query position L - 1 of the held-out sequence "
        "of L tokens, max-pooled over the query heads of the KV group."
    ),
    "overlap_l16": "|top-B keys by estimate ∩ top-B keys by reference| / B with B = L // 16 (at least 1).",
    "overlap_l8": "The same top-B overlap with B = L // 8.",
    "overlap_l4": "The same top-B overlap with B = L // 4.",
    "summaries": (
        "Similarities (cosine, spearman, overlaps) are summarised over (layer, head) pairs as mean, "
        "p5 (5th percentile, linear interpolation) and min. Errors as mean, p95 and max."
    ),
    "split_half": (
        "Estimate = statistics of the first half of the calibration sequences, reference = the "
        "second half. The noise floor of the offline calibration. The halves hold different "
        "documents, so on a corpus ordered by genre this also measures the sensitivity to content."
    ),
    "split_interleaved": (
        "Estimate = statistics of the even-numbered calibration sequences, reference = the "
        "odd-numbered ones. Both halves share the corpus' mix of content, so this measures the "
        "sampling noise alone. Reported for context, not gated."
    ),
    "online": (
        "Estimate = statistics of the first N tokens of one prompt's own prefill, reference = the "
        "full calibration. Each number is the mean over prompts of the per-prompt summary."
    ),
    "n_star": (
        "Smallest N whose online cosine p5 is at least the split-half cosine p5 minus the "
        "margin and whose mean top-B overlaps all reach the given ratio of the split-half "
        "overlaps. Null when no N does."
    ),
}


# --- per-head metrics ---------------------------------------------------------------------------


def layer_means(stats) -> dict[str, np.ndarray]:
    """Return q_mean_real, q_mean_imag and q_abs_mean [heads, bands] of a BandStats or mapping."""
    means = stats.means() if isinstance(stats, BandStats) else stats
    missing = [name for name in MEAN_NAMES if name not in means]
    if missing:
        raise ValueError(f"statistics lack {missing}; expected the keys {MEAN_NAMES}")
    out = {name: np.asarray(means[name], dtype=np.float64) for name in MEAN_NAMES}
    shapes = {out[name].shape for name in MEAN_NAMES}
    if len(shapes) != 1 or out["q_mean_real"].ndim != 2:
        raise ValueError(f"statistics must share one shape [heads, bands], got {sorted(shapes)}")
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Return numerator / denominator with 0 / 0 = 0 and x / 0 = inf."""
    out = np.where(numerator > 0, np.inf, 0.0)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def head_metrics(estimate, reference) -> dict[str, np.ndarray]:
    """Compare one layer's estimate with its reference and return each metric as [heads]."""
    est = layer_means(estimate)
    ref = layer_means(reference)
    if est["q_mean_real"].shape != ref["q_mean_real"].shape:
        raise ValueError(
            f"estimate has shape {est['q_mean_real'].shape} but the reference {ref['q_mean_real'].shape}"
        )
    est_center = est["q_mean_real"] + 1j * est["q_mean_imag"]
    ref_center = ref["q_mean_real"] + 1j * ref["q_mean_imag"]

    est_vector = np.concatenate([est["q_mean_real"], est["q_mean_imag"]], axis=-1)
    ref_vector = np.concatenate([ref["q_mean_real"], ref["q_mean_imag"]], axis=-1)
    norms = np.linalg.norm(est_vector, axis=-1) * np.linalg.norm(ref_vector, axis=-1)
    both_zero = ~est_vector.any(axis=-1) & ~ref_vector.any(axis=-1)
    cosine = np.where(both_zero, 1.0, 0.0)
    np.divide((est_vector * ref_vector).sum(axis=-1), norms, out=cosine, where=norms > 0)

    center_rel_error = _ratio(np.linalg.norm(est_center - ref_center, axis=-1), np.linalg.norm(ref_center, axis=-1))
    abs_rel_error = _ratio(
        np.linalg.norm(est["q_abs_mean"] - ref["q_abs_mean"], axis=-1), np.linalg.norm(ref["q_abs_mean"], axis=-1)
    )

    # The angle of c_A conj(c_B) is the phase difference already wrapped to (-pi, pi].
    weights = np.abs(ref_center)
    phase = np.abs(np.angle(est_center * np.conj(ref_center)))
    phase_error = _ratio((weights * phase).sum(axis=-1), weights.sum(axis=-1))

    mrl_diff = np.abs(
        mean_resultant_length(est["q_mean_real"], est["q_mean_imag"], est["q_abs_mean"])
        - mean_resultant_length(ref["q_mean_real"], ref["q_mean_imag"], ref["q_abs_mean"])
    )
    n_dominant = min(DOMINANT_BANDS, ref["q_abs_mean"].shape[-1])
    dominant = np.argsort(-ref["q_abs_mean"], axis=-1, kind="stable")[:, :n_dominant]
    mrl_error_dominant = np.take_along_axis(mrl_diff, dominant, axis=-1).mean(axis=-1)
    energy = ref["q_abs_mean"] ** 2
    mrl_error_energy = _ratio((energy * mrl_diff).sum(axis=-1), energy.sum(axis=-1))

    return {
        "cosine": cosine,
        "center_rel_error": center_rel_error,
        "abs_rel_error": abs_rel_error,
        "phase_error": phase_error,
        "mrl_error_dominant": mrl_error_dominant,
        "mrl_error_energy": mrl_error_energy,
    }


def compare(estimate: Mapping, reference: Mapping) -> dict[str, dict[int, np.ndarray]]:
    """Compare per-layer statistics; return {metric: {layer index: [heads]}} over shared layers."""
    layers = sorted(set(estimate) & set(reference))
    if not layers:
        raise ValueError(f"estimate layers {sorted(estimate)} and reference layers {sorted(reference)} do not overlap")
    out: dict[str, dict[int, np.ndarray]] = {}
    for index in layers:
        for name, values in head_metrics(estimate[index], reference[index]).items():
            out.setdefault(name, {})[index] = values
    return out


def json_number(value) -> float | None:
    """Return `value` rounded to 6 significant digits, or None when infinite or NaN (JSON has neither)."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def flatten_heads(per_layer: Mapping[int, np.ndarray]) -> np.ndarray:
    """Concatenate per-layer arrays [heads] into one array over all (layer, head) pairs."""
    return np.concatenate([np.asarray(per_layer[index], dtype=np.float64).ravel() for index in sorted(per_layer)])


def summarize_similarity(values: np.ndarray) -> dict:
    """Return the mean, 5th percentile and minimum of the finite values (None if there are none)."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "p5": None, "min": None}
    return {"mean": json_number(values.mean()), "p5": json_number(np.percentile(values, 5)), "min": json_number(values.min())}


def summarize_error(values: np.ndarray) -> dict:
    """Return the mean, 95th percentile and maximum (None where an infinite error enters)."""
    if values.size == 0:
        return {"mean": None, "p95": None, "max": None}
    return {"mean": json_number(values.mean()), "p95": json_number(np.percentile(values, 95)), "max": json_number(values.max())}


def summarize(per_head: Mapping[str, Mapping[int, np.ndarray]]) -> dict[str, dict]:
    """Summarise per-(layer, head) metrics over all pairs, each with its own kind of summary."""
    out = {}
    for name, per_layer in per_head.items():
        values = flatten_heads(per_layer)
        out[name] = summarize_error(values) if name in ERROR_METRICS or name == "relative_se" else summarize_similarity(values)
    return out


def relative_standard_errors(stats: Mapping[int, BandStats]) -> dict[int, np.ndarray]:
    """Return the relative standard error of the Q-center per layer, as [heads] (see DEFINITIONS)."""
    out = {}
    for index, layer_stats in stats.items():
        moments = layer_stats.means()
        errors = standard_errors(moments, layer_stats.count)
        spread = np.sqrt((errors["real"] ** 2 + errors["imag"] ** 2).sum(axis=-1))
        center = np.hypot(moments["q_mean_real"], moments["q_mean_imag"])
        out[index] = _ratio(spread, np.sqrt((center**2).sum(axis=-1)))
    return out


# --- key-score agreement ------------------------------------------------------------------------


def rank_average(values) -> np.ndarray:
    """Return 1-based ranks of a 1-d array, giving tied values the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], values.size)
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[group]
    return ranks


def spearman(x, y) -> float:
    """Return Spearman's rank correlation of two equal-length arrays (NaN if either is constant)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman needs arrays of equal length, got {x.size} and {y.size}")
    rank_x = rank_average(x) - (x.size + 1) / 2.0
    rank_y = rank_average(y) - (y.size + 1) / 2.0
    denominator = math.sqrt(float((rank_x**2).sum() * (rank_y**2).sum()))
    if denominator == 0:
        return float("nan")
    return float((rank_x * rank_y).sum() / denominator)


def top_overlap(reference_scores, estimate_scores, count: int) -> float:
    """Return the share of the `count` highest-scored keys that both score arrays pick."""
    reference_scores = np.asarray(reference_scores).ravel()
    estimate_scores = np.asarray(estimate_scores).ravel()
    count = max(1, min(int(count), reference_scores.size))
    top_reference = np.argsort(-reference_scores, kind="stable")[:count]
    top_estimate = np.argsort(-estimate_scores, kind="stable")[:count]
    return np.intersect1d(top_reference, top_estimate).size / count


def pooled_scores(
    stats: Mapping, keys: Mapping[int, tuple[np.ndarray, np.ndarray]], omegas: Mapping[int, np.ndarray],
    *, offsets=FUTURE_OFFSETS, pool: str = "max",
) -> dict[int, np.ndarray]:
    """Score held-out keys with the given centers; return {layer: [kv_heads, L]}.

    `keys[layer]` is (real, imag) of pre-RoPE keys [kv_heads, L, bands] at positions 0..L-1,
    scored for the query position L - 1. Layers missing from `stats` are skipped.
    """
    out = {}
    for index in sorted(keys):
        if index not in stats:
            continue
        real, imag = keys[index]
        length = real.shape[1]
        means = layer_means(stats[index])
        scores = score_keys(
            means["q_mean_real"], means["q_mean_imag"], means["q_abs_mean"], omegas[index],
            real, imag, np.arange(length), length - 1, offsets=offsets,
        )
        out[index] = pool_gqa(scores, real.shape[0], pool)
    return out


def score_agreement(estimate_scores: Mapping[int, np.ndarray], reference_scores: Mapping[int, np.ndarray]) -> dict[str, dict[int, np.ndarray]]:
    """Compare pooled key scores; return {metric: {layer: [kv_heads]}} for spearman and overlaps."""
    out: dict[str, dict[int, np.ndarray]] = {"spearman": {}}
    for fraction in TOP_FRACTIONS:
        out[f"overlap_l{fraction}"] = {}
    for index in sorted(set(estimate_scores) & set(reference_scores)):
        estimate = estimate_scores[index]
        reference = reference_scores[index]
        length = reference.shape[1]
        out["spearman"][index] = np.array([spearman(e, r) for e, r in zip(estimate, reference)])
        for fraction in TOP_FRACTIONS:
            count = max(1, length // fraction)
            out[f"overlap_l{fraction}"][index] = np.array(
                [top_overlap(r, e, count) for e, r in zip(estimate, reference)]
            )
    return out


def summarize_agreement(per_kv: Mapping[str, Mapping[int, np.ndarray]]) -> dict[str, dict]:
    """Summarise key-score agreement over all (layer, KV head) pairs as mean and 5th percentile."""
    out = {}
    for name, per_layer in per_kv.items():
        summary = summarize_similarity(flatten_heads(per_layer)) if per_layer else {"mean": None, "p5": None}
        out[name] = {"mean": summary["mean"], "p5": summary["p5"]}
    return out
