#!/usr/bin/env bash
# Install, build a tiny SD pipeline and synthetic preference pairs locally, and run a short Diffusion-DPO
# LoRA training on the CPU with configs/tiny/dpo.yaml. Prints where the outputs are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/diffusion-align make-tiny outputs/tiny
.venv/bin/diffusion-align train configs/tiny/dpo.yaml "$@"
