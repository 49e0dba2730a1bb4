"""Publishing to and fetching from a Hugging Face dataset repo, against the loopback test Hub.

Every test talks real HTTP on 127.0.0.1 to tests/hub_server.py through huggingface_hub. Xet
uploads are switched off (the test Hub speaks the LFS batch protocol, not Xet).
"""

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi

from calibration_fixtures import make_calibration
from hub_server import HubServer
from triattn_hub.artifact import ARTIFACT_NAME, MANIFEST_NAME, load_tensors, sha256_file
from triattn_hub.client import fetch
from triattn_hub.errors import (
    AccessDeniedError,
    CalibrationNotFoundError,
    GeometryMismatchError,
    IntegrityError,
    OfflineError,
    PrivateModelError,
)
from triattn_hub.hub_hf import HfHub, exchange_github_oidc_token, version_tag

ALICE = "hf_alice_token_0123456789"
BOB = "hf_bob_token_0123456789"
HUB = "hf://datasets/org/cal"
CLEAN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "HF_OIDC_RESOURCE", "TRIATTN_HUB")


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    """Keep huggingface_hub away from any stored login, env token and Xet."""
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


@pytest.fixture
def server():
    with HubServer() as hub_server:
        hub_server.state.add_user("alice", ALICE, orgs=["org"])
        hub_server.state.add_user("bob", BOB)
        yield hub_server


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def _hub(server, cache, token=ALICE, repo="org/cal"):
    return HfHub(repo, token=token, endpoint=server.url, cache_dir=cache)


def _publish(server, cache, model_id, seed=0, token=ALICE, repo="org/cal", **kwargs):
    tensors, manifest = make_calibration(model_id, seed=seed, **kwargs)
    return _hub(server, cache, token, repo).publish(tensors, manifest)


def _fetch(server, cache, model_id, **kwargs):
    kwargs.setdefault("hubs", [HUB])
    return fetch(model_id, endpoint=server.url, cache_dir=cache, **kwargs)


def _head_index(server, repo="org/cal"):
    return json.loads(server.state.read_file("dataset", repo, "index.json"))


def _subprocess_env(server_url, cache, **extra):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env.update(HF_ENDPOINT=server_url, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1", HF_TOKEN_PATH=str(Path(cache) / "no-token"))
    env.update(extra)
    return env


def _run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "triattn_hub.cli", *args], env=env, capture_output=True, text=True, timeout=300)


# Publishing


def test_publish_then_fetch_round_trip(server, cache):
    published = _publish(server, cache, "acme/tiny")
    assert published.created
    assert published.version == "v1"

    history = server.state.history("dataset", "org/cal")
    assert len(history) == 2, "creating the repo and publishing should make exactly two commits"
    publish_commit, initial = history
    changed = {p for p, blob in publish_commit.tree.items() if initial.tree.get(p) != blob}
    assert changed == {
        "index.json",
        "README.md",
        "models/acme/tiny/v1/calibration.safetensors",
        "models/acme/tiny/v1/manifest.json",
    }
    assert publish_commit.tree["models/acme/tiny/v1/calibration.safetensors"].lfs_sha256 is not None

    resolved = _fetch(server, cache, "acme/tiny")
    assert resolved.version == "v1"
    assert resolved.commit == publish_commit.sha
    stored = server.state.read_file("dataset", "org/cal", "models/acme/tiny/v1/calibration.safetensors")
    assert resolved.path.read_bytes() == stored
    assert resolved.manifest["files"][ARTIFACT_NAME]["sha256"] == sha256_file(resolved.path)
    tensors, embedded = load_tensors(resolved.path)
    assert embedded["model"]["id"] == "acme/tiny"
    assert tensors["layers.0.q_mean_real"].shape == (4, 8)
    assert server.state.unknown_routes == []


def test_dataset_card_lists_models(server, cache):
    _publish(server, cache, "acme/tiny")
    _publish(server, cache, "acme/tiny", seed=1)
    _publish(server, cache, "other/model")
    card = server.state.read_file("dataset", "org/cal", "README.md").decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["viewer"] is False
    assert "| `acme/tiny` | v2 (latest) |" in card
    assert "| `acme/tiny` | v1 |" in card
    assert "| `other/model` | v1 (latest) |" in card
    assert "4,096" in card
    assert "passed" in card


def test_identical_inputs_publish_nothing(server, cache):
    _publish(server, cache, "acme/tiny")
    commits = len(server.state.history("dataset", "org/cal"))
    again = _publish(server, cache, "acme/tiny")
    assert not again.created
    assert again.version == "v1"
    assert len(server.state.history("dataset", "org/cal")) == commits


def test_each_version_gets_immutable_tag(server, cache):
    first = _publish(server, cache, "acme/tiny")
    second = _publish(server, cache, "acme/tiny", seed=1)
    refs = HfApi(endpoint=server.url).list_repo_refs("org/cal", repo_type="dataset", token=ALICE)
    tags = {ref.name: ref.target_commit for ref in refs.tags}
    assert version_tag("acme/tiny", "v1") == "acme--tiny--v1"
    assert set(tags) == {"acme--tiny--v1", "acme--tiny--v2"}
    assert first.location.split("@")[1].startswith(tags["acme--tiny--v1"])
    assert second.location.split("@")[1].startswith(tags["acme--tiny--v2"])
    at_v1 = set(HfApi(endpoint=server.url).list_repo_files("org/cal", repo_type="dataset", revision="acme--tiny--v1", token=ALICE))
    assert "models/acme/tiny/v1/calibration.safetensors" in at_v1
    assert "models/acme/tiny/v2/calibration.safetensors" not in at_v1


def test_concurrent_publishes_both_land(server, cache, tmp_path):
    _publish(server, cache, "acme/seed-model")
    server.state.hold_commits(2)
    results, errors = {}, []

    def worker(model_id, seed):
        try:
            results[model_id] = _publish(server, tmp_path / f"cache-{seed}", model_id, seed=seed)
        except Exception as exc:  # collected so the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(m, s)) for m, s in (("acme/model-a", 1), ("acme/model-b", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert results["acme/model-a"].version == "v1"
    assert results["acme/model-b"].version == "v1"
    statuses = [status for method, path, status in server.state.requests if "/commit/" in path]
    assert 412 in statuses, "the two commits were held on one parent, so one must have been rejected"
    index = _head_index(server)
    assert set(index["models"]) == {"acme/seed-model", "acme/model-a", "acme/model-b"}
    assert len(server.state.history("dataset", "org/cal")) == 4


def test_stale_parent_is_retried_not_lost(server, cache, tmp_path):
    _publish(server, cache, "acme/tiny")

    def concurrent_publish():
        # Another client publishes a calibration of the same model while ours is in flight.
        concurrent = _publish(server, tmp_path / "other-cache", "acme/tiny", seed=7)
        assert concurrent.version == "v2"

    server.state.before_commit = concurrent_publish
    ours = _publish(server, cache, "acme/tiny", seed=8)
    assert ours.created
    assert ours.version == "v3", "the retried publish must take the next free version"
    versions = _head_index(server)["models"]["acme/tiny"]["versions"]
    assert set(versions) == {"v1", "v2", "v3"}
    assert versions["v2"]["inputs_sha256"] != versions["v3"]["inputs_sha256"]
    head_tree = server.state.history("dataset", "org/cal")[0].tree
    for version in ("v1", "v2", "v3"):
        assert f"models/acme/tiny/{version}/calibration.safetensors" in head_tree
    embedded = json.loads(server.state.read_file("dataset", "org/cal", "models/acme/tiny/v3/manifest.json"))
    assert embedded["artifact_version"] == "v3"
    assert [s for _, p, s in server.state.requests if "/commit/" in p].count(412) == 1


# Private models


def test_private_model_refused_on_public_repo(server, cache):
    _publish(server, cache, "acme/public-model")
    commits = len(server.state.history("dataset", "org/cal"))
    with pytest.raises(PrivateModelError, match="private or gated"):
        _publish(server, cache, "acme/secret", private=True)
    assert len(server.state.history("dataset", "org/cal")) == commits
    overridden = _hub(server, cache).publish(*make_calibration("acme/secret", private=True), allow_public=True)
    assert overridden.created


def test_private_model_creates_private_repo(server, cache):
    result = _publish(server, cache, "acme/secret", private=True, repo="org/private-cal")
    assert result.created
    assert server.state.repos[("dataset", "org/private-cal")].private


def test_wrong_token_is_access_denied(server, cache):
    _publish(server, cache, "acme/secret", private=True, repo="org/private-cal")
    hubs = ["hf://datasets/org/private-cal"]
    with pytest.raises(AccessDeniedError, match="rejected the credentials"):
        _fetch(server, cache, "acme/secret", hubs=hubs, token="hf_wrong_token")
    with pytest.raises(AccessDeniedError, match="no token was sent"):
        _fetch(server, cache, "acme/secret", hubs=hubs)
    with pytest.raises(AccessDeniedError, match="cannot read it"):
        _fetch(server, cache, "acme/secret", hubs=hubs, token=BOB)
    with pytest.raises(AccessDeniedError):
        _publish(server, cache, "acme/other", token="hf_wrong_token", repo="org/private-cal")
    assert _fetch(server, cache, "acme/secret", hubs=hubs, token=ALICE).version == "v1"


def test_private_hub_searched_first(server, cache):
    _publish(server, cache, "acme/tiny", seed=1, repo="org/private-cal", private=True)
    _publish(server, cache, "acme/tiny", seed=2)
    resolved = _fetch(server, cache, "acme/tiny", hubs=["hf://datasets/org/private-cal", HUB], token=ALICE)
    assert resolved.hub == "hf://datasets/org/private-cal"
    assert resolved.manifest["model"]["private"] is True
    with pytest.raises(AccessDeniedError):
        # A private hub that cannot be read stops the search instead of being skipped. A fresh
        # cache, because huggingface_hub serves a denied request from a cached copy.
        _fetch(server, cache.parent / "bob-cache", "acme/tiny", hubs=["hf://datasets/org/private-cal", HUB], token=BOB)


# Fetching


def test_model_ids_match_in_full(server, cache):
    _publish(server, cache, "acme/tiny")
    with pytest.raises(CalibrationNotFoundError, match="acme/tiny"):
        _fetch(server, cache, "other/tiny", model_path=_model_dir(cache.parent / "m", base_model=None))
    with pytest.raises(CalibrationNotFoundError):
        _fetch(server, cache, "tiny", model_path=_model_dir(cache.parent / "m2", base_model=None))


def test_integrity_failure_detected(server, cache):
    _publish(server, cache, "acme/tiny")
    blob = server.state.history("dataset", "org/cal")[0].tree["models/acme/tiny/v1/calibration.safetensors"]
    original = server.state.lfs_objects[blob.lfs_sha256]
    server.state.lfs_objects[blob.lfs_sha256] = original[:-4] + b"\x00\x00\x00\x00"
    with pytest.raises(IntegrityError, match="sha256"):
        _fetch(server, cache, "acme/tiny")


def test_endpoint_read_from_environment(server, cache, monkeypatch):
    _publish(server, cache, "acme/tiny")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    resolved = fetch("acme/tiny", hubs=[HUB], cache_dir=cache)
    assert resolved.version == "v1"


def test_offline_fetch_from_cache(server, cache):
    _publish(server, cache, "acme/tiny")
    online = _run_cli(["fetch", "acme/tiny", "--hub", HUB], _subprocess_env(server.url, cache))
    assert online.returncode == 0, online.stderr
    server.stop()

    offline = _run_cli(["fetch", "acme/tiny", "--hub", HUB], _subprocess_env(server.url, cache, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout
    assert Path(offline.stdout.strip()).is_file()

    unreachable = _run_cli(["fetch", "acme/tiny", "--hub", HUB], _subprocess_env(server.url, cache))
    assert unreachable.returncode == 0, unreachable.stderr
    assert unreachable.stdout == online.stdout

    empty = _run_cli(["fetch", "acme/tiny", "--hub", HUB], _subprocess_env(server.url, cache.parent / "empty-cache", HF_HUB_OFFLINE="1"))
    assert empty.returncode == 1
    assert "cannot be reached" in empty.stderr


def test_offline_error_without_cache(server, cache):
    server.stop()
    with pytest.raises(OfflineError, match="nothing usable is cached"):
        _fetch(server, cache, "acme/tiny")


def test_lockfile_reproducible(server, cache, tmp_path):
    lock = tmp_path / "triattn.lock"
    _publish(server, cache, "acme/tiny")
    first = _fetch(server, cache, "acme/tiny", lock=lock)
    recorded = json.loads(lock.read_text())["calibrations"]["acme/tiny"]
    assert recorded["hub"] == HUB
    assert recorded["commit"] == first.commit
    assert recorded["version"] == "v1"
    assert recorded["sha256"] == first.manifest["files"][ARTIFACT_NAME]["sha256"]

    _publish(server, cache, "acme/tiny", seed=1)
    assert _fetch(server, cache, "acme/tiny").version == "v2"
    again = _fetch(server, cache, "acme/tiny", lock=lock)
    assert again.version == "v1"
    assert again.commit == first.commit
    assert again.path.read_bytes() == first.path.read_bytes()

    recorded["sha256"] = "0" * 64
    lock.write_text(json.dumps({"format": "triattn-hub-lock", "format_version": 1, "calibrations": {"acme/tiny": recorded}}))
    with pytest.raises(IntegrityError, match="lockfile"):
        _fetch(server, cache, "acme/tiny", lock=lock)


# Base-model fallback


def _config(n_layers=2, heads=4, kv_heads=2, head_dim=16, rope_theta=10000.0, base_model=None):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": heads * head_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rope_theta": rope_theta,
        "quantization": {"group_size": 64, "bits": 4},
    }
    if base_model:
        config["base_model"] = base_model
    return config


def _card(base_model):
    return f"---\nlibrary_name: mlx\nbase_model: {base_model}\ntags:\n- mlx\n---\n\n# converted\n"


def _model_dir(path, base_model="acme/tiny", **config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_config(**config)))
    if base_model:
        (path / "README.md").write_text(_card(base_model))
    return path


def _model_repo(server, repo_id, *, readme=True, gated=False, **config):
    state = server.state
    state.create_repo("model", repo_id)
    state.repos[("model", repo_id)].gated = gated
    files = {"config.json": json.dumps(_config(**config)).encode()}
    if readme:
        files["README.md"] = _card("acme/tiny").encode()
    state.add_files("model", repo_id, files)


def test_base_model_fallback_with_matching_geometry(server, cache, caplog):
    _publish(server, cache, "acme/tiny")
    _model_repo(server, "mlx-community/tiny-4bit")
    with caplog.at_level(logging.WARNING, logger="triattn_hub.client"):
        resolved = _fetch(server, cache, "mlx-community/tiny-4bit")
    assert resolved.via_base_model
    assert resolved.model_id == "acme/tiny"
    assert resolved.requested_id == "mlx-community/tiny-4bit"
    assert "base model" in resolved.warnings[0]
    assert "no calibration for mlx-community/tiny-4bit" in caplog.text


def test_base_model_from_config_json(server, cache):
    _publish(server, cache, "acme/tiny")
    _model_repo(server, "mlx-community/tiny-8bit", readme=False, base_model="acme/tiny")
    assert _fetch(server, cache, "mlx-community/tiny-8bit").model_id == "acme/tiny"


def test_base_model_fallback_from_model_path(server, cache, tmp_path):
    _publish(server, cache, "acme/tiny")
    resolved = _fetch(server, cache, "local/tiny-q4", model_path=_model_dir(tmp_path / "model"))
    assert resolved.model_id == "acme/tiny"


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rope_theta": 500000.0}, "omega"),
        ({"n_layers": 3}, "3 layers"),
        ({"kv_heads": 4}, "n_kv_heads"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_base_model_fallback_geometry_mismatch(server, cache, tmp_path, config, message):
    _publish(server, cache, "acme/tiny")
    with pytest.raises(GeometryMismatchError, match=message):
        _fetch(server, cache, "local/tiny-q4", model_path=_model_dir(tmp_path / "model", **config))


def test_base_model_unverifiable_rope_refused(server, cache, tmp_path):
    _publish(server, cache, "acme/tiny")
    path = _model_dir(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GeometryMismatchError, match="dynamic"):
        _fetch(server, cache, "local/tiny-q4", model_path=path)


def test_gated_model_config_is_access_denied(server, cache):
    _publish(server, cache, "acme/tiny")
    _model_repo(server, "gated-org/tiny-4bit", gated=True)
    with pytest.raises(AccessDeniedError, match="gated"):
        _fetch(server, cache, "gated-org/tiny-4bit")


# Tokens


def test_github_oidc_exchange(server, cache, monkeypatch, caplog):
    state = server.state
    state.github_request_token = "gh-request-token-42"
    state.trusted_publishers["gh-id-token-for-org-cal"] = "datasets/org/cal"
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", f"{server.url}/github/id-token?api-version=2.0")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", "gh-request-token-42")

    token = exchange_github_oidc_token(server.url, "datasets/org/cal")
    assert token in state.exchanged_tokens
    assert state.id_token_audiences == [server.url]

    with caplog.at_level(logging.DEBUG):
        result = _publish(server, cache, "acme/tiny", token=None)
    assert result.created
    for secret in [*state.exchanged_tokens, "gh-request-token-42", "gh-id-token-for-org-cal"]:
        assert secret not in caplog.text

    with pytest.raises(AccessDeniedError, match="trusted publisher"):
        exchange_github_oidc_token(server.url, "datasets/org/other")


def test_token_sources(server, cache, monkeypatch, tmp_path):
    _publish(server, cache, "acme/secret", private=True, repo="org/private-cal")
    hubs = ["hf://datasets/org/private-cal"]
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert _fetch(server, tmp_path / "env-cache", "acme/secret", hubs=hubs).version == "v1"
    monkeypatch.delenv("HF_TOKEN")
    stored = tmp_path / "stored-token"
    stored.write_text(ALICE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(stored))
    assert _fetch(server, tmp_path / "login-cache", "acme/secret", hubs=hubs).version == "v1"
    monkeypatch.setenv("HF_TOKEN", BOB)
    with pytest.raises(AccessDeniedError, match="cannot read it"):
        # $HF_TOKEN comes before the stored login.
        _fetch(server, tmp_path / "bob-cache", "acme/secret", hubs=hubs)


def test_publish_without_token_is_access_denied(server, cache):
    with pytest.raises(AccessDeniedError, match="write token"):
        _publish(server, cache, "acme/tiny", token=None)


def test_fetch_path_imports_no_heavy_modules(server, cache):
    _publish(server, cache, "acme/tiny")
    code = (
        "import sys\n"
        "from triattn_hub.cli import main\n"
        f"code = main(['fetch', 'acme/tiny', '--hub', '{HUB}'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'prefect', 'datasets', 'mlx_lm', 'mlx_vlm'))\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(server.url, cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert np.isfinite(load_tensors(done.stdout.strip().splitlines()[0])[0]["layers.0.omega"]).all()
