"""Tests of TriAttention key scoring against hand-computed values and a live mlx RoPE."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from triattn_hub.rope import merge_bands, read_rope, split_bands
from triattn_hub.scoring import FUTURE_OFFSETS, pool_gqa, score_keys, score_keys_post_rope


def _one_head_two_bands():
    # Band 0: qbar = 1 (arg 0), E|q| = 2, omega 0.5, key i (arg pi/2).
    # Band 1: qbar = 2i (arg pi/2), E|q| = 3, omega 0.1, key 3 (arg 0).
    center_real = np.array([[1.0, 0.0]])
    center_imag = np.array([[0.0, 2.0]])
    abs_mean = np.array([[2.0, 3.0]])
    omega = np.array([0.5, 0.1])
    keys_real = np.array([[[0.0, 3.0]]])
    keys_imag = np.array([[[1.0, 0.0]]])
    return center_real, center_imag, abs_mean, omega, keys_real, keys_imag


def test_future_offsets_are_powers_of_two():
    assert FUTURE_OFFSETS[0] == 1
    assert FUTURE_OFFSETS[-1] == 65536
    assert len(FUTURE_OFFSETS) == 17


def test_score_one_offset_by_hand():
    args = _one_head_two_bands()
    # Key at p = 2, query at 4, offset 1: t - p = 3.
    # Band 0: |1| |i| cos(0.5 * 3 + 0 - pi/2) = sin(1.5).
    # Band 1: |2i| |3| cos(0.1 * 3 + pi/2 - 0) = -6 sin(0.3).
    trig = math.sin(1.5) - 6 * math.sin(0.3)
    got = score_keys(*args, key_positions=[2], query_position=4, offsets=(1,), norm_term="none")
    assert got.shape == (1, 1)
    assert got[0, 0] == pytest.approx(trig, abs=1e-12)

    # MRL norm term: (2 - 1) * 1 + (3 - 2) * 3 = 4. Plain norm term: 2 * 1 + 3 * 3 = 11.
    mrl = score_keys(*args, key_positions=[2], query_position=4, offsets=(1,), norm_term="mrl")
    assert mrl[0, 0] == pytest.approx(trig + 4.0, abs=1e-12)
    plain = score_keys(*args, key_positions=[2], query_position=4, offsets=(1,), norm_term="plain")
    assert plain[0, 0] == pytest.approx(trig + 11.0, abs=1e-12)


def test_score_averages_over_offsets():
    args = _one_head_two_bands()
    # Offsets 1 and 3 put the query at distances 3 and 5 from the key.
    expected = np.mean([math.sin(0.5 * d) - 6 * math.sin(0.1 * d) for d in (3, 5)])
    got = score_keys(*args, key_positions=[2], query_position=4, offsets=(1, 3), norm_term="none")
    assert got[0, 0] == pytest.approx(expected, abs=1e-12)


def test_score_keys_at_several_positions():
    args = _one_head_two_bands()
    keys_real = np.repeat(args[4], 3, axis=1)
    keys_imag = np.repeat(args[5], 3, axis=1)
    got = score_keys(*args[:4], keys_real, keys_imag, key_positions=[0, 2, 4], query_position=4, offsets=(1,), norm_term="none")
    expected = [math.sin(0.5 * d) - 6 * math.sin(0.1 * d) for d in (5, 3, 1)]
    np.testing.assert_allclose(got[0], expected, atol=1e-12)


def test_gqa_head_maps_to_head_floordiv_group():
    # Four query heads over two KV heads: heads 0, 1 read KV head 0 and heads 2, 3 read KV head 1.
    center_real = np.array([[1.0], [2.0], [3.0], [4.0]])
    zeros = np.zeros_like(center_real)
    keys_real = np.array([[[1.0]], [[10.0]]])
    keys_imag = np.zeros_like(keys_real)
    got = score_keys(
        center_real, zeros, np.abs(center_real), [0.0], keys_real, keys_imag,
        key_positions=[0], query_position=0, offsets=(1,), norm_term="none",
    )
    # h // 2 gives [1*1, 2*1, 3*10, 4*10]; the wrong h % 2 would give [1, 20, 3, 40].
    np.testing.assert_allclose(got[:, 0], [1.0, 2.0, 30.0, 40.0])

    post = score_keys_post_rope(
        center_real, zeros, np.abs(center_real), [0.0], keys_real, keys_imag,
        query_position=0, offsets=(1,), norm_term="none",
    )
    np.testing.assert_allclose(post[:, 0], [1.0, 2.0, 30.0, 40.0])


def test_expanded_keys_match_grouped_keys():
    rng = np.random.default_rng(3)
    center_real, center_imag = rng.normal(size=(2, 4, 3))
    abs_mean = np.hypot(center_real, center_imag) + 0.5
    omega = np.array([1.0, 0.1, 0.01])
    keys_real, keys_imag = rng.normal(size=(2, 2, 5, 3))
    positions = np.arange(5)
    grouped = score_keys(center_real, center_imag, abs_mean, omega, keys_real, keys_imag, positions, 9)
    expanded = score_keys(
        center_real, center_imag, abs_mean, omega,
        np.repeat(keys_real, 2, axis=0), np.repeat(keys_imag, 2, axis=0), positions, 9,
    )
    np.testing.assert_allclose(grouped, expanded, rtol=1e-12)


def test_score_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="cannot be grouped"):
        score_keys(np.ones((3, 1)), np.zeros((3, 1)), np.ones((3, 1)), [0.1], np.ones((2, 1, 1)), np.zeros((2, 1, 1)), [0], 1)


def test_score_rejects_unknown_norm_term():
    with pytest.raises(ValueError, match="norm_term"):
        score_keys(np.ones((1, 1)), np.zeros((1, 1)), np.ones((1, 1)), [0.1], np.ones((1, 1, 1)), np.zeros((1, 1, 1)), [0], 1, norm_term="l2")


def test_pool_gqa_groups_consecutive_heads():
    scores = np.array([[1.0], [5.0], [3.0], [2.0]])
    # Groups {0, 1} and {2, 3}; grouping by h % 2 would give {0, 2} and {1, 3}, so max [3, 5].
    np.testing.assert_allclose(pool_gqa(scores, 2, "max")[:, 0], [5.0, 3.0])
    np.testing.assert_allclose(pool_gqa(scores, 2, "mean")[:, 0], [3.0, 2.5])


def test_pool_gqa_rejects_unknown_mode():
    with pytest.raises(ValueError, match="how="):
        pool_gqa(np.ones((2, 1)), 1, "sum")


def _rope_at(module, vectors: np.ndarray, offset: int) -> np.ndarray:
    """Rotate vectors [tokens, head_dim] as the tokens offset, offset + 1, ... of one head."""
    out = module(mx.array(vectors[None, None].astype(np.float32)), offset=offset)
    return np.array(out, dtype=np.float64)[0, 0]


ROPE_CASES = [
    pytest.param(dict(dims=16, traditional=False, base=10000.0), id="half"),
    pytest.param(dict(dims=16, traditional=True, base=10000.0), id="traditional"),
    pytest.param(dict(dims=16, traditional=False, base=500.0, scale=0.25), id="half-scaled"),
    pytest.param(dict(dims=8, traditional=False, base=10000.0), id="half-partial"),
]


@pytest.mark.parametrize("settings", ROPE_CASES)
def test_trig_term_equals_rotated_dot_product(settings):
    head_dim = 16
    module = nn.RoPE(**settings)
    geometry = read_rope(module, head_dim)
    rng = np.random.default_rng(7)
    center = rng.normal(size=head_dim)
    keys = rng.normal(size=(6, head_dim))
    key_start = 3
    query_position, offset = 20, 37
    t = query_position + offset

    # Only the rotated components are band values; the rest do not enter the score.
    center_real, center_imag = split_bands(center, geometry.layout, geometry.rotary_dims)
    center_vector = merge_bands(center_real, center_imag, geometry.layout, head_dim)
    rotated_query = _rope_at(module, center_vector[None], t)[0]
    rotated_keys = _rope_at(module, keys, key_start)
    expected = rotated_keys[:, : geometry.rotary_dims] @ rotated_query[: geometry.rotary_dims]

    keys_real, keys_imag = split_bands(keys, geometry.layout, geometry.rotary_dims)
    got = score_keys(
        center_real[None], center_imag[None], np.hypot(center_real, center_imag)[None], geometry.omega,
        keys_real[None], keys_imag[None], key_start + np.arange(6), query_position,
        offsets=(offset,), norm_term="none",
    )
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", ROPE_CASES)
def test_post_rope_scores_equal_pre_rope_scores(settings):
    head_dim = 16
    module = nn.RoPE(**settings)
    geometry = read_rope(module, head_dim)
    bands = geometry.n_bands
    rng = np.random.default_rng(11)
    center_real, center_imag = rng.normal(size=(2, 4, bands))
    abs_mean = np.hypot(center_real, center_imag) * 1.5
    keys = rng.normal(size=(2, 10, head_dim))
    key_start = 50
    query_position = key_start + 10

    keys_real, keys_imag = split_bands(keys, geometry.layout, geometry.rotary_dims)
    pre = score_keys(
        center_real, center_imag, abs_mean, geometry.omega, keys_real, keys_imag,
        key_start + np.arange(10), query_position,
    )
    rotated = np.stack([_rope_at(module, keys[h], key_start) for h in range(2)])
    rotated_real, rotated_imag = split_bands(rotated, geometry.layout, geometry.rotary_dims)
    post = score_keys_post_rope(
        center_real, center_imag, abs_mean, geometry.omega, rotated_real, rotated_imag, query_position,
    )
    assert pre.shape == (4, 10)
    # mlx rotates in float32, so the two agree to float32 rounding of the rotated keys.
    np.testing.assert_allclose(post, pre, rtol=1e-4, atol=1e-4 * np.abs(pre).max())

    # Rotating in float64 with numpy pins the two forms together far more tightly.
    rotation = np.exp(1j * np.outer(key_start + np.arange(10), geometry.omega))
    exact = (keys_real + 1j * keys_imag) * rotation[None]
    post64 = score_keys_post_rope(
        center_real, center_imag, abs_mean, geometry.omega, exact.real, exact.imag, query_position,
    )
    np.testing.assert_allclose(post64, pre, rtol=1e-9, atol=1e-9)
