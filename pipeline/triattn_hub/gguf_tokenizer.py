"""Build a Hugging Face fast tokenizer, wrapped for mlx-lm, from the vocabulary in GGUF metadata.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

- "gpt2": byte-level BPE with the merges stored in `tokenizer.ggml.merges`. The text is split
  before BPE as llama.cpp splits it for the `tokenizer.ggml.pre` value.
- "llama": SentencePiece BPE with byte fallback. The file stores a score per token but no
  merges. SentencePiece merges the adjacent pair whose concatenation has the highest score, so
  every split of a token into two tokens becomes a merge, ranked by the score of the whole.

Tokens typed CONTROL become special added tokens. USER_DEFINED tokens (Gemma's runs of spaces,
tabs and newlines, HTML tags) become plain added tokens matched in the raw text, as llama.cpp
matches them.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from gguf.constants import TokenType
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .errors import GGUFFormatError

logger = logging.getLogger(__name__)

SPM_SPACE = "\u2581"

# Pre-tokenizer split of Llama 3 style vocabularies (the `pattern` of their tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SPECIAL_KEYS = (
    ("bos_token", "bos_token_id"),
    ("eos_token", "eos_token_id"),
    ("unk_token", "unknown_token_id"),
    ("pad_token", "padding_token_id"),
)

# Texts of control tokens that end a chat turn. Generation stops on them as well as on EOS,
# because a chat model emits them in place of EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")


def _byte_level_pre_tokenizer(pre: str):
    """Return the pre-tokenizer that splits text as llama.cpp does for byte-level `pre` type `pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":
        # llama.cpp isolates every digit first. SmolLM's vocabulary has no token with a digit
        # next to another character, so its merges were learned on isolated digits.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # NOTE: this split has not been compared with llama.cpp's tokenization of a Llama 3 file.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise GGUFFormatError(
        f"unsupported GGUF pre-tokenizer {pre!r} for a byte-level vocabulary. Supported: "
        f"gpt2, smollm, llama-bpe (llama3, llama-v3)."
    )


def _split_merge(merge: str) -> tuple[str, str]:
    """Split a stored merge "left right" at the first space after its first character, as llama.cpp does."""
    cut = merge.find(" ", 1)
    if cut < 0:
        raise GGUFFormatError(f"invalid GGUF merge {merge!r}: expected two tokens separated by a space")
    return merge[:cut], merge[cut + 1 :]


def _build_byte_level(metadata: dict[str, Any]) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFFormatError("the GGUF byte-level vocabulary has no tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [_split_merge(merge) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """Return BPE merges, best first, equivalent to SentencePiece's score-driven BPE.

    A merge (left, right) exists for every NORMAL token that splits into two NORMAL tokens and
    ranks by the score of the merged token. Ties keep vocabulary order.
    """
    normal = {token for token, token_type in zip(tokens, token_types) if token_type == TokenType.NORMAL}
    ranked = []
    for index, token in enumerate(tokens):
        if token_types[index] != TokenType.NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_sentencepiece(metadata: dict[str, Any]) -> Tokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores")
    token_types = metadata.get("tokenizer.ggml.token_type")
    if scores is None or token_types is None:
        raise GGUFFormatError(
            "the GGUF SentencePiece vocabulary is missing tokenizer.ggml.scores or tokenizer.ggml.token_type"
        )
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = sentencepiece_merges(tokens, scores, token_types)
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    return tokenizer


def _add_typed_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int] | None, special_ids: set[int]) -> None:
    """Add CONTROL tokens and the BOS/EOS/UNK/PAD tokens as special tokens, USER_DEFINED as plain ones."""
    types = token_types or [TokenType.NORMAL] * len(tokens)
    special = []
    user_defined = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.CONTROL or index in special_ids:
            special.append(token)
        elif kind == TokenType.USER_DEFINED:
            user_defined.append(token)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])


def _wrap_backend(backend: Tokenizer, vocab_size: int, **kwargs) -> PreTrainedTokenizerFast:
    """Wrap `backend` in a transformers fast tokenizer without copying its BPE model.

    `PreTrainedTokenizerFast` deep-copies the object it is given, which round-trips the whole
    model through JSON (5.6 s measured for Gemma 3's 513k merges on a 2-core CPU). The copy is
    made while the backend contains a stand-in model whose vocabulary is only the added tokens,
    at their real ids, so transformers finds every special token and assigns no new ids. The
    real model is put back afterwards.
    """
    model = backend.model
    added = backend.get_added_tokens_decoder()
    backend.model = models.BPE(vocab={token.content: index for index, token in added.items()}, merges=[])
    try:
        wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    finally:
        backend.model = model
    wrapped.backend_tokenizer.model = model
    if len(wrapped) != vocab_size:
        raise GGUFFormatError(
            f"the tokenizer built from the GGUF vocabulary has {len(wrapped)} tokens instead of "
            f"{vocab_size}, probably because the vocabulary lists a token twice"
        )
    return wrapped


def _token_text(metadata: dict[str, Any], key: str) -> str | None:
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    tokens = metadata["tokenizer.ggml.tokens"]
    if token_id is None or not 0 <= token_id < len(tokens):
        return None
    return tokens[token_id]


def build_tokenizer(metadata: dict[str, Any]) -> tuple[TokenizerWrapper, dict]:
    """Build the mlx-lm tokenizer described by GGUF `metadata`, and a JSON record of it.

    The chat template is `tokenizer.chat_template` when the file has one and None otherwise.
    BOS is added on encode when `tokenizer.ggml.add_bos_token` is true. A file without the key
    gets True for a SentencePiece vocabulary, as in llama.cpp, and False for a byte-level one.
    Raises GGUFFormatError for a vocabulary kind or pre-tokenizer not listed in the module docstring.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFFormatError("the GGUF file has no tokenizer.ggml.tokens, so it carries no tokenizer")
    if kind == "gpt2":
        backend = _build_byte_level(metadata)
        detokenizer_class = BPEStreamingDetokenizer
    elif kind == "llama":
        backend = _build_sentencepiece(metadata)
        add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        detokenizer_class = partial(SPMStreamingDetokenizer, trim_space=add_space_prefix)
    else:
        raise GGUFFormatError(
            f"unsupported GGUF tokenizer model {kind!r}. Supported: 'gpt2' (byte-level BPE) and "
            f"'llama' (SentencePiece BPE)."
        )

    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type")
    special_ids = {metadata[f"tokenizer.ggml.{key}"] for _, key in _SPECIAL_KEYS if f"tokenizer.ggml.{key}" in metadata}
    _add_typed_tokens(backend, tokens, token_types, special_ids)

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    chat_template = metadata.get("tokenizer.chat_template")
    special = {name: _token_text(metadata, key) for name, key in _SPECIAL_KEYS}
    hf_tokenizer = _wrap_backend(
        backend,
        len(tokens),
        chat_template=chat_template,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        **{name: text for name, text in special.items() if text is not None},
    )
    for name, key in _SPECIAL_KEYS:
        expected = metadata.get(f"tokenizer.ggml.{key}")
        if special[name] is not None and getattr(hf_tokenizer, f"{name}_id") != expected:
            raise GGUFFormatError(
                f"{name} {special[name]!r} maps to id {getattr(hf_tokenizer, f'{name}_id')} instead of "
                f"tokenizer.ggml.{key} = {expected}, probably because the vocabulary lists it twice"
            )

    eos_ids = {metadata["tokenizer.ggml.eos_token_id"]} if "tokenizer.ggml.eos_token_id" in metadata else set()
    for key in ("eot_token_id", "eom_token_id"):
        if f"tokenizer.ggml.{key}" in metadata:
            eos_ids.add(metadata[f"tokenizer.ggml.{key}"])
    if token_types is not None:
        for index, token in enumerate(tokens):
            if token in _END_OF_TURN_TOKENS and token_types[index] == TokenType.CONTROL:
                eos_ids.add(index)

    wrapper = TokenizerWrapper(hf_tokenizer, detokenizer_class=detokenizer_class, eos_token_ids=sorted(eos_ids))
    record = {
        "model": kind,
        "pre": metadata.get("tokenizer.ggml.pre"),
        "vocab_size": len(tokens),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **{name: text for name, text in special.items()},
        "eos_token_ids": sorted(eos_ids),
        "has_chat_template": chat_template is not None,
    }
    logger.debug("built %s tokenizer with %d tokens", kind, len(tokens))
    return wrapper, record
