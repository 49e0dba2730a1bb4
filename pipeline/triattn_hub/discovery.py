"""Nightly planning: which models the catalog and its discovery rules name, and which need calibrating.

A model needs calibrating when its hub has no version made by the current calibrator version
from the model's current weights (for a Hub model, its current commit) and the catalog's
corpus. Settings that the catalog sets explicitly (sequence_length, chunk_size) must match too.
Every model gets a `Decision`: calibrate, skip (with the reason), unsupported (recorded once
in the state store and skipped afterwards) or failed (retried next night).

Network calls go to the endpoint and token passed in: the token comes from tokens.hf_token(),
never from a flow parameter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .catalog import Catalog, DiscoveryRule, ModelSpec, source_path
from .errors import HubError, ModelSourceError, TriattnHubError
from .manifest import CALIBRATOR_VERSION, canonical_json
from .nightly_state import new_record, state_key

logger = logging.getLogger(__name__)

CALIBRATE = "calibrate"
SKIP = "skipped"
UNSUPPORTED = "unsupported"
FAILED = "failed"
# Settings that change the numbers, so an explicit catalog value must match the published one.
COMPARED_SETTINGS = ("sequence_length", "chunk_size")
# ModelInfo fields that discovery reads, requested from the Hub with `expand`.
MODEL_INFO_FIELDS = ["sha", "private", "gated", "config", "safetensors", "tags"]


@dataclass
class Candidate:
    """A model the nightly run may calibrate, with its current weights and corpus identity.

    `weights` has the form of LoadedModel.weights_fingerprint: "hf:{id}@{commit}" for a Hub
    download, "gguf:{sha256}" for a GGUF file, "local:{sha256}" for a model directory.
    """

    model_id: str
    source: dict
    revision: str | None
    weights: str
    corpus: str
    corpus_record: dict
    settings: dict
    hub: str
    private: bool | None
    origin: str

    def key(self) -> str:
        """Return the sha256 of everything that determines this calibration's numbers."""
        from . import __version__

        record = {
            "model_id": self.model_id,
            "weights": self.weights,
            "corpus_text_sha256": self.corpus_record.get("text_sha256"),
            "settings": self.settings,
            "private": self.private,
            "calibrator_version": CALIBRATOR_VERSION,
            "tool_version": __version__,
        }
        return hashlib.sha256(canonical_json(record)).hexdigest()

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict) -> "Candidate":
        return cls(**document)


@dataclass
class Decision:
    """The nightly action for one model (calibrate, skipped, unsupported or failed) and its reason."""

    model_id: str
    action: str
    reason: str
    origin: str
    candidate: Candidate | None = None
    version: str | None = None
    extra: dict = field(default_factory=dict)


# --- identities of weights and corpus ----------------------------------------------------------


def local_weights(source: dict, path: str) -> str:
    """Return the weights fingerprint of a local source, as load_model computes it."""
    from .artifact import sha256_file

    if Path(path).is_file():
        return f"gguf:{sha256_file(path)}"
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".safetensors")
    if not files:
        raise ModelSourceError(f"{path} has no *.safetensors weight files; is it a model directory?")
    for file in files:
        digest.update(f"{file.name}:{sha256_file(file)}\n".encode())
    return f"local:{digest.hexdigest()}"


def corpus_identity(spec: str, cache: dict | None = None) -> dict:
    """Return kind, version and text_sha256 of a corpus spec (loads the text once per spec)."""
    from .corpus import parse_corpus_spec

    if cache is not None and spec in cache:
        return cache[spec]
    loaded = parse_corpus_spec(spec).spec
    identity = {"kind": loaded["kind"], "version": loaded.get("version"), "text_sha256": loaded["text_sha256"]}
    if cache is not None:
        cache[spec] = identity
    return identity


# --- comparing with the hub ------------------------------------------------------------------


def read_version_manifest(hub, entry: dict) -> dict:
    """Return the manifest.json of one published version, from a local or a Hugging Face hub."""
    from .artifact import MANIFEST_NAME

    name = f"{entry['path']}/{MANIFEST_NAME}"
    if hasattr(hub, "download_file"):
        path = hub.download_file(name)
    else:
        path = Path(hub.root) / name
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HubError(f"{hub.address}: cannot read {name}: {exc}") from None


def manifest_weights(manifest: dict) -> str | None:
    source = manifest["model"].get("source", {})
    if source.get("kind") == "gguf":
        return f"gguf:{source.get('sha256')}"
    if source.get("kind") == "local":
        return f"local:{source.get('weights_sha256')}"
    if source.get("kind") == "hf":
        return f"hf:{source.get('repo_id', manifest['model']['id'])}@{source.get('revision')}"
    return None


def _manifest_matches(manifest: dict, candidate: Candidate) -> bool:
    if manifest_weights(manifest) != candidate.weights:
        return False
    if manifest.get("corpus", {}).get("text_sha256") != candidate.corpus_record.get("text_sha256"):
        return False
    calibration = manifest.get("calibration", {})
    return all(calibration.get(name) == candidate.settings[name] for name in COMPARED_SETTINGS if name in candidate.settings)


def find_current(candidate: Candidate, hub, index: dict) -> str | None:
    """Return the newest version in `index` that is current for `candidate`, or None.

    For a Hub model on a built-in corpus the index entry is enough. In every other case the
    version's manifest is read, to compare the weights sha256, corpus text sha256 and settings.
    """
    versions = index["models"].get(candidate.model_id, {}).get("versions", {})
    for version in sorted(versions, key=lambda v: int(v[1:]), reverse=True):
        entry = versions[version]
        if entry.get("calibrator_version") != CALIBRATOR_VERSION:
            continue
        corpus = entry.get("corpus") or {}
        if corpus.get("kind") != candidate.corpus_record["kind"] or corpus.get("version") != candidate.corpus_record.get("version"):
            continue
        if candidate.source["kind"] == "hf" and entry.get("revision") != candidate.revision:
            continue
        needs_manifest = (
            candidate.source["kind"] != "hf"
            or candidate.corpus_record["kind"] != "builtin"
            or any(name in candidate.settings for name in COMPARED_SETTINGS)
        )
        if needs_manifest and not _manifest_matches(read_version_manifest(hub, entry), candidate):
            continue
        return version
    return None


# --- building candidates -----------------------------------------------------------------------


def _parameter_count(info) -> int | None:
    safetensors = getattr(info, "safetensors", None)
    return getattr(safetensors, "total", None) if safetensors is not None else None


def _model_type(info) -> str | None:
    config = getattr(info, "config", None) or {}
    return config.get("model_type") if isinstance(config, dict) else None


def hub_limits(model_id: str, info, *, architectures, max_parameters: int | None) -> str | None:
    """Return why a Hub model cannot be calibrated (architecture or size), or None if it may be."""
    from .architectures import KNOWN_UNSUPPORTED, SUPPORTED

    model_type = _model_type(info)
    if model_type is not None:
        allowed = set(architectures) if architectures else set(SUPPORTED)
        if model_type not in allowed:
            why = KNOWN_UNSUPPORTED.get(model_type, "its attention layout is not on the calibrator's allow-list")
            if architectures and model_type in SUPPORTED:
                why = f"the discovery rule accepts only {', '.join(sorted(allowed))}"
            return f"model_type {model_type!r} is not supported: {why}"
    count = _parameter_count(info)
    if max_parameters is not None and count is not None and count > max_parameters:
        return f"{count:,} parameters exceed the worker limit of {max_parameters:,} (max_parameters)"
    return None


def _known_unsupported(state, model_id: str, weights: str, origin: str) -> Decision | None:
    record = state.get(state_key(model_id, weights)) if state is not None else None
    if record is None:
        return None
    return Decision(model_id, SKIP, f"cannot be calibrated (recorded {record['recorded']}): {record['reason']}", origin)


def _unsupported(state, model_id: str, weights: str, reason: str, origin: str) -> Decision:
    """Record a model that cannot be calibrated and return its decision, reported this once."""
    if state is not None:
        state.put(state_key(model_id, weights), new_record(model_id, weights, reason))
    return Decision(model_id, UNSUPPORTED, reason, origin)


def candidate_from_spec(spec: ModelSpec, *, api, state, corpus_cache: dict) -> Decision:
    """Resolve a catalog model into a calibrate decision, or a skip, unsupported or failed one."""
    origin = "catalog"
    try:
        corpus_record = corpus_identity(spec.corpus, corpus_cache)
        if spec.source["kind"] == "hf":
            info = api.model_info(spec.model_id, revision=spec.revision, expand=MODEL_INFO_FIELDS)
            revision = info.sha
            weights = f"hf:{spec.model_id}@{revision}"
            private = spec.private if spec.private is not None else bool(info.private or info.gated)
            known = _known_unsupported(state, spec.model_id, weights, origin)
            if known is not None:
                return known
            reason = hub_limits(spec.model_id, info, architectures=None, max_parameters=spec.max_parameters)
            if reason is not None:
                return _unsupported(state, spec.model_id, weights, reason, origin)
        else:
            path = source_path(spec.source)
            revision = spec.revision
            weights = local_weights(spec.source, path)
            private = bool(spec.private)
            known = _known_unsupported(state, spec.model_id, weights, origin)
            if known is not None:
                return known
    except TriattnHubError as exc:
        return Decision(spec.model_id, FAILED, f"{type(exc).__name__}: {exc}", origin)
    candidate = Candidate(
        spec.model_id, dict(spec.source), revision, weights, spec.corpus, corpus_record,
        dict(spec.settings), spec.hub, private, origin,
    )
    return Decision(spec.model_id, CALIBRATE, "", origin, candidate)


def candidates_from_rule(rule: DiscoveryRule, catalog: Catalog, *, api, state, corpus_cache: dict, exclude: set[str]) -> list[Decision]:
    """Run one discovery rule's `list_models` query and return a decision per model it finds.

    Models already in the catalog (`exclude`) are left to their catalog entry.
    """
    origin = f"discovery:{rule.name}"
    corpus_record = corpus_identity(rule.corpus, corpus_cache)
    decisions = []
    models = api.list_models(
        author=rule.author,
        filter=list(rule.filter) or None,
        search=rule.search,
        limit=rule.limit,
        expand=MODEL_INFO_FIELDS,
    )
    for info in models:
        model_id = info.id
        if model_id in exclude:
            continue
        weights = f"hf:{model_id}@{info.sha}"
        known = _known_unsupported(state, model_id, weights, origin)
        if known is not None:
            decisions.append(known)
            continue
        reason = hub_limits(model_id, info, architectures=rule.architectures, max_parameters=rule.max_parameters)
        if reason is not None:
            decisions.append(_unsupported(state, model_id, weights, reason, origin))
            continue
        private = bool(info.private or info.gated)
        hub = catalog.private_hub if private else catalog.hub
        if hub is None:
            decisions.append(Decision(model_id, SKIP, "private or gated model, and the catalog names no private_hub", origin))
            continue
        candidate = Candidate(model_id, {"kind": "hf"}, info.sha, weights, rule.corpus, corpus_record, dict(rule.settings), hub, private, origin)
        decisions.append(Decision(model_id, CALIBRATE, "", origin, candidate))
    return decisions


def route_private(decision: Decision, catalog: Catalog) -> Decision:
    """Send a private catalog model without its own hub to the catalog's private_hub, or skip it."""
    candidate = decision.candidate
    if candidate is None or not candidate.private or candidate.hub != catalog.hub:
        return decision
    if catalog.private_hub is None:
        return Decision(candidate.model_id, SKIP, "private or gated model, and the catalog names no private_hub", decision.origin)
    candidate.hub = catalog.private_hub
    return decision


def compare_with_hub(decision: Decision, *, hubs: dict, token: str | None, endpoint: str | None) -> Decision:
    """Turn a calibrate decision into a skip when its hub already has a current version.

    `hubs` caches (hub object, index) per address for this run.
    """
    from .hub import open_hub

    candidate = decision.candidate
    if decision.action != CALIBRATE or candidate is None:
        return decision
    if candidate.hub not in hubs:
        hub = open_hub(candidate.hub, token=token, endpoint=endpoint) if candidate.hub.startswith("hf://") else open_hub(candidate.hub)
        hubs[candidate.hub] = (hub, hub.read_index())
    hub, index = hubs[candidate.hub]
    version = find_current(candidate, hub, index)
    if version is not None:
        return Decision(candidate.model_id, SKIP, f"current: {version} in {candidate.hub}", decision.origin, candidate, version)
    return decision
