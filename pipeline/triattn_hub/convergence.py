"""Convergence check of a calibration: metrics, online estimates, key-score agreement and the gate.

Two estimates of a layer's statistics (each `q_mean_real`, `q_mean_imag`, `q_abs_mean` of shape
[heads, bands], or a `BandStats`) are compared head by head with the metrics in `DEFINITIONS`.
The check compares:

- the split-half pair: the first half of the calibration's sequences against the second half.
  Their disagreement is the noise floor of the offline calibration.
- online estimates: the statistics of the first N tokens of one prompt's own prefill, for N
  doubling from 32, against the full calibration (the reference).
- key scores: held-out pre-RoPE keys scored with both sets of centers (`scoring.score_keys`,
  pooled per KV head), compared by Spearman rank correlation and top-B overlap.

`gate` decides whether the calibration may be published. Every function over statistics is pure
numpy; `capture_keys`, `online_estimates` and `convergence_report` run the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .convergence_metrics import (  # noqa: F401  (re-exported: callers use convergence.*)
    DEFINITIONS,
    ERROR_METRICS,
    MEAN_NAMES,
    SIMILARITY_METRICS,
    TOP_FRACTIONS,
    compare,
    flatten_heads,
    head_metrics,
    json_number,
    layer_means,
    pooled_scores,
    rank_average,
    relative_standard_errors,
    score_agreement,
    spearman,
    summarize,
    summarize_agreement,
    summarize_error,
    summarize_similarity,
    top_overlap,
)
from .convergence_render import plot_curves, render_markdown  # noqa: F401  (re-exported)
from .errors import ConvergenceError
from .stats import BandStats

logger = logging.getLogger(__name__)

MIN_ONLINE_TOKENS = 32
MAX_ONLINE_TOKENS = 4096
# Cap on the failing heads listed in the manifest. The count is always complete.
MAX_LISTED_HEADS = 64


@dataclass(frozen=True)
class Thresholds:
    """Limits of the publishing gate and of the N* criterion."""

    # Measured on SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32, mlx 0.32 CPU) with
    # built-in corpus v1: 51,901 tokens in 7 sequences of up to 8192 tokens.
    #   split-half cosine p5: 0.989 (min 0.985). Even against odd sequences: p5 0.998.
    #   The first 16,384 / 32,768 / 49,152 tokens alone: p5 0.960 / 0.973 / 0.987.
    #   relative SE p95: 0.0040 (max 0.0050), and 0.0069 for the first 16,384 tokens.
    #   A tiny random llama on 1,024 random tokens: cosine p5 0.66, relative SE p95 0.39.
    # 0.97 passes the full corpus with 0.02 to spare and fails halves of 8k tokens that differ
    # in content. 0.05 passes every real measurement above and fails heads whose center is
    # within noise. NOTE: only this one model was measured, so other models may need other limits.
    min_split_half_cosine_p5: float = 0.97
    max_relative_se_p95: float = 0.05
    # N* criterion: online cosine p5 within this margin of the split-half p5, and mean top-B
    # overlaps at least this share of the split-half overlaps.
    n_star_cosine_margin: float = 0.01
    n_star_overlap_ratio: float = 0.9

    def to_json(self) -> dict:
        return asdict(self)


# --- the reference and the gate -----------------------------------------------------------------


def split_halves(sequence_stats: Sequence[Mapping[int, BandStats]]) -> tuple[dict, dict] | None:
    """Merge the first half and the second half of the sequences; None with fewer than two."""
    if len(sequence_stats) < 2:
        return None
    middle = len(sequence_stats) // 2
    return _merge(sequence_stats[:middle]), _merge(sequence_stats[middle:])


def _merge(sequence_stats: Sequence[Mapping[int, BandStats]]) -> dict[int, BandStats]:
    total: dict[int, BandStats] = {}
    for stats in sequence_stats:
        for index, layer_stats in stats.items():
            total[index] = layer_stats if index not in total else total[index].merge(layer_stats)
    return total


def _per_head_json(per_layer: Mapping[int, np.ndarray]) -> dict[str, list]:
    return {str(index): [json_number(v) for v in np.asarray(values).ravel()] for index, values in sorted(per_layer.items())}


def check_reference(
    sequence_stats: Sequence[Mapping[int, BandStats]],
    *,
    sequence_length: int | None = None,
    context_length: int | None = None,
) -> dict:
    """Measure how well the offline calibration has converged, from its per-sequence statistics.

    Returns the report parts that `gate` reads: `reference` (tokens, sequences), `split_half`
    (summaries, or None with fewer than two sequences), `standard_error` and `per_head` (the
    split-half cosine and relative SE of every (layer, query head), keyed by layer as a string).
    `split_interleaved` compares the even-numbered with the odd-numbered sequences for context:
    the gate does not read it.
    """
    if not sequence_stats:
        raise ConvergenceError("the calibration has no sequences; calibrate on a non-empty corpus first")
    reference = _merge(sequence_stats)
    first_layer = min(reference)
    relative_se = relative_standard_errors(reference)
    report = {
        "reference": {
            "tokens": int(reference[first_layer].count),
            "sequences": len(sequence_stats),
            "sequence_length": sequence_length,
            "context_length": context_length,
        },
        "split_half": None,
        "split_interleaved": None,
        "standard_error": {"relative_se": summarize_error(flatten_heads(relative_se))},
        "per_head": {"relative_se": _per_head_json(relative_se), "split_half_cosine": None},
    }
    halves = split_halves(sequence_stats)
    if halves is not None:
        first, second = halves
        per_head = compare(first, second)
        middle = len(sequence_stats) // 2
        report["split_half"] = {
            "sequences": [middle, len(sequence_stats) - middle],
            "tokens": [int(first[first_layer].count), int(second[first_layer].count)],
            "metrics": summarize(per_head),
        }
        report["per_head"]["split_half_cosine"] = _per_head_json(per_head["cosine"])
        even = _merge(sequence_stats[0::2])
        odd = _merge(sequence_stats[1::2])
        report["split_interleaved"] = {
            "sequences": [len(sequence_stats[0::2]), len(sequence_stats[1::2])],
            "metrics": summarize(compare(even, odd)),
        }
    return report


def _threshold_values(thresholds) -> Thresholds:
    if thresholds is None:
        return Thresholds()
    if isinstance(thresholds, Thresholds):
        return thresholds
    return Thresholds(**thresholds)


def _failing_heads(report: dict, limits: Thresholds) -> list[dict]:
    per_head = report.get("per_head") or {}
    cosines = per_head.get("split_half_cosine") or {}
    relative_se = per_head.get("relative_se") or {}
    failing = []
    for layer in sorted({*cosines, *relative_se}, key=int):
        layer_cosines = cosines.get(layer) or []
        layer_se = relative_se.get(layer) or []
        for head in range(max(len(layer_cosines), len(layer_se))):
            cosine = layer_cosines[head] if head < len(layer_cosines) else None
            se = layer_se[head] if head < len(layer_se) else None
            reasons = []
            if cosine is not None and cosine < limits.min_split_half_cosine_p5:
                reasons.append("split_half_cosine")
            # None means an infinite relative error: the center is zero.
            if head < len(layer_se) and (se is None or se > limits.max_relative_se_p95):
                reasons.append("relative_se")
            if reasons:
                failing.append(
                    {"layer": int(layer), "head": head, "split_half_cosine": cosine, "relative_se": se, "failed": reasons}
                )
    return failing


def gate(report: dict, thresholds=None) -> dict:
    """Decide whether a calibration is converged enough to publish.

    Passes when the split-half cosine p5 is at least `min_split_half_cosine_p5` and the
    relative-SE p95 is at most `max_relative_se_p95`. Reads the keys `check_reference` returns.
    The verdict lists every (layer, head) that misses a threshold on its own, even when the
    percentiles pass, and a hint of what to change.
    """
    limits = _threshold_values(thresholds)
    split_half = report.get("split_half")
    cosine_p5 = split_half["metrics"]["cosine"]["p5"] if split_half else None
    se_p95 = report["standard_error"]["relative_se"]["p95"]
    checks = [
        {
            "name": "split_half_cosine_p5",
            "value": cosine_p5,
            "limit": limits.min_split_half_cosine_p5,
            "passed": cosine_p5 is not None and cosine_p5 >= limits.min_split_half_cosine_p5,
        },
        {
            "name": "relative_se_p95",
            "value": se_p95,
            "limit": limits.max_relative_se_p95,
            "passed": se_p95 is not None and se_p95 <= limits.max_relative_se_p95,
        },
    ]
    passed = all(check["passed"] for check in checks)
    failing = _failing_heads(report, limits)
    return {
        "verdict": "passed" if passed else "failed",
        "checks": checks,
        "failing_head_count": len(failing),
        "failing_layers": sorted({head["layer"] for head in failing}),
        "failing_heads": failing[:MAX_LISTED_HEADS],
        "hint": None if passed else _hint(report, checks, len(failing)),
    }


def _hint(report: dict, checks: list[dict], failing_count: int) -> str:
    reference = report.get("reference", {})
    sequence_length = reference.get("sequence_length")
    context = reference.get("context_length")
    if report.get("split_half") is None:
        return (
            f"The corpus fills {reference.get('sequences')} sequence(s), so no split-half comparison "
            "exists. Calibrate on a longer corpus, or lower sequence_length, so that it fills at least two."
        )
    sentences = [f"{failing_count} (layer, head) pairs miss a threshold."]
    if not checks[0]["passed"]:
        sentences.append(
            f"The two halves of the {reference.get('tokens')}-token corpus disagree on the Q-centers. "
            "Calibrate on a longer corpus: the split-half error shrinks roughly with 1 / sqrt(tokens)."
        )
    if not checks[1]["passed"]:
        sentences.append(
            "The standard error of the Q-centers is large against their norm, as for heads whose "
            "queries are not concentrated. A longer corpus lowers it."
        )
    if sequence_length is not None and context is not None and sequence_length < context:
        sentences.append(
            f"The sequences are {sequence_length} tokens long but the model's context is {context}: "
            "a longer sequence_length also covers the statistics of later positions."
        )
    return " ".join(sentences)


def find_n_star(report: dict, thresholds=None) -> int | None:
    """Return the smallest online N that reaches the split-half noise floor (see DEFINITIONS)."""
    limits = _threshold_values(thresholds)
    split_half = report.get("split_half")
    if not split_half or not split_half.get("key_agreement"):
        return None
    floor_cosine = split_half["metrics"]["cosine"]["p5"]
    floor_overlaps = {f"overlap_l{f}": split_half["key_agreement"][f"overlap_l{f}"]["mean"] for f in TOP_FRACTIONS}
    for entry in sorted(report.get("online", []), key=lambda e: e["n"]):
        cosine = entry["metrics"]["cosine"]["p5"]
        if cosine is None or floor_cosine is None or cosine < floor_cosine - limits.n_star_cosine_margin:
            continue
        agreement = entry.get("key_agreement") or {}
        if all(
            agreement.get(name, {}).get("mean") is not None
            and floor is not None
            and agreement[name]["mean"] >= limits.n_star_overlap_ratio * floor
            for name, floor in floor_overlaps.items()
        ):
            return int(entry["n"])
    return None


# --- running the model --------------------------------------------------------------------------


def capture_keys(model, model_layers, token_ids, *, chunk_size: int | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Run one sequence and return its pre-RoPE keys per layer as (real, imag) [kv_heads, L, bands].

    Layers that reuse another layer's keys (no key of their own reaches RoPE) are left out.
    """
    import mlx.core as mx

    from .calibrate import DEFAULT_CHUNK_SIZE, run_sequence
    from .capture import RopeTaps
    from .rope import split_bands

    sequence = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if sequence.size == 0:
        raise ConvergenceError("the held-out sequence is empty; give at least one token")
    layers = model_layers.layers
    pieces: dict[int, list[np.ndarray]] = {layer.index: [] for layer in layers}

    def collect(start, captured):
        for layer in layers:
            keys = captured[layer.index].keys
            if keys is not None:
                pieces[layer.index].append(np.asarray(keys.astype(mx.float32))[0])

    with RopeTaps(layers) as taps:
        run_sequence(model, layers, taps, sequence, chunk_size or DEFAULT_CHUNK_SIZE, collect)

    out = {}
    for layer in layers:
        if not pieces[layer.index]:
            logger.info("layer %d has no keys of its own; it is left out of the key-score check", layer.index)
            continue
        keys = np.concatenate(pieces[layer.index], axis=1)
        out[layer.index] = split_bands(keys, layer.rope.layout, layer.rope.rotary_dims)
    return out


def online_n_values(limit: int, *, start: int = MIN_ONLINE_TOKENS) -> list[int]:
    """Return start, 2 start, 4 start, ... up to `limit` tokens."""
    values = []
    n = start
    while n <= limit:
        values.append(n)
        n *= 2
    return values


def _snapshot(stats: Mapping[int, BandStats]) -> dict[int, BandStats]:
    return {
        index: BandStats(s.n_heads, s.n_bands, s.count, {name: total.copy() for name, total in s.sums.items()})
        for index, s in stats.items()
    }


def online_estimates(
    model, prompts_token_ids, n_values, model_layers, *, chunk_size: int | None = None, progress: bool = False
) -> dict[int, list[dict[int, BandStats]]]:
    """Return the statistics of the first N tokens of each prompt, for every N in `n_values`.

    Each prompt runs once, up to the largest N it reaches, in chunks through the KV cache. In a
    causal model the queries of the first N tokens do not depend on later tokens, so the running
    sums taken at token N equal the statistics of a prefill of the first N tokens. The result
    maps N to one per-layer statistics dict per prompt with at least N tokens, in prompt order.
    """
    import mlx.core as mx

    from .calibrate import DEFAULT_CHUNK_SIZE, run_sequence
    from .capture import RopeTaps
    from .rope import split_bands

    n_values = sorted({int(n) for n in n_values})
    if not n_values or n_values[0] < 1:
        raise ConvergenceError(f"n_values={n_values} must be positive token counts")
    layers = model_layers.layers
    result: dict[int, list[dict[int, BandStats]]] = {n: [] for n in n_values}

    from tqdm.auto import tqdm

    with RopeTaps(layers) as taps:
        for prompt in tqdm(prompts_token_ids, desc="online estimates", unit="prompt", disable=not progress):
            ids = np.asarray(prompt, dtype=np.int64).reshape(-1)
            pending = [n for n in n_values if n <= ids.size]
            if not pending:
                continue
            running = {layer.index: BandStats(layer.n_q_heads, layer.rope.n_bands) for layer in layers}

            def accumulate(start, captured, running=running, pending=pending):
                band_parts = {}
                for layer in layers:
                    queries = np.asarray(captured[layer.index].queries.astype(mx.float32))[0]
                    band_parts[layer.index] = split_bands(queries, layer.rope.layout, layer.rope.rotary_dims)
                end = start + next(iter(band_parts.values()))[0].shape[1]
                cut = start
                # Split the chunk at every N it contains and snapshot the sums there.
                while cut < end:
                    stop = min(pending[0], end) if pending else end
                    for index, (real, imag) in band_parts.items():
                        running[index].update(real[:, cut - start : stop - start], imag[:, cut - start : stop - start])
                    cut = stop
                    if pending and cut == pending[0]:
                        result[pending.pop(0)].append(_snapshot(running))

            run_sequence(model, layers, taps, ids[: pending[-1]], chunk_size or DEFAULT_CHUNK_SIZE, accumulate)
    return result


def plan_prompts(lengths: Sequence[int], n_values: Sequence[int], budget: int) -> list[int]:
    """Return how many tokens of each prompt to prefill so that the total stays within `budget`.

    Prompts are taken in order. Each one gets the largest N of `n_values` that fits both its
    length and the remaining budget, or 0 when none fits.
    """
    remaining = int(budget)
    plan = []
    for length in lengths:
        fitting = [n for n in n_values if n <= length and n <= remaining]
        chosen = max(fitting) if fitting else 0
        plan.append(chosen)
        remaining -= chosen
    return plan


def _mean_of_summaries(summaries: list[dict]) -> dict:
    """Average nested summary dicts field by field, skipping None values."""
    out = {}
    for name in summaries[0]:
        out[name] = {}
        for field_name in summaries[0][name]:
            values = [s[name][field_name] for s in summaries if s[name][field_name] is not None]
            out[name][field_name] = json_number(np.mean(values)) if values else None
    return out


def _online_section(online, reference, reference_scores, keys, omegas) -> list[dict]:
    entries = []
    for n in sorted(online):
        estimates = online[n]
        if not estimates:
            continue
        metrics = []
        agreements = []
        for estimate in estimates:
            metrics.append(summarize(compare(estimate, reference)))
            scores = pooled_scores(estimate, keys, omegas)
            agreements.append(summarize_agreement(score_agreement(scores, reference_scores)))
        entries.append(
            {
                "n": int(n),
                "prompts": len(estimates),
                "metrics": _mean_of_summaries(metrics),
                "key_agreement": _mean_of_summaries(agreements),
            }
        )
    return entries


def convergence_report(
    calibration,
    model,
    prompts_token_ids,
    heldout_token_ids=None,
    thresholds=None,
    *,
    chunk_size: int | None = None,
    keep_per_head: bool = False,
    progress: bool = False,
) -> dict:
    """Check a calibration's convergence and return the `convergence` section of its manifest.

    `prompts_token_ids` are token id arrays of held-out prompts and `heldout_token_ids` is one
    held-out sequence, by default the prompts joined end to end. Neither may come from the
    calibration corpus. The check adds at most the calibration's own token count in forward passes: the
    held-out sequence is cut to min(its length, the calibration sequence length, half the
    calibration tokens), and the prompt prefills share what remains (see `plan_prompts`).
    The split-half comparison reuses the calibration's per-sequence statistics.
    """
    from .calibrate import context_length

    limits = _threshold_values(thresholds)
    started = time.perf_counter()
    model_layers = calibration.model_layers
    chunk_size = chunk_size or calibration.chunk_size
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts_token_ids]

    context = context_length(model)
    report = check_reference(
        calibration.sequence_stats, sequence_length=calibration.sequence_length, context_length=context
    )
    budget = report["reference"]["tokens"]

    if heldout_token_ids is None:
        heldout_token_ids = np.concatenate(prompts) if prompts else np.zeros(0, dtype=np.int64)
    heldout = np.asarray(heldout_token_ids, dtype=np.int64).reshape(-1)
    heldout = heldout[: min(heldout.size, calibration.sequence_length, max(budget // 2, 1))]
    keys = capture_keys(model, model_layers, heldout, chunk_size=chunk_size)
    omegas = {layer.index: layer.rope.omega for layer in model_layers.layers}
    reference = calibration.merged()
    reference_scores = pooled_scores(reference, keys, omegas)
    report["heldout"] = {
        "tokens": int(heldout.size),
        "query_position": int(heldout.size - 1),
        "top_b": {f"l{f}": max(1, int(heldout.size) // f) for f in TOP_FRACTIONS},
        "layers": len(keys),
    }

    if report["split_half"] is not None:
        first, second = split_halves(calibration.sequence_stats)
        report["split_half"]["key_agreement"] = summarize_agreement(
            score_agreement(pooled_scores(first, keys, omegas), pooled_scores(second, keys, omegas))
        )

    limit = min(MAX_ONLINE_TOKENS, context or MAX_ONLINE_TOKENS)
    n_values = online_n_values(limit)
    plan = plan_prompts([p.size for p in prompts], n_values, budget - heldout.size)
    planned = [p[:n] for p, n in zip(prompts, plan) if n > 0]
    if len(planned) < len(prompts):
        logger.info("convergence check prefills %d of %d prompts to stay within %d tokens", len(planned), len(prompts), budget)
    online = online_estimates(model, planned, n_values, model_layers, chunk_size=chunk_size, progress=progress) if planned else {}
    report["online"] = _online_section(online, reference, reference_scores, keys, omegas)
    report["n_star"] = find_n_star(report, limits)

    verdict = gate(report, limits)
    report["verdict"] = verdict.pop("verdict")
    report["gate"] = verdict
    report["thresholds"] = limits.to_json()
    report["definitions"] = dict(DEFINITIONS)
    report["cost"] = {
        "calibration_tokens": budget,
        "calibration_seconds": json_number(calibration.seconds),
        "heldout_tokens": int(heldout.size),
        "prompt_tokens": int(sum(plan)),
        "prompts_used": len(planned),
        "prompts_given": len(prompts),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if not keep_per_head:
        report.pop("per_head")
    logger.info(
        "convergence check: verdict %s, N* %s, %d failing heads",
        report["verdict"], report["n_star"], verdict["failing_head_count"],
    )
    return report
