#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
# Usage: bash tests/run.sh [pytest arguments]. TRIATTN_HUB_VENV picks the venv (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(bash pipeline/setup-venv.sh calibrate,cpu,test)"
exec "$venv/bin/python" -m pytest "$@"
