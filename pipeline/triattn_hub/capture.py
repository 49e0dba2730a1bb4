"""Capture pre-RoPE queries (and keys) from an mlx model by wrapping each layer's RoPE module.

MLX has no forward hooks. Every supported attention module rotates its queries and keys with
`self.rope(x, offset=...)` after any q_norm, so the input of that call is exactly the pre-RoPE
query or key. M-RoPE models (Qwen2.5-VL) call `self.rotary_emb.apply_rotary(q, k, ...)`
instead, see mrope.py. `RopeTaps` swaps each layer's `rope` (or `rotary_emb`) for a recording
wrapper for the duration of a `with` block and puts the original module back afterwards, even
on error. Only architectures on the allow-list in architectures.py are accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .architectures import check_supported
from .errors import UnsupportedModelError
from .mrope import MRopeTap, TextPositionRoPE, is_mrope_module, mrope_record
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
    # Index of the earlier layer whose keys this layer attends to (Gemma 4), else None.
    shares_kv_with: int | None = None
    # The live module that rotates this layer's queries as `rope_module(x, offset=...)`.
    # For M-RoPE it is a TextPositionRoPE around the model's `rotary_emb`.
    rope_module: nn.Module | None = None
    # Attribute of `attention` that RopeTaps replaces: "rope", or "rotary_emb" for M-RoPE.
    rope_attr: str = "rope"
    keys_rotated_first: bool = False
    mrope: dict | None = None

    def to_json(self) -> dict:
        record = {
            "index": self.index,
            "type": self.layer_type,
            "window": self.window,
            "n_q_heads": self.n_q_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "q_norm": self.has_q_norm,
            "shares_kv_with": self.shares_kv_with,
            "rope": self.rope.to_json(),
        }
        if self.mrope is not None:
            record["mrope"] = self.mrope
        return record


@dataclass
class ModelLayers:
    """The RoPE attention layers of a model, and the layers skipped with the reason."""

    layers: list[AttentionLayer]
    skipped: list[dict] = field(default_factory=list)
    n_layers: int = 0
    # The allow-list record from architectures.check_supported.
    architecture: dict | None = None


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
    """Return the config of the decoder: the language model's for VLMs and wrapped text models."""
    language_model = getattr(model, "language_model", None)
    for owner in (language_model, model):
        for name in ("args", "config"):
            args = getattr(owner, name, None) if owner is not None else None
            if args is not None and hasattr(args, "num_hidden_layers"):
                return args
    for owner in (model, language_model):
        args = getattr(owner, "args", None) if owner is not None else None
        if args is not None:
            return args
    return None


def _decoder_owners(model) -> list:
    """Return the modules that may own the decoder's per-layer lists (layer_types, previous_kvs)."""
    owners = []
    for owner in (model, getattr(model, "language_model", None)):
        if owner is None:
            continue
        owners.append(owner)
        inner = getattr(owner, "model", None)
        if isinstance(inner, nn.Module):
            owners.append(inner)
    return owners


def _declared_layer_types(model, args) -> list | None:
    for owner in [args] + _decoder_owners(model):
        layer_types = getattr(owner, "layer_types", None) if owner is not None else None
        if isinstance(layer_types, (list, tuple)) and layer_types:
            return list(layer_types)
    return None


def _kv_sources(model, n_blocks: int) -> list[int]:
    """Return, per layer, the index of the layer whose keys it uses (its own unless shared)."""
    for owner in _decoder_owners(model):
        previous = getattr(owner, "previous_kvs", None)
        if isinstance(previous, (list, tuple)) and len(previous) == n_blocks:
            return [int(i) for i in previous]
    return list(range(n_blocks))


def _layer_type(attention, index: int, args, layer_types=None) -> tuple[str, int | None]:
    window = getattr(args, "sliding_window", None) if args is not None else None
    if layer_types is None:
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

    First checks the model against the allow-list (architectures.check_supported), so an
    unsupported architecture is rejected before any work. Layers whose block has no attention
    module, or an attention module without a `rope` (linear attention, state-space layers), or
    whose RoPE rotates nothing (NoPE layers), are listed in `skipped` with the reason. Raises
    UnsupportedModelError when no layer uses RoPE or a layer's head counts cannot be read.
    """
    architecture = check_supported(model)
    blocks = decoder_layers(model)
    args = _model_args(model)
    layer_types = _declared_layer_types(model, args)
    kv_sources = _kv_sources(model, len(blocks))
    found: list[AttentionLayer] = []
    skipped: list[dict] = []
    # Keyed by (id of the live RoPE or M-RoPE module, head_dim): layers may share one module.
    geometry_cache: dict[tuple[int, int], RopeGeometry] = {}
    for index, block in enumerate(blocks):
        attention = _find_attention(block)
        if attention is None:
            reason = f"{type(block).__name__} has no attention module"
            linear_attention = getattr(block, "linear_attn", None)
            if isinstance(linear_attention, nn.Module):
                reason = (
                    f"{type(block).__name__} uses linear attention "
                    f"({type(linear_attention).__name__}), which has no RoPE"
                )
            skipped.append({"index": index, "reason": reason})
            continue
        rope_attr = "rope"
        rope = getattr(attention, "rope", None)
        rotary_emb = getattr(attention, "rotary_emb", None)
        if rope is None and is_mrope_module(rotary_emb):
            rope_attr = "rotary_emb"
            rope = TextPositionRoPE(rotary_emb)
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
        key = (id(rotary_emb) if rope_attr == "rotary_emb" else id(rope), head_dim)
        if key not in geometry_cache:
            geometry_cache[key] = read_rope(rope, head_dim)
        geometry = geometry_cache[key]
        if not np.any(geometry.omega):
            skipped.append({
                "index": index,
                "reason": f"{type(rope).__name__} rotates no band (a NoPE layer), so position does not "
                "change its attention scores",
            })
            continue
        layer_type, window = _layer_type(attention, index, args, layer_types)
        source = kv_sources[index]
        found.append(
            AttentionLayer(
                index=index,
                attention=attention,
                n_q_heads=n_q,
                n_kv_heads=n_kv,
                head_dim=head_dim,
                rope=geometry,
                layer_type=layer_type,
                window=window,
                has_q_norm=getattr(attention, "q_norm", None) is not None,
                shares_kv_with=source if source != index else None,
                rope_module=rope,
                rope_attr=rope_attr,
                keys_rotated_first=architecture["keys_rotated_first"],
                mrope=mrope_record(rope, head_dim) if rope_attr == "rotary_emb" else None,
            )
        )
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__module__}: none of its {len(blocks)} layers applies RoPE attention, "
            "so there is nothing for TriAttention to calibrate"
        )
    return ModelLayers(layers=found, skipped=skipped, n_layers=len(blocks), architecture=architecture)


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
            original = getattr(layer.attention, layer.rope_attr)
            if layer.rope_attr == "rotary_emb":
                tap = MRopeTap(original, partial(self._record_call, layer.index))
            else:
                tap = _RopeTap(original, layer.index, self._recording)
            setattr(layer.attention, layer.rope_attr, tap)
            self._originals.append((layer, original))
        return self

    def _record_call(self, index: int, x, offset) -> None:
        # pop() replaces the calls dict, so look it up on every call.
        self._recording.calls.setdefault(index, []).append((x, offset))

    def __exit__(self, *exc) -> None:
        for layer, original in self._originals:
            setattr(layer.attention, layer.rope_attr, original)
        self._originals.clear()
        self._recording.calls.clear()

    def pop(self) -> dict[int, Captured]:
        """Return this forward pass's captures by layer index and clear them.

        The query is the first call whose head axis has the query head count. The key is the
        next call with the KV head count; layers that reuse another layer's keys have none.
        In layers with `keys_rotated_first` that compute their own keys, the first call is
        the key and the query comes after it.
        """
        calls = self._recording.calls
        self._recording.calls = {}
        result: dict[int, Captured] = {}
        for layer in self.layers:
            seen = calls.get(layer.index, [])
            start = 0
            if layer.keys_rotated_first and layer.shares_kv_with is None and len(seen) >= 2:
                start = 1
            query_at = next(
                (i for i, (x, _) in enumerate(seen) if i >= start and x.shape[1] == layer.n_q_heads), None
            )
            if query_at is None:
                raise UnsupportedModelError(
                    f"layer {layer.index}: its RoPE was never called on a tensor with "
                    f"{layer.n_q_heads} query heads (shapes seen: {[tuple(x.shape) for x, _ in seen]})"
                )
            queries, offset = seen[query_at]
            if start == 1:
                keys = seen[0][0] if seen[0][0].shape[1] == layer.n_kv_heads else None
            else:
                keys = next(
                    (x for x, _ in seen[query_at + 1 :] if x.shape[1] == layer.n_kv_heads), None
                )
            result[layer.index] = Captured(queries=queries, offset=offset, keys=keys)
        return result
