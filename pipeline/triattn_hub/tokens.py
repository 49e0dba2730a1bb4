"""The Hugging Face token of a worker: from its environment or a Prefect Secret block.

Tokens never travel as flow parameters, because Prefect stores parameters in the run's record
for anyone with API access to read. A worker gets its token from HF_TOKEN in its environment,
or else from the Prefect Secret block named `hf-token`, created once with
`prefect block create secret` or in Python:

    from prefect.blocks.system import Secret
    Secret(value="hf_...").save("hf-token")

The token is never logged.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

TOKEN_ENV = "HF_TOKEN"
SECRET_BLOCK = "hf-token"


def _prefect_api_configured() -> bool:
    """Return True when a Prefect API is set or this code runs inside a flow run."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value()) or FlowRunContext.get() is not None


def secret_block_token(name: str = SECRET_BLOCK) -> str | None:
    """Return the value of the Prefect Secret block `name`, or None if there is none.

    Only asks a Prefect API that is configured (PREFECT_API_URL or a running flow), so a
    command-line run without Prefect does not start a temporary server just to look.
    """
    if not _prefect_api_configured():
        return None
    from prefect.blocks.system import Secret

    try:
        return Secret.load(name).get()
    except ValueError:
        # Raised by Block.load when no block document has this name.
        return None
    except Exception as exc:  # noqa: BLE001  (an API outage must not stop a public download)
        logger.warning("could not read the Prefect Secret block %r (%s); continuing without it", name, type(exc).__name__)
        return None


def hf_token() -> str | None:
    """Return the worker's Hugging Face token: $HF_TOKEN, else the `hf-token` Secret block, else None.

    None lets huggingface_hub fall back to the login stored by `hf auth login`.
    """
    value = os.environ.get(TOKEN_ENV)
    if value:
        return value
    return secret_block_token()
