"""Calibration on tiny random llama models: the dot-product identity and streaming sums."""

import numpy as np
import mlx.core as mx
import pytest

from tiny_models import tiny_llama
from triattn_hub.calibrate import calibrate, split_sequences
from triattn_hub.capture import RopeTaps, find_attention_layers
from triattn_hub.rope import merge_bands, split_bands
from triattn_hub.stats import BandStats, mean_resultant_length

ROPE_CASES = {
    "half": {},
    "traditional": {"traditional": True},
    "linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
}
POSITIONS = [(0, 5), (100, 4000), (2000, 2001), (33000, 40000)]


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(2, 97, n)


@pytest.fixture(scope="module", params=sorted(ROPE_CASES))
def calibrated(request):
    model = tiny_llama(**ROPE_CASES[request.param])
    calibration = calibrate(model, _tokens(300), bos_id=1, sequence_length=128, chunk_size=50, progress=False)
    return request.param, model, calibration


def test_identity_against_live_rope(calibrated):
    name, _, calibration = calibrated
    merged = calibration.merged()
    rng = np.random.default_rng(1)
    for layer in calibration.model_layers.layers:
        geometry = layer.rope
        moments = merged[layer.index].means()
        qbar = merge_bands(moments["q_mean_real"], moments["q_mean_imag"], geometry.layout, geometry.head_dim)
        key = rng.standard_normal(geometry.head_dim)
        key_real, key_imag = split_bands(key, geometry.layout, geometry.rotary_dims)
        rope = layer.attention.rope
        for p, t in POSITIONS:
            rotated_q = np.array(rope(mx.array(qbar[None, :, None, :].astype(np.float32)), offset=t))[0, :, 0, :]
            rotated_k = np.array(rope(mx.array(key[None, None, None, :].astype(np.float32)), offset=p))[0, 0, 0, :]
            live = rotated_q @ rotated_k
            centers = moments["q_mean_real"] + 1j * moments["q_mean_imag"]
            trig = (centers * np.conj(key_real + 1j * key_imag) * np.exp(1j * geometry.omega * (t - p))).real.sum(-1)
            scale = np.linalg.norm(qbar, axis=-1) * np.linalg.norm(key)
            np.testing.assert_allclose(live, trig * geometry.input_scale**2, atol=2e-3 * scale.max(), err_msg=f"{name} p={p} t={t}")


def test_omega_matches_rope_settings(calibrated):
    name, _, calibration = calibrated
    geometry = calibration.model_layers.layers[0].rope
    expected = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    if name == "linear":
        expected = expected / 4.0  # positions are multiplied by 1/factor, so omega is too
    np.testing.assert_allclose(geometry.omega, expected, rtol=1e-12)
    assert geometry.layout == ("traditional" if name == "traditional" else "half")


def test_streaming_matches_single_pass():
    model = tiny_llama()
    tokens = _tokens(200, seed=3)
    reference = None
    for chunk_size in (200, 64, 17, 1):
        calibration = calibrate(model, tokens, bos_id=None, sequence_length=200, chunk_size=chunk_size, progress=False)
        means = {i: s.means() for i, s in calibration.merged().items()}
        if reference is None:
            reference = means
            continue
        for index, moments in means.items():
            for name, value in moments.items():
                np.testing.assert_allclose(value, reference[index][name], rtol=2e-4, atol=1e-5, err_msg=f"chunk {chunk_size} {name}")


def test_statistics_equal_direct_computation():
    model = tiny_llama(seed=5)
    tokens = _tokens(90, seed=4)
    calibration = calibrate(model, tokens, bos_id=None, sequence_length=90, chunk_size=30, progress=False)
    layers = find_attention_layers(model)
    with RopeTaps(layers.layers) as taps:
        model(mx.array(tokens[None, :].astype(np.int32)))
        captured = taps.pop()
    for layer in layers.layers:
        queries = np.array(captured[layer.index].queries)[0].astype(np.float64)
        real, imag = split_bands(queries, layer.rope.layout, layer.rope.rotary_dims)
        moments = calibration.merged()[layer.index].means()
        np.testing.assert_allclose(moments["q_mean_real"], real.mean(axis=1), rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(moments["q_abs_mean"], np.hypot(real, imag).mean(axis=1), rtol=1e-3, atol=1e-5)


def test_band_stats_merge_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 40, 4)), rng.standard_normal((2, 3, 25, 4))
    whole = BandStats(3, 4)
    whole.update(np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1))
    left, right = BandStats(3, 4), BandStats(3, 4)
    left.update(a[0], a[1])
    right.update(b[0], b[1])
    merged = left.merge(right)
    assert merged.count == 65
    for name in whole.sums:
        np.testing.assert_allclose(merged.sums[name], whole.sums[name], rtol=1e-12)


def test_mean_resultant_length_bounds():
    concentrated = mean_resultant_length(np.array([3.0]), np.array([4.0]), np.array([5.0]))
    assert concentrated[0] == pytest.approx(1.0)
    assert mean_resultant_length(np.array([0.0]), np.array([0.0]), np.array([2.0]))[0] == 0.0


def test_sequences_start_with_bos():
    sequences = split_sequences([1, 5, 6, 7, 8, 9], 3, bos_id=1)
    assert [s.tolist() for s in sequences] == [[1, 5, 6], [1, 7, 8], [1, 9]]
    assert [s.tolist() for s in split_sequences([5, 6, 7], 2, bos_id=None)] == [[5, 6], [7]]
