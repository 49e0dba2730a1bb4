"""Tiny random-weight models of every supported architecture, built from their real configs.

Each config follows a published config.json with the layer count, widths and vocabulary cut
down. It keeps what sets the architecture apart: GQA, q_norm, sliding and global layers with
different bases, partial rotary, Llama-3 and YaRN scaling, proportional RoPE, per-layer head
sizes, KV sharing and M-RoPE sections. Models are built the way mlx-lm and mlx-vlm load them
(their own model-type lookup, config classes and constructors), with random weights.
"""

from __future__ import annotations

import copy

import mlx.core as mx

VOCAB = 97

TEXT_CONFIGS = {
    # Llama 3.1: rope_theta 500000 and llama3 scaling; with head_dim 16 the eight bands cover
    # the unscaled, smoothed and scaled regimes.
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    },
    # Mistral 7B v0.3 style: rope_theta 1e6, GQA 4:1.
    "mistral": {
        "model_type": "mistral",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
    },
    # Qwen2.5: biased q/k/v projections, rope_theta 1e6.
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    # Qwen3: q_norm and k_norm, head_dim larger than hidden_size / heads.
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    # Phi-3 with partial rotary: half of each head is rotated, the rest passes through.
    "phi3": {
        "model_type": "phi3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "tie_word_embeddings": False,
    },
    # Phi-4-mini style: partial_rotary_factor 0.75 with longrope (SuScaledRoPE) factors for
    # the rotated bands only.
    "phi3_longrope": {
        "model_type": "phi3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [1.0, 1.2, 2.0, 4.0, 8.0, 16.0],
        },
        "tie_word_embeddings": True,
    },
    # Gemma 3 text: pattern 3 gives sliding layers 0, 1, 3, 4 and global layers 2, 5. Sliding
    # layers use rope_local_base_freq, global ones rope_theta with linear scaling (as in the
    # 4B and larger checkpoints).
    "gemma3_text": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 32,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "max_position_embeddings": 131072,
    },
    # Gemma 4 text: sliding layers with head_dim 16 and default RoPE, full layers with
    # global_head_dim 32 and proportional RoPE rotating a quarter of the head, per-layer
    # inputs, and the last three layers reusing earlier keys.
    "gemma4_text": {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "num_hidden_layers": 6,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 8,
        "num_kv_shared_layers": 3,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    },
    # gpt-oss: YaRN with factor 32, alternating sliding and full layers, MoE, sinks.
    "gpt_oss": {
        "model_type": "gpt_oss",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB,
        "sliding_window": 16,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
    },
    # A Gemma 3 multimodal checkpoint loaded with mlx-lm, which keeps only the language model.
    "gemma3": {
        "model_type": "gemma3",
        "vocab_size": VOCAB,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "sliding_window_pattern": 2,
        },
    },
    # A Gemma 4 multimodal checkpoint loaded with mlx-lm.
    "gemma4": {
        "model_type": "gemma4",
        "vocab_size": VOCAB,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 32,
            "vocab_size_per_layer_input": VOCAB,
            "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 1,
            "sliding_window": 16,
            "sliding_window_pattern": 2,
            "rope_parameters": {
                "full_attention": {
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                    "rope_type": "proportional",
                },
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
        },
    },
    # Qwen3-Next: three linear-attention (Gated DeltaNet) layers per full-attention layer. The
    # full-attention layers have q_norm, gated queries and partial rotary (a quarter of the head).
    "qwen3_next": {
        "model_type": "qwen3_next",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 8,
        "linear_value_head_dim": 8,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "max_position_embeddings": 262144,
        "full_attention_interval": 4,
        "tie_word_embeddings": False,
    },
    # SmolLM3: every fourth layer is NoPE.
    "smollm3": {
        "model_type": "smollm3",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 65536,
        "rope_theta": 5000000.0,
        "no_rope_layer_interval": 4,
        "tie_word_embeddings": True,
    },
    # Mamba: a state-space model, not on the allow-list.
    "mamba": {
        "model_type": "mamba",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "state_size": 8,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 4,
        "tie_word_embeddings": True,
    },
}

_SIGLIP_VISION = {
    "model_type": "siglip_vision_model",
    "num_hidden_layers": 1,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "patch_size": 14,
    "image_size": 28,
}

VLM_CONFIGS = {
    # Gemma 3 multimodal (4B style): the language model has sliding and global layers, the
    # global ones with linear scaling; mlx-vlm names the global base rope_global_base_freq.
    "gemma3": {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": VOCAB,
            "rope_global_base_freq": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "sliding_window_pattern": 2,
            "mm_tokens_per_image": 1,
        },
        "vision_config": _SIGLIP_VISION,
        "vocab_size": VOCAB,
        "image_token_index": VOCAB - 1,
        "hidden_size": 64,
    },
    # Gemma 4 multimodal (E2B style): per-layer inputs, proportional RoPE on full layers,
    # wider global heads and KV sharing in the last layers.
    "gemma4": {
        "model_type": "gemma4",
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": 64,
            "num_hidden_layers": 5,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "global_head_dim": 32,
            "vocab_size": VOCAB,
            "vocab_size_per_layer_input": VOCAB,
            "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 2,
            "sliding_window": 16,
            "sliding_window_pattern": 3,
            "layer_types": [
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "full_attention",
            ],
            "rope_parameters": {
                "full_attention": {
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1000000.0,
                    "rope_type": "proportional",
                },
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
        },
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "global_head_dim": 8,
            "patch_size": 4,
            "position_embedding_size": 64,
            "pooling_kernel_size": 2,
            "default_output_length": 4,
        },
        "audio_config": None,
        "vocab_size": VOCAB,
        "hidden_size": 64,
    },
    # Qwen2.5-VL: M-RoPE with sections [2, 3, 3] over the eight bands of a 16-dim head
    # (the published 7B model uses [16, 24, 24] over 64 bands).
    "qwen2_5_vl": {
        "model_type": "qwen2_5_vl",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 128000,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": True,
        "vision_config": {
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "out_hidden_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [0],
        },
    },
}


def build_text_model(name: str, seed: int = 0, **overrides):
    """Build the tiny mlx-lm model `name` of TEXT_CONFIGS with random weights."""
    from mlx_lm.utils import _get_classes

    config = copy.deepcopy(TEXT_CONFIGS[name])
    config.update(overrides)
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def build_vlm_model(name: str, seed: int = 0):
    """Build the tiny mlx-vlm model `name` of VLM_CONFIGS with random weights."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    config = copy.deepcopy(VLM_CONFIGS[name])
    module, _ = get_model_and_args(config)
    model_config = module.ModelConfig.from_dict(config)
    model_config = update_module_configs(model_config, module, config, ["text", "vision", "audio"])
    mx.random.seed(seed)
    model = module.Model(model_config)
    mx.eval(model.parameters())
    return model
