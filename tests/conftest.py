import os
import sys
from pathlib import Path

# Tests import helper modules (tiny_models, hub_server) from this directory.
sys.path.insert(0, str(Path(__file__).parent))

# OpenBLAS must be in place before any test module imports mlx.core; the real-model tests run
# several times faster with it. TRIATTN_HUB_BLAS=off in the environment keeps the bundled BLAS.
from triattn_hub.blas import enable_fast_cpu_blas  # noqa: E402

enable_fast_cpu_blas()


# --- A Prefect server shared by the whole test session -----------------------------------------
# Starting Prefect takes 10 to 20 seconds on a small machine, so tests that need Prefect share
# one real `prefect server start` on 127.0.0.1 with SQLite in a temporary PREFECT_HOME.

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

# No usage reports from Prefect or huggingface_hub, and no UI build.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
}
SERVER_START_TIMEOUT = 180


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class PrefectServer:
    """A running Prefect server: its API URL and the environment for Prefect subprocesses."""

    url: str
    home: Path
    env: dict
    log: Path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Start `prefect server start` on 127.0.0.1 for the session and stop it at the end."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(home), "PREFECT_API_URL": url}
    env.pop("PREFECT_API_KEY", None)
    log = home / "server.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"prefect server exited with code {process.returncode}:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer /api/health within {SERVER_START_TIMEOUT} s:\n{log_tail(log)}")
            time.sleep(0.5)
        yield PrefectServer(url, home, env, log)
    finally:
        stop_process_group(process)


@pytest.fixture(scope="session")
def prefect_api(prefect_server):
    """Point flows run in this process at the session's Prefect server."""
    import contextlib

    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    previous = {name: os.environ.get(name) for name in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_settings({PREFECT_API_URL: prefect_server.url, PREFECT_HOME: str(prefect_server.home)}))
        # As prefect.testing.utilities.prefect_test_harness does: threads that copied their
        # context before this fixture ran see the same settings.
        stack.enter_context(prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()))
        yield prefect_server
        # Send the queued logs and events while the server still runs.
        APILogWorker.drain_all(timeout=30)
        EventsWorker.drain_all(timeout=30)
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
