"""The loader check: a calibration's geometry and omega against the live model's RoPE."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tiny_architectures import build_text_model, build_vlm_model
from tiny_models import tiny_llama
from triattn_hub.calibrate import calibrate
from triattn_hub.capture import find_attention_layers
from triattn_hub.errors import GeometryMismatchError, ManifestError
from triattn_hub.model_check import layers_from_artifact, layers_from_calibration, verify_against_model
from triattn_hub.results import calibration_tensors, geometry_record


def _layers(model) -> dict:
    return layers_from_calibration(find_attention_layers(model))


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_llama(),
        lambda: build_text_model("gemma4_text"),
        lambda: build_text_model("phi3_longrope"),
        lambda: build_vlm_model("qwen2_5_vl"),
    ],
    ids=["llama", "gemma4_text", "phi3_longrope", "qwen2_5_vl"],
)
def test_matching_calibration_passes(build):
    model = build()
    summary = verify_against_model(_layers(model), model)
    assert summary["layers_checked"] == len(find_attention_layers(model).layers)
    assert summary["max_omega_relative_difference"] <= 1e-6


def test_artifact_tensors_pass():
    model = tiny_llama(seed=3)
    calibration = calibrate(model, np.arange(2, 90), bos_id=1, sequence_length=64, chunk_size=32, progress=False)
    tensors = calibration_tensors(calibration)
    manifest = {"geometry": geometry_record(calibration)}
    summary = verify_against_model(layers_from_artifact(manifest, tensors), model)
    assert summary["layers_checked"] == 2
    # The artifact stores omega as float32, which stays far inside the 1e-5 tolerance.
    assert summary["max_omega_relative_difference"] < 1e-6


def test_artifact_without_omega_rejected():
    model = tiny_llama()
    calibration = calibrate(model, np.arange(2, 40), bos_id=1, sequence_length=64, chunk_size=32, progress=False)
    tensors = calibration_tensors(calibration)
    del tensors["layers.1.omega"]
    with pytest.raises(ManifestError, match="layers.1.omega"):
        layers_from_artifact({"geometry": geometry_record(calibration)}, tensors)


def test_wrong_rope_base_rejected():
    # A calibration that recorded base 10000 for a Qwen3 model, whose base is 1e6.
    model = build_text_model("qwen3")
    layers = _layers(model)
    for spec in layers.values():
        spec["omega"] = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    live = find_attention_layers(model).layers[0].rope.omega
    wrong = layers[0]["omega"]
    relative = np.abs(wrong - live) / np.abs(live)
    band = int(np.argmax(relative))

    with pytest.raises(GeometryMismatchError) as raised:
        verify_against_model(layers, model)
    message = str(raised.value)
    assert f"omega of band {band} is {wrong[band]:.9g}" in message
    # The expected value is the omega measured by rotating basis vectors through the live RoPE.
    measured = float(re.search(r"but ([0-9.e+-]+) was expected", message).group(1))
    assert measured == pytest.approx(live[band], rel=1e-6)


def test_small_omega_error_rejected():
    model = tiny_llama()
    layers = _layers(model)
    layers[1]["omega"] = layers[1]["omega"] * (1 + 3e-5)
    with pytest.raises(GeometryMismatchError, match="layer 1"):
        verify_against_model(layers, model)


def test_different_layer_count_rejected():
    calibrated_model = tiny_llama(n_layers=2)
    other_model = tiny_llama(n_layers=3)
    with pytest.raises(GeometryMismatchError) as raised:
        verify_against_model(_layers(calibrated_model), other_model)
    message = str(raised.value)
    assert "covers layers [0, 1]" in message
    assert "[0, 1, 2]" in message
    assert "missing from the calibration: [2]" in message


@pytest.mark.parametrize(
    "field, value",
    [("n_q_heads", 8), ("n_kv_heads", 4), ("head_dim", 32), ("rotary_dims", 8)],
)
def test_geometry_field_mismatch_rejected(field, value):
    model = tiny_llama()
    layers = _layers(model)
    live_value = layers[0][field]
    layers[0][field] = value
    with pytest.raises(GeometryMismatchError) as raised:
        verify_against_model(layers, model)
    message = str(raised.value)
    assert f"{field} is {value} in the calibration" in message
    assert f"{live_value} in the model" in message


def test_layout_mismatch_rejected():
    model = tiny_llama(traditional=True)
    layers = _layers(model)
    layers[0]["layout"] = "half"
    with pytest.raises(GeometryMismatchError, match="'half' in the calibration but 'traditional'"):
        verify_against_model(layers, model)


def test_calibration_for_other_model_rejected():
    # Same shapes but another architecture's RoPE: Llama 3.1 scaling against plain Mistral.
    llama = build_text_model("llama")
    mistral = build_text_model("mistral", num_key_value_heads=2)
    with pytest.raises(GeometryMismatchError, match="omega of band"):
        verify_against_model(_layers(llama), mistral)
