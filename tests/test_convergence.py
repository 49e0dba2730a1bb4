"""Tests of the convergence metrics, online prefix statistics, the gate and the report."""

import json
import math

import numpy as np
import pytest

from tiny_models import tiny_llama
from triattn_hub.calibrate import calibrate
from triattn_hub.capture import find_attention_layers
from triattn_hub.convergence import (
    DEFINITIONS,
    ERROR_METRICS,
    Thresholds,
    capture_keys,
    check_reference,
    compare,
    convergence_report,
    find_n_star,
    gate,
    head_metrics,
    online_estimates,
    online_n_values,
    plan_prompts,
    plot_curves,
    pooled_scores,
    rank_average,
    render_markdown,
    score_agreement,
    spearman,
    summarize,
    summarize_agreement,
    top_overlap,
)
from triattn_hub.rope import merge_bands
from triattn_hub.scoring import score_keys
from triattn_hub.stats import BandStats


def _means(real, imag, abs_mean):
    return {
        "q_mean_real": np.asarray(real, dtype=float),
        "q_mean_imag": np.asarray(imag, dtype=float),
        "q_abs_mean": np.asarray(abs_mean, dtype=float),
    }


def _random_means(seed, heads=4, bands=8):
    rng = np.random.default_rng(seed)
    real, imag = rng.normal(size=(2, heads, bands))
    return _means(real, imag, np.hypot(real, imag) * rng.uniform(1.1, 2.0, size=(heads, bands)))


# --- per-head metrics ---------------------------------------------------------------------------


def test_identical_estimates_are_perfect():
    means = _random_means(0)
    metrics = head_metrics(means, means)
    np.testing.assert_allclose(metrics["cosine"], 1.0)
    for name in ERROR_METRICS:
        np.testing.assert_allclose(metrics[name], 0.0, atol=1e-12, err_msg=name)


def test_phase_rotation_lowers_real_cosine_only():
    reference = _random_means(1)
    theta = 0.3
    center = (reference["q_mean_real"] + 1j * reference["q_mean_imag"]) * np.exp(1j * theta)
    rotated = _means(center.real, center.imag, reference["q_abs_mean"])
    metrics = head_metrics(rotated, reference)

    # Rotating every band by theta makes the real-vector cosine exactly cos(theta).
    np.testing.assert_allclose(metrics["cosine"], math.cos(theta), rtol=1e-12)
    np.testing.assert_allclose(metrics["phase_error"], theta, rtol=1e-12)
    np.testing.assert_allclose(metrics["abs_rel_error"], 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics["mrl_error_dominant"], 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics["mrl_error_energy"], 0.0, atol=1e-12)
    # The magnitude of the complex cosine would not see the rotation at all.
    complex_cosine = np.abs((center * np.conj(center / np.exp(1j * theta))).sum(axis=-1)) / (np.abs(center) ** 2).sum(axis=-1)
    np.testing.assert_allclose(complex_cosine, 1.0)


def test_head_metrics_by_hand():
    # One head, three bands. Reference centers 1, 2i, 0.5 with E|q| = 2, 2, 1.
    # Estimate centers 1 + i, 2i, 0.5 with E|q| = 2, 3, 1.
    reference = _means([[1.0, 0.0, 0.5]], [[0.0, 2.0, 0.0]], [[2.0, 2.0, 1.0]])
    estimate = _means([[1.0, 0.0, 0.5]], [[1.0, 2.0, 0.0]], [[2.0, 3.0, 1.0]])
    metrics = head_metrics(estimate, reference)

    # Real vectors (1, 0, 0.5, 0, 2, 0) and (1, 0, 0.5, 1, 2, 0): dot 5.25, norms sqrt(5.25), sqrt(6.25).
    assert metrics["cosine"][0] == pytest.approx(5.25 / math.sqrt(5.25 * 6.25))
    # Center difference (i, 0, 0) against ||(1, 2i, 0.5)|| = sqrt(5.25).
    assert metrics["center_rel_error"][0] == pytest.approx(1 / math.sqrt(5.25))
    # E|q| difference (0, 1, 0) against ||(2, 2, 1)|| = 3.
    assert metrics["abs_rel_error"][0] == pytest.approx(1 / 3)
    # Only band 0 turns, by pi/4, with weight |c_B| = 1 out of 1 + 2 + 0.5.
    assert metrics["phase_error"][0] == pytest.approx((math.pi / 4) / 3.5)
    # R_B = (0.5, 1, 0.5) and R_A = (sqrt(2)/2, 2/3, 0.5); bands 0 and 1 are dominant (E|q| = 2).
    diff = [math.sqrt(2) / 2 - 0.5, 1 - 2 / 3, 0.0]
    assert metrics["mrl_error_dominant"][0] == pytest.approx((diff[0] + diff[1]) / 2)
    # Energy weights (E_B|q|)^2 = 4, 4, 1.
    assert metrics["mrl_error_energy"][0] == pytest.approx((4 * diff[0] + 4 * diff[1]) / 9)


def test_dominant_bands_follow_reference_magnitude():
    # Band 2 has the largest E|q| and band 0 the second; band 1's error must not count.
    reference = _means([[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]], [[2.0, 1.5, 3.0]])
    estimate = _means([[1.0, 0.1, 1.0]], [[0.0, 0.0, 0.0]], [[2.0, 1.5, 3.0]])
    metrics = head_metrics(estimate, reference)
    assert metrics["mrl_error_dominant"][0] == pytest.approx(0.0)
    assert metrics["mrl_error_energy"][0] > 0.0


def test_summaries_use_percentiles_per_kind():
    per_head = {"cosine": {0: np.array([1.0, 0.9]), 3: np.array([0.5, 0.8])}, "phase_error": {0: np.array([0.1, 0.2]), 3: np.array([0.3, 0.4])}}
    summary = summarize(per_head)
    assert summary["cosine"]["mean"] == pytest.approx(0.8)
    assert summary["cosine"]["min"] == pytest.approx(0.5)
    assert summary["cosine"]["p5"] == pytest.approx(np.percentile([1.0, 0.9, 0.5, 0.8], 5))
    assert summary["phase_error"]["max"] == pytest.approx(0.4)
    assert summary["phase_error"]["p95"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 95))
    assert set(summary["phase_error"]) == {"mean", "p95", "max"}


# --- ranks and overlaps ---------------------------------------------------------------------------


def test_rank_average_with_ties():
    np.testing.assert_allclose(rank_average([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    np.testing.assert_allclose(rank_average([5.0, 5.0, 5.0]), [2.0, 2.0, 2.0])


def test_spearman_by_hand_with_ties():
    # Ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): centred products sum to 4.5, squares to 4.5 and 5.
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    x = rng.integers(0, 6, size=50).astype(float)
    y = x + rng.integers(0, 4, size=50)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)


def test_top_overlap_by_hand():
    reference = np.array([9.0, 8.0, 7.0, 1.0, 0.0])
    estimate = np.array([9.0, 0.0, 7.0, 8.0, 1.0])
    # Top 2: {0, 1} against {0, 3}; top 3: {0, 1, 2} against {0, 3, 2}.
    assert top_overlap(reference, estimate, 2) == pytest.approx(0.5)
    assert top_overlap(reference, estimate, 3) == pytest.approx(2 / 3)
    assert top_overlap(reference, reference, 3) == pytest.approx(1.0)


def _layer_keys(seed, kv_heads=2, length=64, bands=8):
    rng = np.random.default_rng(seed)
    return tuple(rng.normal(size=(2, kv_heads, length, bands)))


def test_identical_centers_agree_on_key_scores():
    means = {0: _random_means(2), 1: _random_means(3)}
    keys = {0: _layer_keys(4), 1: _layer_keys(5)}
    omegas = {0: 10000.0 ** (-np.arange(8) / 8), 1: 10000.0 ** (-np.arange(8) / 8)}
    scores = pooled_scores(means, keys, omegas)
    assert scores[0].shape == (2, 64)
    summary = summarize_agreement(score_agreement(scores, scores))
    for name in ("spearman", "overlap_l16", "overlap_l8", "overlap_l4"):
        assert summary[name]["mean"] == pytest.approx(1.0), name
        assert summary[name]["p5"] == pytest.approx(1.0), name


def test_different_centers_lower_key_agreement():
    omegas = {0: 10000.0 ** (-np.arange(8) / 8)}
    keys = {0: _layer_keys(6)}
    reference = pooled_scores({0: _random_means(7)}, keys, omegas)
    estimate = pooled_scores({0: _random_means(8)}, keys, omegas)
    summary = summarize_agreement(score_agreement(estimate, reference))
    assert summary["spearman"]["mean"] < 0.9
    assert summary["overlap_l16"]["mean"] < 1.0


# --- the gate -------------------------------------------------------------------------------------


def _sequence_stats(concentrated, *, sequences=4, tokens=256, heads=4, bands=8, seed=0):
    """Per-sequence BandStats of synthetic queries; concentrated[layer][head] picks the kind.

    Concentrated heads have a fixed center per band plus 5 % noise; the others are isotropic
    Gaussian noise with mean zero.
    """
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(concentrated), heads, bands)) + 1j * rng.normal(size=(len(concentrated), heads, bands))
    out = []
    for _ in range(sequences):
        per_layer = {}
        for layer, kinds in enumerate(concentrated):
            noise = rng.normal(size=(2, heads, tokens, bands))
            real = np.where(np.array(kinds)[:, None, None], centers[layer].real[:, None, :] + 0.05 * noise[0], noise[0])
            imag = np.where(np.array(kinds)[:, None, None], centers[layer].imag[:, None, :] + 0.05 * noise[1], noise[1])
            stats = BandStats(heads, bands)
            stats.update(real, imag)
            per_layer[layer] = stats
        out.append(per_layer)
    return out


def test_gate_passes_concentrated_heads():
    report = check_reference(_sequence_stats([[True] * 4, [True] * 4]))
    verdict = gate(report, Thresholds())
    assert verdict["verdict"] == "passed"
    assert verdict["failing_heads"] == []
    assert verdict["hint"] is None
    assert report["split_half"]["metrics"]["cosine"]["min"] > 0.999


def test_gate_fails_isotropic_head_and_names_it():
    report = check_reference(_sequence_stats([[True] * 4, [True, True, False, True]]))
    verdict = gate(report, Thresholds())
    assert verdict["verdict"] == "failed"
    assert [(h["layer"], h["head"]) for h in verdict["failing_heads"]] == [(1, 2)]
    assert verdict["failing_layers"] == [1]
    assert set(verdict["failing_heads"][0]["failed"]) == {"split_half_cosine", "relative_se"}
    assert "longer corpus" in verdict["hint"]


def test_gate_fails_isotropic_model():
    report = check_reference(_sequence_stats([[False] * 4, [False] * 4]))
    verdict = gate(json.loads(json.dumps(report)), Thresholds())
    assert verdict["verdict"] == "failed"
    assert verdict["failing_head_count"] == 8
    assert not any(check["passed"] for check in verdict["checks"])


def test_gate_fails_single_sequence():
    report = check_reference(_sequence_stats([[True] * 4], sequences=1))
    verdict = gate(report, Thresholds())
    assert report["split_half"] is None
    assert verdict["verdict"] == "failed"
    assert "fills at least two" in verdict["hint"]


def test_interleaved_split_ignores_content_order():
    # Sequences 0, 1 come from one kind of text and 2, 3 from another with other centers, so the
    # contiguous halves disagree while even against odd sequences see the same mix.
    first_kind = _sequence_stats([[True] * 4], sequences=2, seed=1)
    second_kind = _sequence_stats([[True] * 4], sequences=2, seed=2)
    report = check_reference(first_kind + second_kind)
    assert report["split_half"]["metrics"]["cosine"]["mean"] < 0.95
    assert report["split_interleaved"]["metrics"]["cosine"]["min"] > 0.999
    assert gate(report, Thresholds())["verdict"] == "failed"


def test_n_star_is_first_n_at_noise_floor():
    floor = {"p5": 0.95}
    overlap = {f"overlap_l{f}": {"mean": 0.8, "p5": 0.7} for f in (16, 8, 4)}
    report = {
        "split_half": {"metrics": {"cosine": floor}, "key_agreement": overlap},
        "online": [
            {"n": 32, "metrics": {"cosine": {"p5": 0.90}}, "key_agreement": overlap},
            {"n": 64, "metrics": {"cosine": {"p5": 0.945}}, "key_agreement": {**overlap, "overlap_l4": {"mean": 0.70}}},
            {"n": 128, "metrics": {"cosine": {"p5": 0.945}}, "key_agreement": {**overlap, "overlap_l4": {"mean": 0.73}}},
        ],
    }
    # N = 32 misses the cosine margin and N = 64 misses 0.9 x 0.8 = 0.72 on the L/4 overlap.
    assert find_n_star(report, Thresholds(n_star_cosine_margin=0.01, n_star_overlap_ratio=0.9)) == 128
    assert find_n_star(report, Thresholds(n_star_cosine_margin=0.001)) is None


def test_plan_prompts_stays_within_budget():
    n_values = online_n_values(4096)
    assert n_values == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    plan = plan_prompts([5000, 100, 3000, 20, 4096], n_values, budget=6000)
    assert plan == [4096, 64, 1024, 0, 512]
    assert sum(plan) <= 6000


# --- with a model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=3)


def test_online_prefix_stats_equal_separate_prefills(model):
    layers = find_attention_layers(model)
    rng = np.random.default_rng(9)
    prompt = rng.integers(1, 97, size=40)
    # Chunks of 7 tokens put every N inside a chunk, so the splitting is exercised.
    estimates = online_estimates(model, [prompt, prompt[:10]], [8, 16, 32], layers, chunk_size=7)
    assert [len(estimates[n]) for n in (8, 16, 32)] == [2, 1, 1]
    for n in (8, 16, 32):
        separate = calibrate(model, prompt[:n], sequence_length=n, progress=False, model_layers=layers).merged()
        for index, stats in estimates[n][0].items():
            assert stats.count == n
            got = stats.means()
            want = separate[index].means()
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=f"N={n} layer {index} {name}")


def test_report_on_tiny_model(model, tmp_path):
    layers = find_attention_layers(model)
    rng = np.random.default_rng(11)
    calibration = calibrate(model, rng.integers(1, 97, size=1024), sequence_length=256, progress=False, model_layers=layers)
    prompts = [rng.integers(1, 97, size=200) for _ in range(3)]
    heldout = rng.integers(1, 97, size=128)
    report = convergence_report(calibration, model, prompts, heldout, Thresholds())

    text = json.dumps(report, allow_nan=False)
    assert "per_head" not in report
    assert report["verdict"] in ("passed", "failed")
    assert set(report["definitions"]) == set(DEFINITIONS)
    assert report["split_half"]["sequences"] == [2, 2]
    assert report["split_interleaved"]["sequences"] == [2, 2]
    assert report["heldout"]["tokens"] == 128
    assert [entry["n"] for entry in report["online"]] == [32, 64, 128]
    assert all(entry["prompts"] == 3 for entry in report["online"])
    assert report["cost"]["prompt_tokens"] + report["cost"]["heldout_tokens"] <= report["cost"]["calibration_tokens"]
    assert len(text) < 20000

    markdown = render_markdown(report)
    assert "| split half |" in markdown
    assert "| even/odd sequences |" in markdown
    assert "| online N=128 | 3 |" in markdown
    png = plot_curves(report, tmp_path / "curves.png")
    assert png is not None
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_llama_on_random_tokens_fails_gate(model):
    # Random tokens through random weights give queries with no stable direction per band.
    layers = find_attention_layers(model)
    rng = np.random.default_rng(12)
    calibration = calibrate(model, rng.integers(1, 97, size=512), sequence_length=128, progress=False, model_layers=layers)
    report = check_reference(calibration.sequence_stats, sequence_length=128)
    verdict = gate(report, Thresholds())
    assert verdict["verdict"] == "failed"
    assert verdict["failing_head_count"] > 0
    assert verdict["failing_heads"][0]["layer"] in {layer.index for layer in layers.layers}


# --- with SmolLM2-135M ----------------------------------------------------------------------------

TEXT = (
    "A lighthouse keeper writes the weather into a log every evening: the wind, the height of the "
    "swell, the ships that passed and the hour the lamp was lit. Over forty years the log fills "
    "eleven volumes. Read in order, the entries show the slow arrival of radio, then radar, then the "
    "automatic lamp that made the keeper's job unnecessary. The last entry is short. It says that the "
    "lamp was lit, that the sea was calm, and that the keeper handed the key to the harbour office."
)


@pytest.fixture(scope="module")
def smollm2():
    from triattn_hub.gguf_model import load_gguf, smollm2_gguf_path

    model, tokenizer, _ = load_gguf(smollm2_gguf_path())
    return model, tokenizer, find_attention_layers(model)


def test_smollm2_prefix_stats_equal_prefill(smollm2):
    model, tokenizer, layers = smollm2
    ids = np.asarray(tokenizer.encode(TEXT))
    assert ids.size >= 96
    estimates = online_estimates(model, [ids[:96]], [32, 64], layers, chunk_size=40)
    separate = calibrate(model, ids[:64], sequence_length=64, progress=False, model_layers=layers).merged()
    for index, stats in estimates[64][0].items():
        got = stats.means()
        want = separate[index].means()
        for name in ("q_mean_real", "q_mean_imag", "q_abs_mean"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3, err_msg=f"layer {index} {name}")


def test_smollm2_scores_equal_rotated_dot_products(smollm2):
    # Scores of the captured keys for one future offset must equal RoPE(center, t) . RoPE(k, p)
    # computed with the model's own RoPE module, query head h against KV head h // 3.
    import mlx.core as mx

    model, tokenizer, layers = smollm2
    ids = np.asarray(tokenizer.encode(TEXT))[:48]
    keys = capture_keys(model, layers, ids)
    assert len(keys) == 30
    center = online_estimates(model, [ids], [48], layers)[48][0]
    for layer in (layers.layers[0], layers.layers[17]):
        real, imag = keys[layer.index]
        assert real.shape == (3, 48, 32)
        means = center[layer.index].means()
        query_position, offset = 47, 100
        scores = score_keys(
            means["q_mean_real"], means["q_mean_imag"], means["q_abs_mean"], layer.rope.omega, real, imag,
            np.arange(48), query_position, offsets=(offset,), norm_term="none",
        )

        rope = layer.attention.rope
        center_vectors = merge_bands(means["q_mean_real"], means["q_mean_imag"], layer.rope.layout, layer.head_dim)
        rotated_centers = np.array(rope(mx.array(center_vectors[None, :, None, :].astype(np.float32)), offset=query_position + offset))[0, :, 0]
        key_vectors = merge_bands(real, imag, layer.rope.layout, layer.head_dim)
        rotated_keys = np.array(rope(mx.array(key_vectors[None].astype(np.float32)), offset=0))[0]
        expected = np.einsum("hd,hnd->hn", rotated_centers, np.repeat(rotated_keys, 3, axis=0))
        np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())

