"""Consumer export formats, each read back by a loader written from that format's description.

The loaders below follow the prose description of each format (see exports.py), not the
consumers' code: `load_mlx_vlm` reads the MLX-VLM pull request 985 safetensors layout and
`load_triattention_npz` the key scheme of the TriAttention MLX loader.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from calibration_fixtures import layer_record, make_calibration
from triattn_hub.artifact import ARTIFACT_NAME, MANIFEST_NAME, layer_tensors, verify_artifact
from triattn_hub.errors import ExportError
from triattn_hub.exports import MLX_VLM_FILE, NPZ_FILE, export_calibration, mlx_vlm_tensors, triattention_npz_arrays
from triattn_hub.hub_local import LocalHub
from triattn_hub.rope import band_indices, merge_bands, split_bands

HEADS, KV_HEADS, HEAD_DIM, BASE = 4, 2, 16, 10000.0


# Loaders written from the format descriptions


def load_mlx_vlm(path):
    """Read an MLX-VLM TriAttention calibration: per-layer tensors plus three string metadata."""
    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    n_layers, n_q, n_kv = int(metadata["n_layers"]), int(metadata["n_q_heads"]), int(metadata["n_kv_heads"])
    layers = {}
    for i in range(n_layers):
        layers[i] = {name: tensors.pop(f"layer.{i}.{name}") for name in ("q_center_real", "q_center_imag", "q_mean_norm")}
    assert tensors == {}, f"unexpected tensors {sorted(tensors)}"
    return metadata, n_q, n_kv, layers


def load_triattention_npz(path):
    """Read the TriAttention MLX loader's .npz: arrays keyed l_{L}_h_{H}_{stat}."""
    data = np.load(path)
    stats = {}
    for key in data.files:
        parts = key.split("_")
        if len(parts) >= 4 and parts[0] == "l" and parts[2] == "h":
            layer, head = int(parts[1]), int(parts[3])
            stat = "_".join(parts[4:])
            stats.setdefault((layer, head), {})[stat] = data[key]
    return data, stats


# Calibrations from explicit query samples, so consumer-side statistics can be recomputed


def rope_numpy(x, positions, omega, layout):
    """Rotate vectors [..., head_dim] at `positions` as RoPE with this band layout does."""
    real_idx, imag_idx = band_indices(layout, 2 * omega.size)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * omega
    a, b = x[..., real_idx], x[..., imag_idx]
    out = np.array(x, dtype=np.float64)
    out[..., real_idx] = a * np.cos(angle) - b * np.sin(angle)
    out[..., imag_idx] = a * np.sin(angle) + b * np.cos(angle)
    return out


def calibration_from_samples(layout, *, seed=0, n_samples=400, model_id="acme/tiny", scale=1.0):
    """Return (tensors, manifest, queries per layer [samples, heads, head_dim])."""
    _, manifest = make_calibration(model_id, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layout=layout, base=BASE)
    for layer in manifest["geometry"]["layers"]:
        layer["rope"]["settings"]["scale"] = scale
    rng = np.random.default_rng(seed)
    omega = scale * BASE ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    tensors, queries = {}, {}
    for layer in manifest["geometry"]["layers"]:
        center = rng.normal(size=(HEADS, HEAD_DIM))
        q = center[None] + 0.7 * rng.normal(size=(n_samples, HEADS, HEAD_DIM))
        real, imag = split_bands(q, layout, HEAD_DIM)
        moments = {
            "q_mean_real": real.mean(0),
            "q_mean_imag": imag.mean(0),
            "q_abs_mean": np.hypot(real, imag).mean(0),
            "q_real_sq_mean": (real**2).mean(0),
            "q_imag_sq_mean": (imag**2).mean(0),
            "q_abs_sq_mean": (real**2 + imag**2).mean(0),
        }
        tensors.update(layer_tensors(layer["index"], moments, omega))
        queries[layer["index"]] = q
    return tensors, manifest, queries


def published(tmp_path, tensors, manifest):
    hub = LocalHub(tmp_path / "hub")
    result = hub.publish(tensors, manifest)
    return hub.root / result.location.split(str(hub.root) + "/")[1]


# Native


def test_native_export_copies_verified_artifact(tmp_path):
    directory = published(tmp_path, *make_calibration("acme/tiny"))
    result = export_calibration(directory, "native", tmp_path / "out")
    assert [p.name for p in result.paths] == [ARTIFACT_NAME, MANIFEST_NAME]
    assert (tmp_path / "out" / ARTIFACT_NAME).read_bytes() == (directory / ARTIFACT_NAME).read_bytes()
    assert verify_artifact(tmp_path / "out")["model"]["id"] == "acme/tiny"


# MLX-VLM pull request 985


def test_mlx_vlm_requires_explicit_pairing(tmp_path):
    directory = published(tmp_path, *make_calibration("acme/tiny"))
    with pytest.raises(ExportError, match="traditional"):
        export_calibration(directory, "mlx-vlm", tmp_path / "out")
    assert not (tmp_path / "out" / MLX_VLM_FILE).exists()


@pytest.mark.parametrize("layout", ["half", "traditional"])
def test_mlx_vlm_rope_pairing_holds_true_bands(tmp_path, layout):
    tensors, manifest, queries = calibration_from_samples(layout)
    directory = published(tmp_path, tensors, manifest)
    result = export_calibration(directory, "mlx-vlm", tmp_path / "out", pairing="rope")
    metadata, n_q, n_kv, layers = load_mlx_vlm(result.paths[0])
    assert set(metadata) == {"n_layers", "n_q_heads", "n_kv_heads"}
    assert (n_q, n_kv) == (HEADS, KV_HEADS)
    assert len(layers) == 2
    for i, q in queries.items():
        real, imag = split_bands(q, layout, HEAD_DIM)
        assert layers[i]["q_center_real"].dtype == np.float32
        assert layers[i]["q_center_real"].shape == (HEADS, HEAD_DIM // 2)
        np.testing.assert_allclose(layers[i]["q_center_real"], real.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layers[i]["q_center_imag"], imag.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layers[i]["q_mean_norm"], np.hypot(real, imag).mean(0), rtol=1e-5, atol=1e-6)


def _consumer_pairs(layout, rotary_dims):
    """The component pairs the pull request reads, by its description: `traditional` taken backwards."""
    n = rotary_dims // 2
    if layout == "traditional":  # MLX traditional=True, read by the pull request as half-split
        return np.arange(n), n + np.arange(n)
    return 2 * np.arange(n), 2 * np.arange(n) + 1


@pytest.mark.parametrize("layout", ["half", "traditional"])
def test_mlx_vlm_pr985_pairing_matches_its_own_calibration(tmp_path, layout):
    tensors, manifest, queries = calibration_from_samples(layout)
    directory = published(tmp_path, tensors, manifest)
    result = export_calibration(directory, "mlx-vlm", tmp_path / "out", pairing="pr985")
    _, _, _, layers = load_mlx_vlm(result.paths[0])
    c1, c2 = _consumer_pairs(layout, HEAD_DIM)
    for i, q in queries.items():
        own_real, own_imag = q[..., c1].mean(0), q[..., c2].mean(0)
        own_norm = np.hypot(q[..., c1], q[..., c2]).mean(0)
        np.testing.assert_allclose(layers[i]["q_center_real"], own_real, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layers[i]["q_center_imag"], own_imag, rtol=1e-5, atol=1e-6)
        # The file contains the root mean square, an upper bound of E|a + ib| (Jensen).
        assert np.all(layers[i]["q_mean_norm"] >= own_norm - 1e-5)
        assert np.all(layers[i]["q_mean_norm"] <= 1.5 * own_norm)


def test_trig_term_per_pairing(tmp_path):
    """The rope pairing reproduces the RoPE dot product; the pull request's pairing does not."""
    tensors, manifest, _ = calibration_from_samples("half")
    omega = tensors["layers.0.omega"].astype(np.float64)
    directory = published(tmp_path, tensors, manifest)
    rope_file = load_mlx_vlm(export_calibration(directory, "mlx-vlm", tmp_path / "rope", pairing="rope").paths[0])[3][0]
    pr_file = load_mlx_vlm(export_calibration(directory, "mlx-vlm", tmp_path / "pr", pairing="pr985").paths[0])[3][0]

    rng = np.random.default_rng(3)
    key = rng.normal(size=HEAD_DIM)
    key_position, query_position = 37, 4133
    rotated_key = rope_numpy(key, key_position, omega, "half")
    center = rope_file["q_center_real"][0].astype(np.float64) + 1j * rope_file["q_center_imag"][0]
    query_vector = merge_bands(center.real, center.imag, "half", HEAD_DIM)
    exact = rope_numpy(query_vector, query_position, omega, "half") @ rotated_key

    def trig_term(file_layer, pairs):
        q = file_layer["q_center_real"][0].astype(np.float64) + 1j * file_layer["q_center_imag"][0]
        k = rotated_key[pairs[0]] + 1j * rotated_key[pairs[1]]
        return float(np.sum(np.real(q * np.conj(k) * np.exp(1j * omega * query_position))))

    assert trig_term(rope_file, band_indices("half", HEAD_DIM)) == pytest.approx(exact, rel=1e-5)
    assert abs(trig_term(pr_file, _consumer_pairs("half", HEAD_DIM)) - exact) > 1e-2 * abs(exact)


def test_mlx_vlm_zero_fills_sliding_and_uncalibrated_layers(tmp_path):
    layers = [
        layer_record(0, heads=HEADS, kv_heads=KV_HEADS, head_dim=8, rotary_dims=8, layout="half", base=BASE, kind="sliding"),
        layer_record(1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=1e6),
        layer_record(3, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=1e6),
    ]
    tensors, manifest = make_calibration("acme/mixed", n_layers=4, head_dim=HEAD_DIM, layers=layers)
    arrays, metadata, warnings = mlx_vlm_tensors(tensors, manifest, pairing="rope")
    assert metadata == {"n_layers": "4", "n_q_heads": str(HEADS), "n_kv_heads": str(KV_HEADS)}
    for i in range(4):
        assert arrays[f"layer.{i}.q_center_real"].shape == (HEADS, HEAD_DIM // 2)
    assert not arrays["layer.0.q_center_real"].any()
    assert not arrays["layer.2.q_mean_norm"].any()
    np.testing.assert_array_equal(arrays["layer.3.q_center_real"], tensors["layers.3.q_mean_real"])
    assert "0 (head_dim 8 instead of 16)" in warnings[0]
    assert "2 (not calibrated)" in warnings[0]


def test_mlx_vlm_rejects_global_layers_with_other_geometry(tmp_path):
    layers = [
        layer_record(0, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=BASE),
        layer_record(1, heads=HEADS, kv_heads=KV_HEADS, head_dim=32, rotary_dims=32, layout="half", base=BASE),
    ]
    tensors, manifest = make_calibration("acme/mixed", n_layers=2, layers=layers)
    with pytest.raises(ExportError, match="global attention layer 1 differs from layer 0: head_dim 32 instead of 16"):
        mlx_vlm_tensors(tensors, manifest, pairing="rope")
    layers[1] = layer_record(1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=5e5)
    tensors, manifest = make_calibration("acme/mixed", n_layers=2, layers=layers)
    with pytest.raises(ExportError, match="different omega"):
        mlx_vlm_tensors(tensors, manifest, pairing="pr985")


def test_mlx_vlm_warns_about_scaled_rope(tmp_path):
    tensors, manifest, _ = calibration_from_samples("half", scale=0.25)
    _, _, warnings = mlx_vlm_tensors(tensors, manifest, pairing="rope")
    assert any("scale=0.25" in warning for warning in warnings)


# TriAttention MLX loader


def test_triattention_npz_pools_query_heads_per_kv_head(tmp_path):
    tensors, manifest, queries = calibration_from_samples("half")
    directory = published(tmp_path, tensors, manifest)
    result = export_calibration(directory, "triattention-npz", tmp_path / "out")
    assert result.paths[0].name == NPZ_FILE
    data, stats = load_triattention_npz(result.paths[0])
    assert sorted(stats) == [(layer, head) for layer in (0, 1) for head in range(KV_HEADS)]
    group = HEADS // KV_HEADS
    for (layer, head), values in stats.items():
        assert set(values) == {"q_mean_real", "q_mean_imag", "q_abs_mean"}
        q = queries[layer][:, head * group : (head + 1) * group].reshape(-1, HEAD_DIM)
        real, imag = split_bands(q, "half", HEAD_DIM)
        assert values["q_mean_real"].dtype == np.float32
        assert values["q_mean_real"].shape == (HEAD_DIM // 2,)
        np.testing.assert_allclose(values["q_mean_real"], real.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values["q_mean_imag"], imag.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values["q_abs_mean"], np.hypot(real, imag).mean(0), rtol=1e-5, atol=1e-6)
    assert float(data["rope_theta"]) == BASE  # the recorded base, not one recomputed from float32 omega
    assert int(data["head_dim"]) == HEAD_DIM
    assert json.loads(str(data["triattn_hub_manifest"]))["model"]["id"] == "acme/tiny"
    assert "rope_theta=10000" in result.warnings[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layout": "traditional"}, "half-split"),
        ({"rotary_dims": 8}, "partial rotary"),
    ],
)
def test_triattention_npz_rejects_unrepresentable(kwargs, message):
    tensors, manifest = make_calibration("acme/tiny", **kwargs)
    with pytest.raises(ExportError, match=message):
        triattention_npz_arrays(tensors, manifest)


def test_triattention_npz_rejects_scaled_omega():
    tensors, manifest, _ = calibration_from_samples("half", scale=0.25)
    with pytest.raises(ExportError, match="scaled or non-geometric"):
        triattention_npz_arrays(tensors, manifest)


def test_triattention_npz_leaves_out_other_geometry():
    layers = [
        layer_record(0, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=BASE, kind="sliding"),
        layer_record(1, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, rotary_dims=HEAD_DIM, layout="half", base=1e6),
    ]
    tensors, manifest = make_calibration("acme/mixed", n_layers=2, layers=layers)
    arrays, warnings = triattention_npz_arrays(tensors, manifest)
    assert "l_1_h_0_q_mean_real" in arrays
    assert "l_0_h_0_q_mean_real" not in arrays
    assert list(arrays["layers"]) == [1]
    assert float(arrays["rope_theta"]) == pytest.approx(1e6, rel=1e-5)
    assert "0 (a different omega" in warnings[1]


# Command line


def test_cli_fetch_exports(tmp_path):
    tensors, manifest, _ = calibration_from_samples("half")
    hub = LocalHub(tmp_path / "hub")
    hub.publish(tensors, manifest)
    base = [sys.executable, "-m", "triattn_hub.cli", "fetch", "acme/tiny", "--hub", str(hub.root), "--output"]

    refused = subprocess.run([*base, str(tmp_path / "a"), "--format", "mlx-vlm"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert "choose pairing" in refused.stderr

    done = subprocess.run([*base, str(tmp_path / "b"), "--format", "mlx-vlm", "--pairing", "rope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "b" / MLX_VLM_FILE)
    assert load_mlx_vlm(done.stdout.strip())[1] == HEADS

    npz = subprocess.run([*base, str(tmp_path / "c"), "--format", "triattention-npz"], capture_output=True, text=True, timeout=120)
    assert npz.returncode == 0, npz.stderr
    assert "rope_theta=10000" in npz.stderr
    assert load_triattention_npz(npz.stdout.strip())[1]
