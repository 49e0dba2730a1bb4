"""Artifact format, manifest schema and the local hub, on a calibrated tiny model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_models import tiny_llama
from triattn_hub.artifact import ARTIFACT_NAME, MANIFEST_NAME, load_tensors, verify_artifact
from triattn_hub.calibrate import calibrate
from triattn_hub.client import fetch
from triattn_hub.errors import CalibrationNotFoundError, IntegrityError, ManifestError
from triattn_hub.hub_local import LocalHub
from triattn_hub.manifest import validate
from triattn_hub.results import build_manifest, calibration_tensors
from triattn_hub.sources import LoadedModel

CORPUS = {"kind": "file", "file_name": "tokens.txt", "token_count": 257, "token_ids_sha256": "a" * 64}


def _loaded(model, fingerprint="local:" + "1" * 64, model_id="test-org/tiny-llama", private=False):
    return LoadedModel(
        model=model, tokenizer=None, model_id=model_id, revision=None,
        source={"kind": "local", "weights_sha256": fingerprint[-64:]}, architecture="llama",
        quantization=None, private=private, weights_fingerprint=fingerprint,
    )


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama()
    tokens = np.random.default_rng(0).integers(2, 97, 256)
    return model, calibrate(model, tokens, bos_id=1, sequence_length=128, chunk_size=64, progress=False)


def _publish(hub, calibrated, **kwargs):
    model, calibration = calibrated
    manifest = build_manifest(_loaded(model, **kwargs), calibration, dict(CORPUS))
    return hub.publish(calibration_tensors(calibration), manifest)


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_publish_then_fetch(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    result = _publish(hub, calibrated)
    assert result.created and result.version == "v1"
    resolved = fetch("test-org/tiny-llama", hubs=[str(hub.root)])
    assert resolved.path.name == ARTIFACT_NAME
    tensors, embedded = load_tensors(resolved.path)
    model_layers = calibrated[1].model_layers
    assert embedded["artifact_version"] == "v1"
    assert sorted(embedded["geometry"]["calibrated_layers"]) == [l.index for l in model_layers.layers]
    assert tensors["layers.0.q_mean_real"].dtype == np.float32
    assert tensors["layers.0.q_mean_real"].shape == (4, 8)
    assert tensors["layers.0.omega"].shape == (8,)
    assert tensors["layers.0.q_abs_sq_mean"].dtype == np.float64
    card = (hub.root / "README.md").read_text()
    assert "viewer: false" in card
    assert "test-org/tiny-llama" in card


def test_identical_inputs_publish_nothing(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    before = _snapshot(hub.root)
    again = _publish(hub, calibrated)
    assert not again.created
    assert again.version == "v1"
    assert _snapshot(hub.root) == before


def test_changed_inputs_make_new_version(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    first = (hub.root / "models/test-org/tiny-llama/v1" / ARTIFACT_NAME).read_bytes()
    second = _publish(hub, calibrated, fingerprint="local:" + "2" * 64)
    assert second.created and second.version == "v2"
    assert (hub.root / "models/test-org/tiny-llama/v1" / ARTIFACT_NAME).read_bytes() == first
    assert fetch("test-org/tiny-llama", hubs=[str(hub.root)], version="v1").version == "v1"
    assert fetch("test-org/tiny-llama", hubs=[str(hub.root)]).version == "v2"


def test_tampered_artifact_is_rejected(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    result = _publish(hub, calibrated)
    path = tmp_path / "hub" / "models/test-org/tiny-llama/v1" / ARTIFACT_NAME
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    before = _snapshot(hub.root)
    with pytest.raises(IntegrityError, match="sha256"):
        fetch("test-org/tiny-llama", hubs=[str(hub.root)])
    assert _snapshot(hub.root) == before
    assert result.version == "v1"


def test_unknown_model_names_hub_and_closest(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    before = _snapshot(hub.root)
    with pytest.raises(CalibrationNotFoundError) as info:
        fetch("test-org/tiny-lama", hubs=[str(hub.root)])
    assert str(hub.root) in str(info.value)
    assert "test-org/tiny-llama" in str(info.value)
    with pytest.raises(CalibrationNotFoundError):
        fetch("tiny-llama", hubs=[str(hub.root)])  # ids match in full, never by basename
    assert _snapshot(hub.root) == before


def test_failed_publish_leaves_hub_unchanged(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    before = _snapshot(hub.root)
    model, calibration = calibrated
    manifest = build_manifest(_loaded(model, fingerprint="local:" + "3" * 64), calibration, dict(CORPUS))
    tensors = calibration_tensors(calibration)
    del tensors["layers.1.omega"]
    with pytest.raises(ManifestError, match="layers.1.omega"):
        hub.publish(tensors, manifest)
    assert _snapshot(hub.root) == before
    assert not any((hub.root / ".staging").iterdir())


def test_manifest_schema_rejects_bad_documents(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    result = _publish(hub, calibrated)
    directory = hub.root / "models/test-org/tiny-llama" / result.version
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    validate(manifest)
    for broken in (
        {**manifest, "schema_version": 99},
        {**manifest, "inputs_sha256": "not-a-sha"},
        {**manifest, "geometry": {**manifest["geometry"], "layers": []}},
        {k: v for k, v in manifest.items() if k != "corpus"},
    ):
        with pytest.raises(ManifestError):
            validate(broken)
    (directory / MANIFEST_NAME).write_text(json.dumps({**manifest, "created": 5}))
    with pytest.raises(ManifestError, match="created"):
        verify_artifact(directory)


def test_fetch_cli_prints_only_the_path(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    env = {**os.environ, "TRIATTN_HUB": str(hub.root)}
    done = subprocess.run([sys.executable, "-m", "triattn_hub.cli", "fetch", "test-org/tiny-llama"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(hub.root / "models/test-org/tiny-llama/v1" / ARTIFACT_NAME)
    missing = subprocess.run([sys.executable, "-m", "triattn_hub.cli", "fetch", "nobody/nothing"], capture_output=True, text=True, env=env)
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert "no calibration for 'nobody/nothing'" in missing.stderr


def test_fetch_imports_no_heavy_modules(tmp_path, calibrated):
    hub = LocalHub(tmp_path / "hub")
    _publish(hub, calibrated)
    code = (
        "import sys; from triattn_hub.cli import main; rc = main(['fetch', 'test-org/tiny-llama', '--hub', sys.argv[1]]);"
        "heavy = [m for m in ('mlx', 'mlx.core', 'prefect', 'datasets', 'mlx_lm') if m in sys.modules];"
        "print(heavy, file=sys.stderr); sys.exit(rc or (3 if heavy else 0))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(hub.root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_published_files_follow_umask(tmp_path, calibrated):
    previous = os.umask(0o022)
    try:
        hub = LocalHub(tmp_path / "hub")
        result = _publish(hub, calibrated)
    finally:
        os.umask(previous)
    version_dir = tmp_path / "hub" / "models/test-org/tiny-llama" / result.version
    assert (version_dir / ARTIFACT_NAME).stat().st_mode & 0o777 == 0o644
    assert (version_dir / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644
    assert version_dir.stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "hub" / "index.json").stat().st_mode & 0o777 == 0o644


def test_missing_hub_directory_is_named(tmp_path):
    with pytest.raises(CalibrationNotFoundError, match="does not exist"):
        fetch("test-org/tiny-llama", hubs=[str(tmp_path / "no-such-hub")])
