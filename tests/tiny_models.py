"""Tiny random-weight mlx-lm models for tests."""

import mlx.core as mx
from mlx_lm.models import llama


def tiny_llama(*, traditional=False, rope_scaling=None, seed=0, n_layers=2, heads=4, kv_heads=2, head_dim=16):
    """Return a tiny random llama with the given RoPE settings, evaluated and ready to run."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=heads * head_dim,
        num_hidden_layers=n_layers,
        intermediate_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=97,
        head_dim=head_dim,
        max_position_embeddings=65536,
        rope_theta=10000.0,
        rope_traditional=traditional,
        rope_scaling=rope_scaling,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model
