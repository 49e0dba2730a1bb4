"""Capture pre-RoPE queries (and keys) from an mlx model by wrapping each layer's RoPE module.

MLX has no forward hooks. Every supported attention module rotates its queries and keys with
`self.rope(x, offset=...)` after any q_norm, so the input of that call is exactly the pre-RoPE
query or key. `RopeTaps` swaps each layer's `rope` for a recording wrapper for the duration
of a `with` block and puts the original module back afterwards, even on error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from .errors import UnsupportedModelError
from .rope import RopeGeometry, read_rope

logger = logging.getLogger(__name__)

_ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
_HEAD_COUNT_NAMES = ("n_heads", "num_heads", "num_attention_heads")
_KV_HEAD_COUNT_NAMES = ("n_kv_heads", "num_kv_heads", "num_key_value_heads")


@dataclass
class AttentionLayer:
    """One decoder layer's attention module and what calibration needs to know of it."""

    index: int
    attention: nn.Module
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RopeGeometry
    layer_type: str = "global"
    window: int | None = None
    has_q_norm: bool = False

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "type": self.layer_type,
            "window": self.window,
            "n_q_heads": self.n_q_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "q_norm": self.has_q_norm,
            "rope": self.rope.to_json(),
        }


@dataclass
class ModelLayers:
    """The RoPE attention layers of a model, and the layers skipped with the reason."""

    layers: list[AttentionLayer]
    skipped: list[dict] = field(default_factory=list)
    n_layers: int = 0


def decoder_layers(model: nn.Module) -> list:
    """Return the list of decoder blocks of an mlx-lm model or of an mlx-vlm language model."""
    for owner in (model, getattr(model, "language_model", None)):
        if owner is None:
            continue
        layers = getattr(owner, "layers", None)
        if isinstance(layers, (list, tuple)) and layers:
            return list(layers)
        inner = getattr(owner, "model", None)
        layers = getattr(inner, "layers", None) if inner is not None else None
        if isinstance(layers, (list, tuple)) and layers:
            return list(layers)
    raise UnsupportedModelError(
        f"{type(model).__module__}.{type(model).__name__} has no list of decoder layers "
        "(looked for .layers, .model.layers and .language_model.layers)"
    )


def _first_int(module, names) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _find_attention(block) -> nn.Module | None:
    for name in _ATTENTION_NAMES:
        candidate = getattr(block, name, None)
        if isinstance(candidate, nn.Module):
            return candidate
    return None


def _model_args(model):
    for owner in (model, getattr(model, "language_model", None)):
        args = getattr(owner, "args", None) if owner is not None else None
        if args is not None:
            return args
    return None


def _layer_type(attention, index: int, args) -> tuple[str, int | None]:
    window = getattr(args, "sliding_window", None) if args is not None else None
    layer_types = getattr(args, "layer_types", None) if args is not None else None
    sliding = getattr(attention, "is_sliding", None)
    if sliding is None and isinstance(layer_types, (list, tuple)) and index < len(layer_types):
        sliding = "sliding" in str(layer_types[index])
    if sliding is None:
        sliding = bool(getattr(attention, "use_sliding", False) or getattr(attention, "sliding_window", None))
    if sliding:
        return "sliding", int(window) if isinstance(window, int) else getattr(attention, "sliding_window", None)
    return "global", None


def find_attention_layers(model: nn.Module) -> ModelLayers:
    """Locate every RoPE attention layer of `model` and read its geometry.

    Layers whose block has no attention module, or an attention module without a `rope`
    (linear attention, state-space layers, NoPE layers), are listed in `skipped` with the
    reason. Raises UnsupportedModelError when no layer uses RoPE or a layer's head counts
    cannot be read.
    """
    blocks = decoder_layers(model)
    args = _model_args(model)
    found: list[AttentionLayer] = []
    skipped: list[dict] = []
    geometry_cache: dict[int, RopeGeometry] = {}
    for index, block in enumerate(blocks):
        attention = _find_attention(block)
        if attention is None:
            skipped.append({"index": index, "reason": f"{type(block).__name__} has no attention module"})
            continue
        rope = getattr(attention, "rope", None)
        if rope is None or not callable(rope):
            skipped.append({"index": index, "reason": f"{type(attention).__name__} applies no RoPE"})
            continue
        n_q = _first_int(attention, _HEAD_COUNT_NAMES)
        n_kv = _first_int(attention, _KV_HEAD_COUNT_NAMES) or n_q
        head_dim = _first_int(attention, ("head_dim",))
        if head_dim is None and n_q:
            q_proj = getattr(attention, "q_proj", None)
            weight = getattr(q_proj, "weight", None)
            if weight is not None:
                head_dim = weight.shape[0] // n_q
        if not (n_q and n_kv and head_dim):
            raise UnsupportedModelError(
                f"layer {index}: cannot read query heads, KV heads and head_dim from "
                f"{type(attention).__name__}"
            )
        key = id(rope)
        if key not in geometry_cache:
            geometry_cache[key] = read_rope(rope, head_dim)
        layer_type, window = _layer_type(attention, index, args)
        found.append(
            AttentionLayer(
                index=index,
                attention=attention,
                n_q_heads=n_q,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                rope=geometry_cache[key],
                layer_type=layer_type,
                window=window,
                has_q_norm=getattr(attention, "q_norm", None) is not None,
            )
        )
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__module__}: none of its {len(blocks)} layers applies RoPE attention, "
            "so there is nothing for TriAttention to calibrate"
        )
    return ModelLayers(layers=found, skipped=skipped, n_layers=len(blocks))


class _Recording:
    """Calls seen by the taps during one forward pass, keyed by layer index."""

    def __init__(self):
        self.calls: dict[int, list[tuple[mx.array, object]]] = {}


class _RopeTap(nn.Module):
    def __init__(self, inner: nn.Module, layer_index: int, recording: _Recording):
        super().__init__()
        self.inner = inner
        # Plain attributes, not mlx children, so they stay out of the parameter tree.
        object.__setattr__(self, "_layer_index", layer_index)
        object.__setattr__(self, "_recording", recording)

    def __getattr__(self, name):
        # Attention code may read attributes of its RoPE module (dims, base, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "inner" not in self:
                raise
            return getattr(self["inner"], name)

    def __call__(self, x, *args, **kwargs):
        offset = kwargs.get("offset", args[0] if args else 0)
        self._recording.calls.setdefault(self._layer_index, []).append((x, offset))
        return self.inner(x, *args, **kwargs)


@dataclass
class Captured:
    """Pre-RoPE queries [batch, query heads, tokens, head_dim] of one layer, and keys if taken."""

    queries: mx.array
    offset: object
    keys: mx.array | None = None


class RopeTaps:
    """Context manager that records the pre-RoPE queries and keys of the given layers.

    Use `pop()` after each forward pass to take that pass's captures, which also frees them.
    """

    def __init__(self, layers: list[AttentionLayer]):
        self.layers = layers
        self._recording = _Recording()
        self._originals: list[tuple[AttentionLayer, nn.Module]] = []

    def __enter__(self) -> "RopeTaps":
        for layer in self.layers:
            original = layer.attention.rope
            layer.attention.rope = _RopeTap(original, layer.index, self._recording)
            self._originals.append((layer, original))
        return self

    def __exit__(self, *exc) -> None:
        for layer, original in self._originals:
            layer.attention.rope = original
        self._originals.clear()
        self._recording.calls.clear()

    def pop(self) -> dict[int, Captured]:
        """Return this forward pass's captures by layer index and clear them.

        The query is the first call whose head axis has the query head count. The key is the
        next call with the KV head count; layers that reuse another layer's keys have none.
        """
        calls = self._recording.calls
        self._recording.calls = {}
        result: dict[int, Captured] = {}
        for layer in self.layers:
            seen = calls.get(layer.index, [])
            query_at = next((i for i, (x, _) in enumerate(seen) if x.shape[1] == layer.n_q_heads), None)
            if query_at is None:
                raise UnsupportedModelError(
                    f"layer {layer.index}: its RoPE was never called on a tensor with "
                    f"{layer.n_q_heads} query heads (shapes seen: {[tuple(x.shape) for x, _ in seen]})"
                )
            queries, offset = seen[query_at]
            keys = next(
                (x for x, _ in seen[query_at + 1 :] if x.shape[1] == layer.n_kv_heads), None
            )
            result[layer.index] = Captured(queries=queries, offset=offset, keys=keys)
        return result
