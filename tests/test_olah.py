"""The fetch path against olah, a self-hosted Hub mirror, serving a local git repository offline.

olah (PyPI `olah`, part of the `test` extra) is an independent implementation of the Hub's
read endpoints. Here it runs bound to 127.0.0.1 in offline mode, with its upstream pointed at a
closed loopback port, and serves `mirrors/datasets/org/cal`: a git repository holding a hub
written by LocalHub. Known olah quirks: it returns 401 RepoNotFound instead of 404 for a
missing file, and its repo-info route needs an explicit revision.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import huggingface_hub.constants
import pytest

from calibration_fixtures import make_calibration
from triattn_hub.artifact import ARTIFACT_NAME
from triattn_hub.client import fetch
from triattn_hub.errors import CalibrationNotFoundError
from triattn_hub.hub_local import LocalHub

OLAH_CLI = Path(sys.executable).with_name("olah-cli")
HUB = "hf://datasets/org/cal"
STARTUP_SECONDS = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=triattn-test", "-c", "user.email=test@example.invalid", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    )
    return done.stdout.strip()


def _mirror(local: LocalHub, repo: Path, message: str) -> str:
    """Copy the local hub into the git repository, commit it, and return the commit sha."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
    for entry in local.root.iterdir():
        if entry.name in (".lock", ".staging"):
            continue
        target = repo / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(entry, target)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


class Olah:
    """One olah process on 127.0.0.1, offline, serving the mirrors under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "Olah":
        closed_port = _free_port()  # nothing listens there: any upstream request would fail at once
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.root / "mirrors"}"]\n'
            f'hf-scheme = "http"\nhf-netloc = "127.0.0.1:{closed_port}"\nhf-lfs-netloc = "127.0.0.1:{closed_port}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\nmirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "\n[accessibility]\noffline = true\n"
        )
        log = open(self.root / "olah.log", "w")
        self.process = subprocess.Popen(
            [str(OLAH_CLI), "-c", str(config), "--log-path", str(self.root / "olah-logs")],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with {self.process.returncode}: {(self.root / 'olah.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/datasets/org/cal/revision/main", timeout=2).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"olah did not answer within {STARTUP_SECONDS} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


@pytest.fixture(autouse=True)
def isolated_hf(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "TRIATTN_HUB", "ACTIONS_ID_TOKEN_REQUEST_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    if not OLAH_CLI.exists():
        pytest.fail(f"{OLAH_CLI} is missing; install the test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("olah")
    local = LocalHub(root / "local-hub")
    local.publish(*make_calibration("acme/tiny", seed=1))
    repo = root / "mirrors" / "datasets" / "org" / "cal"
    first = _mirror(local, repo, "publish acme/tiny v1")
    server = Olah(root).start()
    yield {"server": server, "local": local, "repo": repo, "first": first}
    server.stop()


def test_fetch_through_olah(mirror, tmp_path):
    resolved = fetch("acme/tiny", hubs=[HUB], endpoint=mirror["server"].url, cache_dir=tmp_path / "cache")
    assert resolved.version == "v1"
    assert resolved.commit == mirror["first"]
    expected = mirror["local"].root / "models/acme/tiny/v1" / ARTIFACT_NAME
    assert resolved.path.read_bytes() == expected.read_bytes()


def test_unknown_model_through_olah(mirror, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4}))
    with pytest.raises(CalibrationNotFoundError, match="closest calibrated ids: acme/tiny"):
        fetch("other/tiny", hubs=[HUB], endpoint=mirror["server"].url, cache_dir=tmp_path / "cache", model_path=model)


def test_lock_pins_commit_through_olah(mirror, tmp_path):
    lock = tmp_path / "triattn.lock"
    cache = tmp_path / "cache"
    url = mirror["server"].url
    first = fetch("acme/tiny", hubs=[HUB], endpoint=url, cache_dir=cache, lock=lock)
    assert json.loads(lock.read_text())["calibrations"]["acme/tiny"]["commit"] == mirror["first"]

    mirror["local"].publish(*make_calibration("acme/tiny", seed=2))
    second_commit = _mirror(mirror["local"], mirror["repo"], "publish acme/tiny v2")
    latest = fetch("acme/tiny", hubs=[HUB], endpoint=url, cache_dir=cache)
    assert latest.version == "v2"
    assert latest.commit == second_commit

    locked = fetch("acme/tiny", hubs=[HUB], endpoint=url, cache_dir=cache, lock=lock)
    assert locked.version == "v1"
    assert locked.commit == mirror["first"]
    assert locked.path.read_bytes() == first.path.read_bytes()


def test_offline_after_olah_stops(mirror, tmp_path):
    cache = tmp_path / "cache"
    online = fetch("acme/tiny", hubs=[HUB], endpoint=mirror["server"].url, cache_dir=cache)
    mirror["server"].stop()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "TRIATTN_HUB")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_ENDPOINT=mirror["server"].url, HF_TOKEN_PATH=str(tmp_path / "no-token"))
    done = subprocess.run(
        [sys.executable, "-m", "triattn_hub.cli", "fetch", "acme/tiny", "--hub", HUB],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == online.path
