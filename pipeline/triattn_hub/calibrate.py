"""Offline Q-center calibration: run a token stream through a model and accumulate statistics.

The corpus is cut into sequences of `sequence_length` tokens, each starting with the model's
BOS token when it has one. Every sequence goes through the model in chunks of `chunk_size`
tokens with the model's own KV cache, so each token sits at its true position and sees the
whole preceding sequence, exactly as in a single long prefill.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from tqdm.auto import tqdm

from .capture import ModelLayers, RopeTaps, find_attention_layers
from .errors import TriattnHubError
from .rope import split_bands
from .stats import BandStats

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 512
# Cap for the default sequence length: attention cost grows with the square of the length.
MAX_DEFAULT_SEQUENCE_LENGTH = 8192


@dataclass
class Calibration:
    """Statistics of one calibration run, per layer and per corpus sequence."""

    model_layers: ModelLayers
    sequence_stats: list[dict[int, BandStats]]
    sequence_length: int
    chunk_size: int
    seconds: float = 0.0
    compute_dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @property
    def token_count(self) -> int:
        first = self.model_layers.layers[0].index
        return sum(stats[first].count for stats in self.sequence_stats)

    def merged(self, sequences: slice | None = None) -> dict[int, BandStats]:
        """Return per-layer statistics over the selected sequences (all by default)."""
        chosen = self.sequence_stats[sequences] if sequences is not None else self.sequence_stats
        if not chosen:
            raise ValueError("no sequences selected")
        total = {}
        for stats in chosen:
            for index, layer_stats in stats.items():
                total[index] = layer_stats if index not in total else total[index].merge(layer_stats)
        return total


def context_length(model: nn.Module) -> int | None:
    """Return the model's maximum context in tokens, read from its config, if declared."""
    for owner in (model, getattr(model, "language_model", None)):
        args = getattr(owner, "args", None) if owner is not None else None
        for name in ("max_position_embeddings", "context_length", "max_seq_len"):
            value = getattr(args, name, None) if args is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def default_sequence_length(model: nn.Module) -> int:
    """Return the model's context length, capped at MAX_DEFAULT_SEQUENCE_LENGTH."""
    context = context_length(model)
    if context is None:
        return 4096
    return min(context, MAX_DEFAULT_SEQUENCE_LENGTH)


def split_sequences(token_ids, sequence_length: int, bos_id: int | None) -> list[np.ndarray]:
    """Cut a token stream into sequences of at most `sequence_length` tokens.

    A leading BOS in `token_ids` is dropped; when `bos_id` is given, every sequence starts
    with it, so each one looks like the start of a document to the model.
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if bos_id is not None and ids.size and ids[0] == bos_id:
        ids = ids[1:]
    body = sequence_length - (1 if bos_id is not None else 0)
    if body < 1:
        raise TriattnHubError(f"sequence_length={sequence_length} leaves no room for tokens; use at least 2")
    sequences = []
    for start in range(0, ids.size, body):
        piece = ids[start : start + body]
        if bos_id is not None:
            piece = np.concatenate([[bos_id], piece])
        sequences.append(piece)
    return sequences


def backbone(model: nn.Module):
    """Return the part of the model that runs the decoder layers without the LM head.

    Calibration needs only the queries, so skipping the vocabulary projection saves a large
    share of the work on small models.
    """
    for owner in (getattr(model, "language_model", None), model):
        inner = getattr(owner, "model", None) if owner is not None else None
        if inner is not None and isinstance(getattr(inner, "layers", None), (list, tuple)):
            return inner
    return model


def make_cache(model: nn.Module) -> list:
    """Return a fresh KV cache list for the model, built by the model itself where it can.

    mlx-vlm models may define `make_cache` only on their language model (Gemma 3 needs it for
    its sliding-window layers) or not at all. Those without one get mlx-vlm's own cache classes.
    """
    for owner in (model, getattr(model, "language_model", None)):
        if owner is not None and hasattr(owner, "make_cache"):
            return owner.make_cache()
    if type(model).__module__.startswith("mlx_vlm."):
        from mlx_vlm.models.cache import make_prompt_cache as make_vlm_prompt_cache

        return make_vlm_prompt_cache(model)
    return make_prompt_cache(model)


def _offset_value(offset) -> int:
    if isinstance(offset, mx.array):
        return int(offset.reshape(-1)[0].item())
    return int(offset)


def run_sequence(model, layers, taps: RopeTaps, sequence: np.ndarray, chunk_size: int, on_chunk) -> None:
    """Feed one sequence through the model chunk by chunk and hand each chunk's captures on."""
    forward = backbone(model)
    cache = make_cache(model)
    for start in range(0, sequence.size, chunk_size):
        chunk = mx.array(sequence[start : start + chunk_size][None, :].astype(np.int32))
        hidden = forward(chunk, cache=cache)
        captured = taps.pop()
        mx.eval(hidden, *(c.queries for c in captured.values()))
        for layer in layers:
            offset = _offset_value(captured[layer.index].offset)
            if offset != start:
                raise TriattnHubError(
                    f"layer {layer.index}: RoPE offset {offset} for a chunk starting at token {start}; "
                    "the model's cache does not track positions as expected"
                )
        on_chunk(start, captured)


def calibrate(
    model: nn.Module,
    token_ids,
    *,
    bos_id: int | None = None,
    sequence_length: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = True,
    model_layers: ModelLayers | None = None,
) -> Calibration:
    """Accumulate per-layer, per-head, per-band query statistics over `token_ids`.

    Returns a Calibration holding one set of BandStats per sequence, so that split-half
    comparisons reuse the same forward passes. Raises UnsupportedModelError (from
    `find_attention_layers`) before any forward pass when the model has no RoPE attention.
    """
    model_layers = model_layers or find_attention_layers(model)
    sequence_length = sequence_length or default_sequence_length(model)
    if chunk_size < 1:
        raise TriattnHubError(f"chunk_size={chunk_size} must be at least 1")
    sequences = split_sequences(token_ids, sequence_length, bos_id)
    total = sum(s.size for s in sequences)
    if total == 0:
        raise TriattnHubError("the corpus produced no tokens; check the corpus and the tokenizer")
    layers = model_layers.layers
    logger.info(
        "calibrating %d layers on %d tokens in %d sequences of up to %d tokens",
        len(layers), total, len(sequences), sequence_length,
    )
    sequence_stats: list[dict[int, BandStats]] = []
    started = time.perf_counter()
    bar = tqdm(total=total, unit="tok", desc="calibrating", disable=not progress)
    with RopeTaps(layers) as taps:
        for sequence in sequences:
            stats = {layer.index: BandStats(layer.n_q_heads, layer.rope.n_bands) for layer in layers}

            def accumulate(start, captured, stats=stats):
                for layer in layers:
                    queries = np.asarray(captured[layer.index].queries.astype(mx.float32))[0]
                    real, imag = split_bands(queries, layer.rope.layout, layer.rope.rotary_dims)
                    stats[layer.index].update(real, imag)
                bar.update(next(iter(captured.values())).queries.shape[2])

            run_sequence(model, layers, taps, sequence, chunk_size, accumulate)
            sequence_stats.append(stats)
    bar.close()
    seconds = time.perf_counter() - started
    logger.info("calibrated %d tokens in %.1f s (%.1f tokens/s)", total, seconds, total / max(seconds, 1e-9))
    return Calibration(
        model_layers=model_layers,
        sequence_stats=sequence_stats,
        sequence_length=sequence_length,
        chunk_size=chunk_size,
        seconds=seconds,
        compute_dtype=model_compute_dtype(model),
    )


def model_compute_dtype(model: nn.Module) -> str:
    """Return the dtype of the model's floating-point weights ("mixed" if several)."""
    from mlx.utils import tree_flatten

    kinds = {str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters()) if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)}
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed:" + ",".join(sorted(kinds))
