#!/usr/bin/env bash
# The main job on the built-in default: install into .venv, then `diffusion-align demo` in the toy world, offline:
# the shipped base model makes preference pairs, the toy PickScore labels them, Diffusion-DPO LoRA trains on them,
# and the oracle judges base and aligned images on held-out prompts. Prints the win rate and where the report is.
# Extra arguments go to the demo, e.g. `bash scripts/quickstart.sh --method mapo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/diffusion-align demo "$@"
