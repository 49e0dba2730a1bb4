"""Hub addresses, the default hubs and the search order.

A hub address is either a local directory path or `hf://datasets/ORG/NAME` for a Hugging
Face dataset repo. `TRIATTN_HUB` contains a comma-separated, ordered list of hub addresses: fetch
searches them in order, and calibrate publishes to the first.
"""

from __future__ import annotations

import os
from pathlib import Path

HUB_ENV = "TRIATTN_HUB"
PUBLIC_HUB = "hf://datasets/triattn-hub/calibrations"


def default_local_hub() -> Path:
    """Return the default local hub: $XDG_DATA_HOME/triattn-hub/hub (~/.local/share/... by default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "triattn-hub" / "hub"


def hub_addresses(explicit: list[str] | None = None) -> list[str]:
    """Return the ordered hub list: `explicit`, else $TRIATTN_HUB, else local default then public."""
    if explicit:
        return list(explicit)
    from_env = [part.strip() for part in os.environ.get(HUB_ENV, "").split(",") if part.strip()]
    if from_env:
        return from_env
    return [str(default_local_hub()), PUBLIC_HUB]


def publish_address(explicit: str | None = None) -> str:
    """Return where calibrate publishes: `explicit`, else the first $TRIATTN_HUB entry, else the local default."""
    if explicit:
        return explicit
    from_env = [part.strip() for part in os.environ.get(HUB_ENV, "").split(",") if part.strip()]
    return from_env[0] if from_env else str(default_local_hub())


def is_remote(address: str) -> bool:
    return address.startswith("hf://")


def open_hub(address: str, *, token: str | None = None, endpoint: str | None = None):
    """Return the hub backend for an address (LocalHub or HfHub)."""
    if is_remote(address):
        from .hub_hf import HfHub

        return HfHub.from_address(address, token=token, endpoint=endpoint)
    from .hub_local import LocalHub

    return LocalHub(address)
