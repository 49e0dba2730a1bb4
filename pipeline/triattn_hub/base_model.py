"""Base-model fallback: read a model's declared base model and check it shares the calibration's geometry.

Quantized or converted repos (for example `mlx-community/...-4bit`) declare the model they were
made from as `base_model` in the YAML front matter of README.md, or in config.json. Such a repo
may use the base model's calibration only if its attention geometry is the same. That is the
number of layers, the query and KV heads, head size and rotated dims of every calibrated layer,
and omega. Omega is computed here from the config's RoPE settings with numpy (no mlx) and
compared with the omega stored in the artifact.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .errors import GeometryMismatchError, ModelSourceError

logger = logging.getLogger(__name__)

# Relative tolerance between omega from the config (float64) and the artifact's float32 omega.
OMEGA_RTOL = 1e-4


def read_model_files(
    model_id: str,
    *,
    model_path: str | os.PathLike | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[dict, str | None]:
    """Return (config.json as a dict, README.md text or None) of a model.

    From `model_path` when given, else downloaded from the model's own Hub repo. Raises
    ModelSourceError when config.json is missing, and the AccessDeniedError or OfflineError of
    hub_hf.translate_error when the repo cannot be read.
    """
    if model_path is not None:
        root = Path(model_path)
        config_path = root / "config.json"
        if not config_path.is_file():
            raise ModelSourceError(f"{config_path} is missing; pass the directory that contains the model's config.json")
        readme = root / "README.md"
        return _load_config(config_path), readme.read_text(encoding="utf-8") if readme.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    from .hub_hf import resolve_endpoint, resolve_token, translate_error

    endpoint = resolve_endpoint(endpoint)
    token = resolve_token(token, endpoint=endpoint, resource=None, write=False)

    def download(name: str) -> Path:
        return Path(hf_hub_download(model_id, name, endpoint=endpoint, token=token or False, cache_dir=cache_dir))

    try:
        config = _load_config(download("config.json"))
    except RemoteEntryNotFoundError:
        raise ModelSourceError(f"{model_id} has no config.json on {endpoint}") from None
    except Exception as exc:
        raise translate_error(exc, f"model {model_id} ({endpoint})", had_token=token is not None) from None
    try:
        readme = download("README.md").read_text(encoding="utf-8")
    except RemoteEntryNotFoundError:
        readme = None
    except Exception as exc:
        raise translate_error(exc, f"model {model_id} ({endpoint})", had_token=token is not None) from None
    return config, readme


def _load_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return config


def front_matter(readme: str | None) -> dict:
    """Return the YAML front matter of a model card as a dict (empty when there is none)."""
    import yaml

    if not readme or not readme.startswith("---"):
        return {}
    end = readme.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(readme[3:end])
    except yaml.YAMLError:
        logger.warning("the model card's YAML front matter cannot be parsed; ignoring it")
        return {}
    return data if isinstance(data, dict) else {}


def declared_base_model(config: dict, readme: str | None) -> str | None:
    """Return the single base model a model declares (card front matter first, then config.json).

    A list of several base models (a merge) declares no single base, so None is returned.
    """
    for source, value in (("README.md", front_matter(readme).get("base_model")), ("config.json", config.get("base_model"))):
        if isinstance(value, list):
            if len(value) == 1:
                value = value[0]
            else:
                logger.warning("%s lists %d base models; none is used for a fallback", source, len(value))
                return None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def text_config(config: dict) -> dict:
    """Return the language-model part of a config (VLM configs nest it under text_config)."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) and "num_hidden_layers" in nested else config


def config_geometry(config: dict) -> dict:
    """Return n_layers, n_q_heads, n_kv_heads, head_dim and rotary_dims declared by a config."""
    text = text_config(config)
    try:
        heads = int(text["num_attention_heads"])
        n_layers = int(text["num_hidden_layers"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise GeometryMismatchError(f"config.json lacks the attention geometry ({exc}); cannot check it") from None
    kv_heads = int(text.get("num_key_value_heads") or heads)
    rotary = int(head_dim * float(text.get("partial_rotary_factor", 1.0)))
    return {"n_layers": n_layers, "n_q_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim, "rotary_dims": rotary - rotary % 2}


def _rope_settings(text: dict, layer_type: str) -> tuple[float, dict]:
    """Return (base, scaling dict) of one layer type from old- or new-style config keys."""
    parameters = text.get("rope_parameters")
    if isinstance(parameters, dict):
        key = "sliding_attention" if layer_type == "sliding" else "full_attention"
        if isinstance(parameters.get(key), dict):
            parameters = parameters[key]
        return float(parameters.get("rope_theta", text.get("rope_theta", 10000.0))), parameters
    if layer_type == "sliding" and "rope_local_base_freq" in text:
        return float(text["rope_local_base_freq"]), {}
    return float(text.get("rope_theta", 10000.0)), text.get("rope_scaling") or {}


def config_omega(config: dict, rotary_dims: int, layer_type: str = "global") -> np.ndarray:
    """Return omega [rotary_dims / 2] in rad/position from a config's RoPE settings.

    Supports plain RoPE and the "default", "linear", "llama3" and "yarn" rope types as Hugging
    Face transformers defines them. Raises GeometryMismatchError for other types (dynamic NTK,
    longrope and the rest), whose omega this check cannot reproduce.
    """
    base, scaling = _rope_settings(text_config(config), layer_type)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    exponents = np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims
    omega = base ** (-exponents)
    if rope_type == "default":
        return omega
    factor = float(scaling.get("factor", 1.0))
    if rope_type == "linear":
        return omega / factor
    if rope_type == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelength = 2 * math.pi / omega
        smooth = (original / wavelength - low) / (high - low)
        scaled = np.where(wavelength > original / low, omega / factor, omega)
        middle = (wavelength <= original / low) & (wavelength >= original / high)
        return np.where(middle, (1 - smooth) * omega / factor + smooth * omega, scaled)
    if rope_type == "yarn":
        # NOTE: transformers versions differ on the fallback when original_max_position_embeddings
        # is absent; this uses max_position_embeddings, and a differing runtime fails the check.
        original = float(scaling.get("original_max_position_embeddings") or text_config(config).get("max_position_embeddings", 4096))
        beta_fast = float(scaling.get("beta_fast", 32.0))
        beta_slow = float(scaling.get("beta_slow", 1.0))

        def correction_dim(rotations: float) -> float:
            return rotary_dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rotary_dims - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rotary_dims // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        keep = 1.0 - ramp
        return omega / factor * (1.0 - keep) + omega * keep
    raise GeometryMismatchError(
        f"rope_type {rope_type!r} in config.json: its omega cannot be computed here, so the geometry "
        "cannot be checked; fetch the base model's id explicitly if you know the two models share RoPE"
    )


def check_entry_geometry(config: dict, entry: dict, *, model_id: str, base_id: str) -> None:
    """Raise GeometryMismatchError unless the config's layers and heads match an index entry."""
    declared = config_geometry(config)
    geometry = entry["geometry"]
    problems = []
    if declared["n_layers"] != geometry["n_layers"]:
        problems.append(f"{declared['n_layers']} layers, the calibration has {geometry['n_layers']}")
    for layer in geometry["layers"]:
        for key in ("n_q_heads", "n_kv_heads", "head_dim", "rotary_dims"):
            if declared[key] != layer[key]:
                problems.append(f"layer {layer['index']}: {key} {declared[key]}, the calibration has {layer[key]}")
    if problems:
        # NOTE: models whose layers differ in head size (Gemma 4) are reported here as a
        # mismatch, because config.json names one head_dim for all layers.
        raise GeometryMismatchError(
            f"{model_id} declares base model {base_id}, but its config does not match that calibration: "
            + "; ".join(problems[:5])
        )


def check_omega(config: dict, manifest: dict, tensors: dict, *, model_id: str, base_id: str) -> None:
    """Raise GeometryMismatchError unless omega from the config matches every calibrated layer's omega."""
    for layer in manifest["geometry"]["layers"]:
        stored = np.asarray(tensors[f"layers.{layer['index']}.omega"], dtype=np.float64)
        expected = config_omega(config, layer["rope"]["rotary_dims"], layer["type"])
        scale = np.maximum(np.abs(expected), 1e-12)
        relative = np.abs(stored - expected) / scale
        relative[np.abs(stored - expected) <= 1e-9] = 0.0
        if relative.size and relative.max() > OMEGA_RTOL:
            band = int(np.argmax(relative))
            raise GeometryMismatchError(
                f"{model_id} declares base model {base_id}, but its RoPE differs from that calibration: "
                f"layer {layer['index']} band {band} has omega {expected[band]:.9g} by config.json and "
                f"{stored[band]:.9g} in the calibration"
            )
