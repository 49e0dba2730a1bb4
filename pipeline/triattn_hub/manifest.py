"""The manifest: a JSON record of one calibration, validated against schema/manifest.schema.json.

The schema has one source of truth, the repository's schema/ directory. Wheels carry a copy
inside the package (see pyproject.toml), and a source checkout reads the directory itself.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path

from . import __version__
from .errors import ManifestError

SCHEMA_VERSION = 1
# Bump when a change to capture, band layout or statistics changes the numbers produced, so
# hubs can tell that an existing calibration is stale.
CALIBRATOR_VERSION = 1
BAND_CONVENTION = (
    "band f is the pair of components RoPE rotates at omega_f, as z_f = a + i b with "
    "z_f -> z_f * exp(i * omega_f * position); half layout pairs (f, f + rotary_dims/2), "
    "traditional layout pairs (2f, 2f + 1)"
)
LIBRARIES = ("mlx", "mlx-lm", "mlx-vlm", "numpy", "safetensors", "huggingface-hub", "transformers", "datasets", "prefect", "gguf")


def schema_path(name: str = "manifest.schema.json") -> Path:
    """Return the path of a JSON schema, from the installed package or the source checkout."""
    packaged = resources.files("triattn_hub").joinpath("schema", name)
    if packaged.is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "schema" / name
    if checkout.is_file():
        return checkout
    raise ManifestError(f"schema {name} is missing from the installation; reinstall triattn-hub")


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema

    schema = json.loads(schema_path(name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def validate(document: dict, name: str = "manifest.schema.json") -> dict:
    """Return `document` unchanged if it validates against the named schema.

    Raises ManifestError listing every violation with its JSON path.
    """
    errors = sorted(_validator(name).iter_errors(document), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors[:10]]
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        raise ManifestError(f"{name} validation failed{more}:\n  " + "\n  ".join(lines))
    return document


def library_versions() -> dict[str, str | None]:
    """Return the installed versions of the libraries that shape a calibration."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def tool_record() -> dict:
    return {
        "name": "triattn-hub",
        "version": __version__,
        "calibrator_version": CALIBRATOR_VERSION,
        "libraries": library_versions(),
    }


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def inputs_fingerprint(*, weights: str, corpus: dict, settings: dict) -> str:
    """Return the sha256 that identifies a calibration's inputs.

    Two runs with the same weights fingerprint, corpus token ids, settings and calibrator
    version produce the same numbers, so a hub stores them once.
    """
    record = {
        "weights": weights,
        "corpus_token_ids_sha256": corpus["token_ids_sha256"],
        "corpus_kind": corpus["kind"],
        "settings": settings,
        "calibrator_version": CALIBRATOR_VERSION,
        "tool_version": __version__,
    }
    return hashlib.sha256(canonical_json(record)).hexdigest()
