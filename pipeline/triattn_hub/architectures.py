"""The model architectures that triattn-hub calibrates, as an explicit allow-list.

Capture relies on how each architecture's attention applies RoPE: which module rotates the
queries, whether q_norm runs first, in which order queries and keys are rotated, and which
layers reuse another layer's keys. Each entry below was checked against the mlx-lm 0.32 or
mlx-vlm 0.7 implementation it names, and tests/test_architectures.py proves it on a tiny
random-weight model. A model whose type or implementation module is not listed is rejected
before any forward pass, because a guess could produce a calibration that is silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedModelError

MLX_LM = "mlx-lm"
MLX_VLM = "mlx-vlm"


@dataclass(frozen=True)
class Architecture:
    """Capture facts about one supported model type: its implementation modules and quirks."""

    model_type: str
    modules: tuple[str, ...]
    notes: str
    # Gemma 4 rotates the keys before the queries in every layer that computes its own keys.
    keys_rotated_first: bool = False

    def to_json(self, module: str) -> dict:
        return {
            "model_type": self.model_type,
            "library": MLX_VLM if module.startswith("mlx_vlm.") else MLX_LM,
            "module": module,
            "notes": self.notes,
            "keys_rotated_first": self.keys_rotated_first,
        }


def _entry(model_type: str, modules: tuple[str, ...], notes: str, **kwargs) -> tuple[str, Architecture]:
    return model_type, Architecture(model_type, modules, notes, **kwargs)


SUPPORTED: dict[str, Architecture] = dict(
    [
        _entry(
            "llama",
            ("mlx_lm.models.llama",),
            "nn.RoPE, or Llama3RoPE when rope_scaling has rope_type llama3, with GQA and "
            "optional sliding layers from layer_types",
        ),
        _entry(
            "mistral",
            ("mlx_lm.models.llama",),
            "runs on the llama implementation, which ignores the sliding_window of old configs, "
            "so every layer is global unless layer_types says otherwise",
        ),
        _entry("qwen2", ("mlx_lm.models.qwen2",), "nn.RoPE with biased q/k/v projections and GQA"),
        _entry("qwen3", ("mlx_lm.models.qwen3",), "q_norm and k_norm before RoPE, and an explicit head_dim"),
        _entry(
            "qwen3_next",
            ("mlx_lm.models.qwen3_next",),
            "linear-attention (Gated DeltaNet) layers are skipped. The full-attention layers have "
            "q_norm, a gate packed into q_proj and partial rotary",
        ),
        _entry(
            "phi3",
            ("mlx_lm.models.phi3",),
            "fused qkv_proj, partial_rotary_factor rotates only the first dims of each head, and "
            "longrope (SuScaledRoPE) scales the rotated dims of its input",
        ),
        _entry(
            "gemma3_text",
            ("mlx_lm.models.gemma3_text",),
            "sliding layers use rope_local_base_freq, global layers rope_theta and rope_scaling, "
            "and q_norm runs before RoPE",
        ),
        _entry(
            "gemma3",
            ("mlx_lm.models.gemma3", "mlx_vlm.models.gemma3.gemma3"),
            "the language model of a Gemma 3 multimodal checkpoint; the same layers as gemma3_text "
            "(mlx-vlm names the global base rope_global_base_freq)",
        ),
        _entry(
            "gemma4_text",
            ("mlx_lm.models.gemma4_text",),
            "sliding layers use head_dim and default RoPE. Full layers use global_head_dim and "
            "proportional RoPE whose unrotated bands have omega 0. The last num_kv_shared_layers "
            "reuse the keys of an earlier layer",
            keys_rotated_first=True,
        ),
        _entry(
            "gemma4",
            ("mlx_lm.models.gemma4", "mlx_vlm.models.gemma4.gemma4"),
            "the language model of a Gemma 4 multimodal checkpoint; the same layers as gemma4_text",
            keys_rotated_first=True,
        ),
        _entry(
            "gpt_oss",
            ("mlx_lm.models.gpt_oss",),
            "YaRN RoPE that scales its input by mscale, alternating sliding and full layers, and "
            "attention sinks, which do not change the queries",
        ),
        _entry(
            "qwen2_5_vl",
            ("mlx_vlm.models.qwen2_5_vl.qwen2_5_vl",),
            "M-RoPE applied by rotary_emb.apply_rotary. Text tokens have equal temporal, height "
            "and width positions, so each band rotates by omega_f times the text position. The "
            "band-to-axis layout (mrope_section) is recorded per layer",
        ),
        _entry(
            "smollm3",
            ("mlx_lm.models.smollm3",),
            "llama layers, except that every no_rope_layer_interval-th layer is NoPE and skipped",
        ),
    ]
)

# Model types that are known not to fit, with what is missing. Any other unlisted type gets a
# generic message.
KNOWN_UNSUPPORTED = {
    "mamba": "it has state-space layers and no attention, so there are no queries to calibrate",
    "mamba2": "it has state-space layers and no attention, so there are no queries to calibrate",
    "rwkv7": "it is a recurrent model without attention, so there are no queries to calibrate",
    "deepseek_v2": "multi-head latent attention rotates a separate RoPE part of each head, "
    "which capture does not split out",
    "deepseek_v3": "multi-head latent attention rotates a separate RoPE part of each head, "
    "which capture does not split out",
}


def model_type_of(model) -> str | None:
    """Return the model_type string of an mlx-lm or mlx-vlm model, or None if it has none."""
    value = getattr(model, "model_type", None)
    if isinstance(value, str):
        return value
    for name in ("args", "config"):
        value = getattr(getattr(model, name, None), "model_type", None)
        if isinstance(value, str):
            return value
    return None


def check_supported(model) -> dict:
    """Return the allow-list record of `model`, or raise UnsupportedModelError.

    The model type must be in SUPPORTED and the model's class must come from one of the
    implementation modules listed for it. The error names the model type, what is missing
    and the supported types.
    """
    model_type = model_type_of(model)
    module = type(model).__module__
    supported = ", ".join(sorted(SUPPORTED))
    if model_type is None:
        raise UnsupportedModelError(
            f"{module}.{type(model).__name__} declares no model_type, so its architecture cannot be "
            f"checked; supported model types: {supported}"
        )
    architecture = SUPPORTED.get(model_type)
    if architecture is None:
        reason = KNOWN_UNSUPPORTED.get(
            model_type,
            "its attention layout has not been checked against the RoPE capture; supporting it "
            "needs an entry in triattn_hub.architectures.SUPPORTED and a test that proves it",
        )
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({module}) is not supported: {reason}. "
            f"Supported model types: {supported}"
        )
    if module not in architecture.modules:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is supported only through {', '.join(architecture.modules)}, "
            f"but this model is {module}.{type(model).__name__}; load it with mlx-lm or mlx-vlm"
        )
    return architecture.to_json(module)
