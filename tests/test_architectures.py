"""Calibration of every supported architecture, proven per architecture on tiny random models.

Each tiny model comes from its real mlx-lm or mlx-vlm config class (tiny_architectures.py) and
goes through `calibrate`. For every calibrated layer, the mean query qbar and a random pre-RoPE
key k must satisfy the dot-product identity against the model's live RoPE module:

    rope(qbar, t) . rope(k, p) = input_scale**2 * sum_f Re(qbar_f conj(k_f) exp(i omega_f (t - p)))

A wrong band pairing, a wrong omega, a missed input scale or non-rotated dims counted as bands
break it. The last part runs the same checks on the real Gemma 3 270M GGUF.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from tiny_architectures import TEXT_CONFIGS, VLM_CONFIGS, VOCAB, build_text_model, build_vlm_model
from triattn_hub.architectures import SUPPORTED, check_supported
from triattn_hub.calibrate import backbone, calibrate, make_cache
from triattn_hub.capture import RopeTaps, find_attention_layers
from triattn_hub.errors import UnsupportedModelError
from triattn_hub.manifest import schema_path
from triattn_hub.rope import band_indices, merge_bands, split_bands

# Case name -> (builder, config name). Every supported model type has at least one case.
CASES = {
    "llama": (build_text_model, "llama"),
    "mistral": (build_text_model, "mistral"),
    "qwen2": (build_text_model, "qwen2"),
    "qwen3": (build_text_model, "qwen3"),
    "phi3": (build_text_model, "phi3"),
    "phi3_longrope": (build_text_model, "phi3_longrope"),
    "gemma3_text": (build_text_model, "gemma3_text"),
    "gemma4_text": (build_text_model, "gemma4_text"),
    "gemma3_lm": (build_text_model, "gemma3"),
    "gemma4_lm": (build_text_model, "gemma4"),
    "gpt_oss": (build_text_model, "gpt_oss"),
    "smollm3": (build_text_model, "smollm3"),
    "qwen3_next": (build_text_model, "qwen3_next"),
    "gemma3_vlm": (build_vlm_model, "gemma3"),
    "gemma4_vlm": (build_vlm_model, "gemma4"),
    "qwen2_5_vl": (build_vlm_model, "qwen2_5_vl"),
}
EXPECTED_SKIPPED = {"smollm3": [3], "qwen3_next": [0, 1, 2]}

# (key position p, query position t). The last pairs lie beyond 32k, where rope scaling matters.
POSITION_PAIRS = [(0, 5), (7, 4000), (1000, 1001), (33000, 40000), (40000, 40000), (39000, 40017)]
# float32 rotation error grows with position. Relative to sum_f |qbar_f||k_f| it reaches
# 2.1e-4 at position 40000 on these models (mlx 0.32, CPU).
IDENTITY_RTOL = 1e-3
TOKEN_COUNT = 400
SEQUENCE_LENGTH = 160  # longer than the 16-token sliding windows, so rotating caches wrap
CHUNK_SIZE = 48


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    # Ids 2 .. VOCAB-2: 1 is the BOS used here and VOCAB-1 the Gemma 3 image token.
    return np.random.default_rng(seed).integers(2, VOCAB - 1, n)


def _build(case: str, **overrides):
    builder, name = CASES[case]
    return builder(name, **overrides) if overrides else builder(name)


@pytest.fixture(scope="module")
def calibrations():
    """Return a function that builds and calibrates a case once per module."""
    done = {}

    def get(case: str):
        if case not in done:
            model = _build(case)
            calibration = calibrate(
                model, _tokens(TOKEN_COUNT), bos_id=1, sequence_length=SEQUENCE_LENGTH,
                chunk_size=CHUNK_SIZE, progress=False,
            )
            done[case] = (model, calibration)
        return done[case]

    return get


def _rotate(rope, x: np.ndarray, offset: int) -> np.ndarray:
    return np.array(rope(mx.array(x.astype(np.float32)), offset=offset).astype(mx.float32), dtype=np.float64)


def identity_errors(layer, moments: dict, key: np.ndarray) -> list[tuple[int, int, float]]:
    """Return (p, t, max relative error) of the dot-product identity for one layer."""
    geometry = layer.rope
    qbar = merge_bands(moments["q_mean_real"], moments["q_mean_imag"], geometry.layout, geometry.head_dim)
    centers = moments["q_mean_real"] + 1j * moments["q_mean_imag"]
    key_real, key_imag = split_bands(key, geometry.layout, geometry.rotary_dims)
    key_bands = key_real + 1j * key_imag
    bound = geometry.input_scale**2 * (np.abs(centers) * np.abs(key_bands)).sum(-1)
    errors = []
    for p, t in POSITION_PAIRS:
        rotated_q = _rotate(layer.rope_module, qbar[None, :, None, :], t)[0, :, 0, :]
        rotated_k = _rotate(layer.rope_module, key[None, None, None, :], p)[0, 0, 0, :]
        live = rotated_q @ rotated_k
        phases = np.exp(1j * geometry.omega * (t - p))
        trig = geometry.input_scale**2 * (centers * np.conj(key_bands) * phases).real.sum(-1)
        errors.append((p, t, float(np.max(np.abs(live - trig) / bound))))
    return errors


# --------------------------------------------------------------------------------------------
# Every architecture


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_holds_every_layer(calibrations, case):
    model, calibration = calibrations(case)
    merged = calibration.merged()
    rng = np.random.default_rng(1)
    for layer in calibration.model_layers.layers:
        moments = merged[layer.index].means()
        assert np.abs(moments["q_mean_real"]).max() > 0, f"{case} layer {layer.index}: zero query mean"
        key = rng.standard_normal(layer.head_dim)
        for p, t, error in identity_errors(layer, moments, key):
            assert error <= IDENTITY_RTOL, f"{case} layer {layer.index} p={p} t={t}: relative error {error:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rope_layer_calibrated(calibrations, case):
    model, calibration = calibrations(case)
    layers = calibration.model_layers
    calibrated = [layer.index for layer in layers.layers]
    skipped = [record["index"] for record in layers.skipped]
    assert skipped == EXPECTED_SKIPPED.get(case, [])
    assert sorted(calibrated + skipped) == list(range(layers.n_layers))
    merged = calibration.merged()
    assert sorted(merged) == calibrated
    for layer in layers.layers:
        assert merged[layer.index].count == calibration.token_count
        assert merged[layer.index].sums["abs"].shape == (layer.n_q_heads, layer.rope.n_bands)
        assert np.all(merged[layer.index].sums["abs"] > 0), f"{case} layer {layer.index} has an empty band"


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_json_matches_schema(calibrations, case):
    _, calibration = calibrations(case)
    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    layer_schema = {"$defs": schema["$defs"], **schema["$defs"]["layer"]}
    for layer in calibration.model_layers.layers:
        record = json.loads(json.dumps(layer.to_json()))
        jsonschema.validate(record, layer_schema)
        for name in ("type", "window", "head_dim", "shares_kv_with", "q_norm"):
            assert name in record, f"{case} layer {layer.index}: {name} missing"
        assert record["rope"]["rotary_dims"] == layer.rope.rotary_dims
        assert record["rope"]["settings"], f"{case} layer {layer.index}: no rope settings"
    assert calibration.model_layers.architecture["model_type"] in SUPPORTED


def _zero_query_projections(model) -> None:
    """Zero every layer's query projection, so correctly captured queries are exactly zero."""
    for layer in find_attention_layers(model).layers:
        attention = layer.attention
        q_proj = getattr(attention, "q_proj", None)
        if q_proj is not None:
            q_proj.weight = mx.zeros_like(q_proj.weight)
            if "bias" in q_proj:
                q_proj.bias = mx.zeros_like(q_proj.bias)
            continue
        # phi3 fuses q, k and v; the query rows come first.
        rows = layer.n_q_heads * layer.head_dim
        weight = attention.qkv_proj.weight
        attention.qkv_proj.weight = mx.concatenate([mx.zeros_like(weight[:rows]), weight[rows:]])


@pytest.mark.parametrize(
    "case, overrides",
    [(case, {}) for case in sorted(CASES) if CASES[case][0] is build_text_model]
    + [(case, {}) for case in sorted(CASES) if CASES[case][0] is build_vlm_model]
    # Gemma 4 rotates keys first; with as many KV heads as query heads, shapes cannot tell them apart.
    + [("gemma4_text", {"num_key_value_heads": 4})],
    ids=lambda value: value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in value.items()) or "default",
)
def test_capture_takes_queries_not_keys(case, overrides):
    model = _build(case, **overrides)
    _zero_query_projections(model)
    layers = find_attention_layers(model).layers
    calibration = calibrate(model, _tokens(120), bos_id=1, sequence_length=120, chunk_size=40, progress=False)
    merged = calibration.merged()
    for layer in layers:
        sums = merged[layer.index].sums
        assert np.all(sums["abs"] == 0), f"{case} layer {layer.index}: captured a tensor that is not the query"

    with RopeTaps(layers) as taps:
        backbone(model)(mx.array(_tokens(20)[None, :].astype(np.int32)), cache=make_cache(model))
        captured = taps.pop()
    for layer in layers:
        keys = captured[layer.index].keys
        if layer.shares_kv_with is not None:
            assert keys is None
            continue
        assert keys is not None, f"{case} layer {layer.index}: no keys captured"
        assert float(mx.abs(keys).max().item()) > 0, f"{case} layer {layer.index}: keys are zero"


def test_allow_list_entries_all_tested(calibrations):
    covered = set()
    for case in CASES:
        model, _ = calibrations(case)
        record = check_supported(model)
        covered.add((record["model_type"], record["module"]))
    listed = {(model_type, module) for model_type, entry in SUPPORTED.items() for module in entry.modules}
    assert listed - covered == set()


# --------------------------------------------------------------------------------------------
# Architecture-specific geometry


def _default_omega(base: float, rotary_dims: int) -> np.ndarray:
    return base ** (-np.arange(0, rotary_dims, 2) / rotary_dims)


def test_llama3_scaling_omega(calibrations):
    _, calibration = calibrations("llama")
    scaling = TEXT_CONFIGS["llama"]["rope_scaling"]
    factor, old_context = scaling["factor"], scaling["original_max_position_embeddings"]
    low_wavelength = old_context / scaling["low_freq_factor"]
    high_wavelength = old_context / scaling["high_freq_factor"]
    plain = _default_omega(TEXT_CONFIGS["llama"]["rope_theta"], 16)
    expected = []
    for omega in plain:
        wavelength = 2 * math.pi / omega
        if wavelength < high_wavelength:
            expected.append(omega)
        elif wavelength > low_wavelength:
            expected.append(omega / factor)
        else:
            smooth = (old_context / wavelength - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            expected.append((1 - smooth) * omega / factor + smooth * omega)
    for layer in calibration.model_layers.layers:
        assert layer.rope.rope_class == "Llama3RoPE"
        np.testing.assert_allclose(layer.rope.omega, expected, rtol=1e-6)
    assert np.sum(np.array(expected) < plain * (1 - 1e-9)) >= 2  # the case covers scaled bands


def test_gpt_oss_yarn_and_layer_types(calibrations):
    _, calibration = calibrations("gpt_oss")
    config = TEXT_CONFIGS["gpt_oss"]
    factor = config["rope_scaling"]["factor"]
    plain = _default_omega(config["rope_theta"], 16)
    for layer in calibration.model_layers.layers:
        assert layer.rope.rope_class == "YarnRoPE"
        assert layer.rope.input_scale == pytest.approx(0.1 * math.log(factor) + 1.0, rel=1e-6)
        assert layer.rope.omega[0] == pytest.approx(plain[0], rel=1e-6)  # fast band unscaled
        assert layer.rope.omega[-1] == pytest.approx(plain[-1] / factor, rel=1e-5)  # slow band scaled
        expected_type = "sliding" if layer.index % 2 == 0 else "global"
        assert layer.layer_type == expected_type
        assert layer.window == (config["sliding_window"] if expected_type == "sliding" else None)


@pytest.mark.parametrize("case", ["phi3", "phi3_longrope"])
def test_phi3_unrotated_dims_in_no_band(calibrations, case):
    model, calibration = calibrations(case)
    config = TEXT_CONFIGS[case]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary_dims = int(head_dim * config["partial_rotary_factor"])
    rng = np.random.default_rng(3)
    for layer in calibration.model_layers.layers:
        assert layer.head_dim == head_dim
        assert layer.rope.rotary_dims == rotary_dims
        assert layer.rope.n_bands == rotary_dims // 2
        real, imag = band_indices(layer.rope.layout, layer.rope.rotary_dims)
        assert sorted(np.concatenate([real, imag]).tolist()) == list(range(rotary_dims))
        # The live RoPE passes the dims beyond rotary_dims through unchanged.
        x = rng.standard_normal((1, 1, 1, head_dim))
        rotated = _rotate(layer.rope_module, x, 40000)
        np.testing.assert_allclose(rotated[..., rotary_dims:], x[..., rotary_dims:], rtol=1e-6)
        assert not np.allclose(rotated[..., :rotary_dims], x[..., :rotary_dims] * layer.rope.input_scale)


def test_phi3_longrope_factors_and_scale(calibrations):
    _, calibration = calibrations("phi3_longrope")
    config = TEXT_CONFIGS["phi3_longrope"]
    long_factor = np.array(config["rope_scaling"]["long_factor"])
    factor = config["max_position_embeddings"] / config["original_max_position_embeddings"]
    expected_scale = math.sqrt(1 + math.log(factor) / math.log(config["original_max_position_embeddings"]))
    for layer in calibration.model_layers.layers:
        assert layer.rope.rope_class == "SuScaledRoPE"
        assert layer.rope.input_scale == pytest.approx(expected_scale, rel=1e-6)
        np.testing.assert_allclose(layer.rope.omega, _default_omega(config["rope_theta"], 12) / long_factor, rtol=1e-6)


@pytest.mark.parametrize("case", ["gemma3_text", "gemma3_vlm"])
def test_gemma3_bases_by_layer_type(calibrations, case):
    _, calibration = calibrations(case)
    if case == "gemma3_text":
        config, global_base_name = TEXT_CONFIGS["gemma3_text"], "rope_theta"
    else:
        config, global_base_name = VLM_CONFIGS["gemma3"]["text_config"], "rope_global_base_freq"
    pattern = config["sliding_window_pattern"]
    head_dim = config["head_dim"]
    factor = config["rope_scaling"]["factor"]
    layers = calibration.model_layers.layers
    assert len(layers) == config["num_hidden_layers"]
    for layer in layers:
        sliding = (layer.index + 1) % pattern != 0
        settings = layer.to_json()["rope"]["settings"]
        assert np.all(layer.rope.omega > 0), f"layer {layer.index} has zero-filled bands"
        if sliding:
            assert layer.layer_type == "sliding"
            assert layer.window == config["sliding_window"]
            assert settings["base"] == config["rope_local_base_freq"]
            np.testing.assert_allclose(layer.rope.omega, _default_omega(config["rope_local_base_freq"], head_dim), rtol=1e-6)
        else:
            assert layer.layer_type == "global"
            assert layer.window is None
            assert settings["base"] == config[global_base_name]
            assert settings["scale"] == pytest.approx(1 / factor)
            np.testing.assert_allclose(layer.rope.omega, _default_omega(config[global_base_name], head_dim) / factor, rtol=1e-6)
    types = {layer.layer_type for layer in layers}
    assert types == {"sliding", "global"}


@pytest.mark.parametrize("case", ["gemma4_text", "gemma4_vlm"])
def test_gemma4_head_sizes_and_kv_sharing(calibrations, case):
    model, calibration = calibrations(case)
    config = TEXT_CONFIGS["gemma4_text"] if case == "gemma4_text" else VLM_CONFIGS["gemma4"]["text_config"]
    n_layers = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % config["sliding_window_pattern"] == 0 else "sliding_attention"
        for i in range(n_layers)
    ]
    first_shared = n_layers - config["num_kv_shared_layers"]
    last_of_type = {layer_types[i]: i for i in range(first_shared)}

    full = config["rope_parameters"]["full_attention"]
    global_head_dim = config["global_head_dim"]
    rotated = int(full["partial_rotary_factor"] * global_head_dim) // 2
    layers = {layer.index: layer for layer in calibration.model_layers.layers}
    assert sorted(layers) == list(range(n_layers))

    for index, layer in layers.items():
        record = layer.to_json()
        if layer_types[index] == "full_attention":
            assert layer.layer_type == "global"
            assert layer.head_dim == global_head_dim
            assert layer.rope.rotary_dims == global_head_dim
            assert record["rope"]["rotated_bands"] == rotated
            # Proportional RoPE spreads the exponents over the whole head, not the rotated part.
            expected = full["rope_theta"] ** (-np.arange(0, 2 * rotated, 2) / global_head_dim)
            np.testing.assert_allclose(layer.rope.omega[:rotated], expected, rtol=1e-6)
            assert np.all(layer.rope.omega[rotated:] == 0)
        else:
            assert layer.layer_type == "sliding"
            assert layer.window == config["sliding_window"]
            assert layer.head_dim == config["head_dim"]
            assert record["rope"]["rotated_bands"] == config["head_dim"] // 2

        expected_source = last_of_type[layer_types[index]] if index >= first_shared else None
        assert record["shares_kv_with"] == expected_source
        if expected_source is not None:
            source = layers[expected_source]
            assert source.head_dim == layer.head_dim
            np.testing.assert_array_equal(source.rope.omega, layer.rope.omega)


def test_mrope_band_layout_recorded(calibrations):
    _, calibration = calibrations("qwen2_5_vl")
    section = VLM_CONFIGS["qwen2_5_vl"]["rope_scaling"]["mrope_section"]
    expected_axes = [axis for axis, count in enumerate(section) for _ in range(count)]
    for layer in calibration.model_layers.layers:
        record = json.loads(json.dumps(layer.to_json()))
        assert record["mrope"]["section"] == section
        assert record["mrope"]["band_axis"] == expected_axes
        assert record["mrope"]["style"] == "chunked"
        np.testing.assert_allclose(layer.rope.omega, _default_omega(VLM_CONFIGS["qwen2_5_vl"]["rope_theta"], 16), rtol=1e-6)


def test_nope_layers_skipped_with_reason(calibrations):
    _, calibration = calibrations("smollm3")
    skipped = calibration.model_layers.skipped
    assert [record["index"] for record in skipped] == [3]
    assert "NoPE" in skipped[0]["reason"]
    assert 3 not in calibration.merged()


def test_linear_attention_layers_skipped(calibrations):
    _, calibration = calibrations("qwen3_next")
    skipped = calibration.model_layers.skipped
    assert [record["index"] for record in skipped] == [0, 1, 2]
    for record in skipped:
        assert "linear attention (Qwen3NextGatedDeltaNet)" in record["reason"]
    (layer,) = calibration.model_layers.layers
    assert layer.index == 3
    assert layer.has_q_norm
    assert layer.rope.rotary_dims == 8  # partial_rotary_factor 0.25 of head_dim 32


# --------------------------------------------------------------------------------------------
# Rejection before any work


def test_mamba_rejected_before_forward():
    model = build_text_model("mamba")
    # An empty corpus fails with a plain TriattnHubError, but only after the architecture check.
    with pytest.raises(UnsupportedModelError) as raised:
        calibrate(model, [], bos_id=1, sequence_length=64, progress=False)
    message = str(raised.value)
    assert "'mamba'" in message
    assert "no attention" in message
    assert "Supported model types: " in message
    assert "llama" in message


def test_unknown_model_type_rejected():
    model = build_text_model("llama")
    model.model_type = "llama_next"
    with pytest.raises(UnsupportedModelError) as raised:
        find_attention_layers(model)
    message = str(raised.value)
    assert "'llama_next'" in message
    assert "SUPPORTED" in message
    for model_type in SUPPORTED:
        assert model_type in message


def test_wrong_implementation_rejected():
    model = build_text_model("qwen2")
    model.model_type = "llama"
    with pytest.raises(UnsupportedModelError, match="only through mlx_lm.models.llama"):
        check_supported(model)


# --------------------------------------------------------------------------------------------
# The real Gemma 3 270M (GGUF Q4_K_M)

GEMMA3_TOKENS = 1024
CORPUS_DOCUMENTS = Path(__file__).resolve().parents[1] / "pipeline" / "triattn_hub" / "corpus" / "v1" / "documents"


@pytest.fixture(scope="module")
def gemma3_270m():
    try:
        from triattn_hub import gguf_model
    except ImportError as error:
        pytest.skip(f"triattn_hub.gguf_model is missing ({error}), so the real Gemma 3 270M cannot be loaded")
    model, tokenizer, info = gguf_model.load_gguf(gguf_model.gemma3_270m_gguf_path())
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted(CORPUS_DOCUMENTS.glob("*.txt")))
    ids = tokenizer.encode(text, add_special_tokens=False)[:GEMMA3_TOKENS]
    assert len(ids) == GEMMA3_TOKENS, f"the corpus documents give only {len(ids)} tokens"
    calibration = calibrate(
        model, ids, bos_id=tokenizer.bos_token_id, sequence_length=GEMMA3_TOKENS + 1, chunk_size=256, progress=False
    )
    return model, info, calibration


def test_gemma3_270m_layers_and_bases(gemma3_270m):
    _, info, calibration = gemma3_270m
    config = info["config"]
    layers = calibration.model_layers.layers
    assert calibration.model_layers.n_layers == 18
    assert [layer.index for layer in layers] == list(range(18))
    assert calibration.model_layers.skipped == []
    bases = {}
    for layer in layers:
        expected_type = "global" if (layer.index + 1) % 6 == 0 else "sliding"
        assert layer.layer_type == expected_type, f"layer {layer.index}"
        bases.setdefault(layer.layer_type, set()).add(layer.rope.settings["base"])
        assert np.all(layer.rope.omega > 0), f"layer {layer.index} has zero-filled bands"
        assert layer.window == (config["sliding_window"] if expected_type == "sliding" else None)
    assert bases == {"sliding": {config["rope_local_base_freq"]}, "global": {config["rope_theta"]}}
    assert config["rope_local_base_freq"] != config["rope_theta"]


def test_gemma3_270m_identity_every_layer(gemma3_270m):
    _, _, calibration = gemma3_270m
    merged = calibration.merged()
    rng = np.random.default_rng(2)
    for layer in calibration.model_layers.layers:
        moments = merged[layer.index].means()
        key = rng.standard_normal(layer.head_dim)
        for p, t, error in identity_errors(layer, moments, key):
            assert error <= IDENTITY_RTOL, f"Gemma 3 270M layer {layer.index} p={p} t={t}: relative error {error:.2e}"
