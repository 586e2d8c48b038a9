#!/usr/bin/env bash
# Create .venv with diffusion-align and its test dependencies. Safe to run again: it only adds what is missing.
# Installs no system package (scripts/test.sh adds Chromium for the browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
# DeepSpeed, for train.sharding=zero2 and its tests: its build reads the installed torch, so it comes after it and
# without build isolation (the version whose ZeRO-2 optimiser training/sharding.py checkpoints)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation "deepspeed~=0.19.8"
