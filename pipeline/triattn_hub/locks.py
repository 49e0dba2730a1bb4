"""A per-model lock, so two workers of one Prefect server never calibrate the same model at once.

The lock is a Prefect global concurrency limit of one slot named `calibrate-{model id}` (with
"/" replaced by "--", which Prefect names cannot contain). It is created on first use. The
slot is held under a lease that Prefect renews while the calibration runs, and that expires if
the worker dies, so a crashed run does not block the model forever. Without a Prefect API
server (local ephemeral mode) there are no other workers and no lock is taken.
"""

from __future__ import annotations

import contextlib
import logging

logger = logging.getLogger(__name__)

LOCK_PREFIX = "calibrate-"


def lock_name(model_id: str) -> str:
    return LOCK_PREFIX + model_id.replace("/", "--")


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit `name` with `limit` slots unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            logger.info("created concurrency limit %s with %d slot(s)", name, limit)
        except ObjectAlreadyExists:
            # Another worker created it between the read and the create.
            pass


@contextlib.contextmanager
def model_lock(model_id: str, *, timeout_seconds: float | None = None):
    """Hold the model's lock for the body; wait for it if another run holds it.

    Raises TimeoutError when `timeout_seconds` pass without getting the slot.
    """
    from prefect.concurrency.sync import concurrency
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        # Local ephemeral mode (the CLI): this process is the only worker, and an ephemeral
        # server does not run the service that expires the leases of killed runs, so a slot
        # left by an interrupted run would block every later run of the model.
        yield
        return
    name = lock_name(model_id)
    ensure_limit(name)
    logger.info("waiting for lock %s", name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
