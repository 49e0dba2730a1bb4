"""Where a calibration may be published, given whether its model is private.

Calibrations of private or gated models reveal facts about weights their owner did not
publish, so they go to a private hub only: the hub the caller names, else the worker's
$TRIATTN_PRIVATE_HUB. They never fall back to $TRIATTN_HUB or the default hub, and never go
to the public hub. A Hugging Face hub also checks that its repo is private when publishing
(hub_hf.HfHub.publish raises PrivateModelError otherwise). A local directory counts as
private, because only the machine's users can read it.
"""

from __future__ import annotations

import os

from .errors import PrivateModelError
from .hub import PUBLIC_HUB, publish_address

PRIVATE_HUB_ENV = "TRIATTN_PRIVATE_HUB"


def publish_target(explicit: str | None, private: bool) -> str:
    """Return the hub address to publish to.

    Public models: `explicit`, else hub.publish_address(). Private models: `explicit`, else
    $TRIATTN_PRIVATE_HUB; raises PrivateModelError if neither is set or the address is the
    public hub.
    """
    if not private:
        return publish_address(explicit)
    address = explicit or os.environ.get(PRIVATE_HUB_ENV, "").strip()
    if not address:
        raise PrivateModelError(
            f"the model is private, and its calibration goes to a private hub only: pass a hub "
            f"(--hub or the hub parameter) or set {PRIVATE_HUB_ENV} on the worker"
        )
    if address.rstrip("/") == PUBLIC_HUB:
        raise PrivateModelError(
            f"the model is private, and {PUBLIC_HUB} is the public hub; pass a private hub or set {PRIVATE_HUB_ENV}"
        )
    return address
