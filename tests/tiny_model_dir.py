"""A tiny random llama saved as a Hugging Face-layout model directory, with a character tokenizer.

The directory has config.json, model.safetensors and the files transformers' AutoTokenizer
reads, so `sources.load_model(..., source=directory)` and `mlx_lm.load` open it like a
downloaded model. Calibrating it on a short text takes a few seconds.
"""

import json
import string
from pathlib import Path

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# Printable characters up to the tiny llama's vocabulary of 97 ids.
CHARACTERS = list(dict.fromkeys(string.ascii_letters + string.digits + " .,;:!?'\"-()\n"))


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(str(directory))


def save_tiny_llama_dir(directory, *, seed: int = 0, config_overrides: dict | None = None) -> Path:
    """Write a tiny random llama (2 layers, 4 query heads, head size 16) into `directory`.

    `config_overrides` is merged into config.json, for example to declare another model_type
    whose mlx-lm implementation reads the same weights.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from tiny_models import tiny_llama

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed=seed)
    assert len(SPECIAL_TOKENS) + len(CHARACTERS) <= model.args.vocab_size
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    args = model.args
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "rms_norm_eps": args.rms_norm_eps,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_theta": args.rope_theta,
        "rope_traditional": args.rope_traditional,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **(config_overrides or {}),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _save_tokenizer(directory)
    return directory


# A granite config over llama weights: mlx-lm loads it, and the calibrator's allow-list rejects it.
GRANITE_OVERRIDES = {
    "model_type": "granite",
    "architectures": ["GraniteForCausalLM"],
    "logits_scaling": 1.0,
    "attention_multiplier": 0.25,
    "embedding_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "attention_bias": False,
    "mlp_bias": False,
}
