#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the default test suite on the CPU. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the heavy opt-in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python -m pytest -q "$@"
