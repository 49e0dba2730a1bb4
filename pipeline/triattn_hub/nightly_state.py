"""Models that cannot be calibrated, remembered so the nightly run reports each one once.

A record is keyed by model id, weights fingerprint (which contains the Hub revision) and
calibrator version, so a new revision of the model or a new calibrator tries again. Two stores:

- `FileStateStore`: one JSON file, for runs without a Prefect server (GitHub Actions keeps the
  file between runs with actions/cache).
- `VariableStateStore`: one Prefect Variable per record, shared by every worker of a server.

`open_state("prefect")` returns the Variable store; any other value is a file path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import TriattnHubError
from .manifest import CALIBRATOR_VERSION, utc_now

logger = logging.getLogger(__name__)

VARIABLE_STORE = "prefect"
VARIABLE_PREFIX = "triattn-unsupported-"


def state_key(model_id: str, weights: str, calibrator_version: int = CALIBRATOR_VERSION) -> str:
    """Return the key of a model's record: model id, weights fingerprint and calibrator version."""
    return f"{model_id}|{weights}|calibrator-{calibrator_version}"


# Prefect Variable values are limited to 5000 characters of JSON (prefect 3.9), so long
# reasons are cut to leave room for the other fields.
MAX_REASON_CHARS = 2000


def new_record(model_id: str, weights: str, reason: str) -> dict:
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3] + "..."
    return {
        "model_id": model_id,
        "weights": weights,
        "calibrator_version": CALIBRATOR_VERSION,
        "reason": reason,
        "recorded": utc_now(),
    }


def default_state_path() -> Path:
    """Return $XDG_STATE_HOME/triattn-hub/unsupported.json (~/.local/state/... by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "triattn-hub" / "unsupported.json"


class FileStateStore:
    """Records in one JSON file, rewritten atomically under an exclusive lock."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"FileStateStore({str(self.path)!r})"

    def records(self) -> dict[str, dict]:
        """Return every record by key (an empty dict if the file does not exist yet)."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise TriattnHubError(f"state file {self.path} is not valid JSON ({exc}); delete it to start over") from None
        return document.get("unsupported", {})

    def get(self, key: str) -> dict | None:
        return self.records().get(key)

    def put(self, key: str, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.records()
            records[key] = record
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"unsupported": records}, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(tmp, self.path)


class VariableStateStore:
    """Records as Prefect Variables named triattn-unsupported-{sha256 of the key, 40 hex digits}.

    Variable names allow only letters, digits, dashes and underscores, so the key is hashed,
    and the record keeps the readable model id and fingerprint.
    """

    def __repr__(self) -> str:
        return "VariableStateStore()"

    @staticmethod
    def variable_name(key: str) -> str:
        return VARIABLE_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:40]

    def get(self, key: str) -> dict | None:
        from prefect.variables import Variable

        return Variable.get(self.variable_name(key), default=None)

    def put(self, key: str, record: dict) -> None:
        from prefect.variables import Variable

        Variable.set(self.variable_name(key), record, overwrite=True)


def open_state(address: str | None):
    """Return the store named by `address`: "prefect", a file path, or None for default_state_path()."""
    if address == VARIABLE_STORE:
        return VariableStateStore()
    return FileStateStore(address or default_state_path())
