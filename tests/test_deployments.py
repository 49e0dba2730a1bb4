"""The deployments in prefect.yaml, end to end, and the private calibration path.

`prefect deploy --all` runs from the repository root against the session's Prefect server
(conftest.prefect_server), a process worker serves the triattn-cpu pool, and the on-demand
deployment calibrates a tiny private model saved in Hugging Face layout. The worker's
environment names a public hub (TRIATTN_HUB) and a private one (TRIATTN_PRIVATE_HUB).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import log_tail, stop_process_group
from tiny_model_dir import save_tiny_llama_dir
from triattn_hub.artifact import read_manifest
from triattn_hub.hub_local import LocalHub

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
POOLS = sorted({deployment["work_pool"]["name"] for deployment in PREFECT_YAML["deployments"]})
ON_DEMAND_POOL = "triattn-cpu"
PRIVATE_MODEL = "acme/private-tiny"
CORPUS_TEXT = "Water rises and falls twice a day because the moon pulls on the oceans. " * 3


def run_prefect(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def model_ids(hub: Path) -> set:
    return set(LocalHub(hub).read_index()["models"])


def files_naming(root: Path, text: str) -> list[Path]:
    """Return the files under `root` whose bytes contain `text`."""
    if not root.exists():
        return []
    return [path for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """Create the work pools, run `prefect deploy --all`, and start a worker on triattn-cpu."""
    root = tmp_path_factory.mktemp("deployments")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS_TEXT, encoding="utf-8")
    env = {
        **prefect_server.env,
        "TRIATTN_HUB": str(root / "public-hub"),
        "TRIATTN_PRIVATE_HUB": str(root / "private-hub"),
        # Where the default local hub would be, so the tests can check nothing lands there.
        "XDG_DATA_HOME": str(root / "xdg-data"),
        "HF_HUB_OFFLINE": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }
    env.pop("HF_TOKEN", None)
    for pool in POOLS:
        created = run_prefect(env, "work-pool", "create", pool, "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr

    deploy = run_prefect(env, "deploy", "--all")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr

    log = root / "worker.log"
    with open(log, "wb") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", ON_DEMAND_POOL, "--type", "process"],
            cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        yield {"root": root, "env": env, "corpus": corpus, "worker_log": log, "deploy_output": deploy.stdout}
    finally:
        stop_process_group(worker)


def test_deploy_creates_both_deployments(deployed, prefect_api):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("nightly/scheduled")
        on_demand = client.read_deployment_by_name("calibrate/on-demand")

    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.parameters == {"catalog": "calibrations/catalog.yaml", "state": "prefect"}
    assert nightly.entrypoint == "triattn_hub.nightly.nightly_flow"
    assert on_demand.entrypoint == "triattn_hub.flows.calibrate_flow"
    assert on_demand.work_pool_name == ON_DEMAND_POOL
    assert on_demand.enforce_parameter_schema is True
    assert on_demand.parameter_openapi_schema["properties"]["revision"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert "hf_token" not in json.dumps(on_demand.parameter_openapi_schema).lower()


def test_private_on_demand_run(deployed, prefect_api):
    root = deployed["root"]
    model = save_tiny_llama_dir(root / "private-tiny")

    run = run_prefect(
        deployed["env"],
        "deployment", "run", "calibrate/on-demand",
        "--param", f"model_id={PRIVATE_MODEL}",
        "--param", f"source={model}",
        "--param", f"corpus={deployed['corpus']}",
        "--param", "private=true",
        "--param", 'revision="1234"',
        "--param", "progress=false",
        # The short test corpus cannot pass the convergence gate; this test is about privacy.
        "--param", "allow_unconverged=true",
        "--watch", "--watch-timeout", "900",
        timeout=960,
    )

    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\nworker log:\n{log_tail(deployed['worker_log'])}"
    private_hub = root / "private-hub"
    entry = LocalHub(private_hub).read_index()["models"][PRIVATE_MODEL]["versions"]["v1"]
    assert entry["private"] is True
    assert entry["revision"] == "1234"
    manifest = read_manifest(private_hub / "models" / PRIVATE_MODEL / "v1")
    assert manifest["model"]["revision"] == "1234"
    assert manifest["model"]["private"] is True
    assert files_naming(root / "public-hub", PRIVATE_MODEL) == []
    assert files_naming(root / "xdg-data", PRIVATE_MODEL) == []

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        lock = client.read_global_concurrency_limit_by_name("calibrate-acme--private-tiny")
    assert lock.limit == 1
    assert lock.active_slots == 0


def test_numeric_revision_needs_json_string(deployed):
    run = run_prefect(
        deployed["env"], "deployment", "run", "calibrate/on-demand",
        "--param", f"model_id={PRIVATE_MODEL}", "--param", "revision=1234",
    )

    assert run.returncode != 0
    assert "revision" in run.stdout + run.stderr
    assert "1234 is not valid" in run.stdout + run.stderr


def test_cli_private_calibration(deployed, prefect_api):
    root = deployed["root"]
    model = save_tiny_llama_dir(root / "cli-private", seed=3)
    command = [
        sys.executable, "-m", "triattn_hub.cli", "calibrate", "acme/cli-private", "--from", str(model),
        "--corpus", str(deployed["corpus"]), "--private", "--no-progress", "--allow-unconverged",
    ]

    without_private_hub = {name: value for name, value in deployed["env"].items() if name != "TRIATTN_PRIVATE_HUB"}
    rejected = subprocess.run(command, env=without_private_hub, capture_output=True, text=True, timeout=600, cwd=root)

    assert rejected.returncode == 1
    assert "TRIATTN_PRIVATE_HUB" in rejected.stderr
    assert files_naming(root / "public-hub", "acme/cli-private") == []

    accepted = subprocess.run(command, env=deployed["env"], capture_output=True, text=True, timeout=600, cwd=root)

    assert accepted.returncode == 0, accepted.stderr
    assert "acme/cli-private" in model_ids(root / "private-hub")
    assert files_naming(root / "public-hub", "acme/cli-private") == []
    assert files_naming(root / "xdg-data", "acme/cli-private") == []
