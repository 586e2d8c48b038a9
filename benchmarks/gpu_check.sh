#!/usr/bin/env bash
# The prepared GPU check, one command for a machine with one CUDA GPU and no network:
#
#     bash benchmarks/gpu_check.sh [WHEELS_DIR] [OUT_DIR] [gpu_check.py's options, e.g. --archs sd15 sd35 flux]
#
# torch, accelerate, peft and transformers must be installed already; the other dependencies (diffusers, open_clip,
# datasets, ... and optionally xformers and bitsandbytes) come as wheels in WHEELS_DIR (default: wheels/), made on
# a networked machine with `pip download --dest wheels diffusers open_clip_torch datasets ...`. They and this
# package are installed offline from there, then benchmarks/gpu_check.py runs and writes OUT_DIR/gpu_check.md
# (default: outputs/gpu-check) after every case. On an H200 SD1.5's and SD3.5-medium's cases took 5 minutes and
# FLUX.1-dev's pipeline a minute to build; SDXL's are not timed yet. Exits non-zero if any case is not finite or fails.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${1:-wheels}"
out="${2:-outputs/gpu-check}"
python="${PYTHON:-python3}"
if [ -d "$wheels" ]; then
    "$python" -m pip install --quiet --no-index --find-links "$wheels" "$wheels"/*.whl
fi
"$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
"$python" -c "import torch; assert torch.cuda.is_available(), 'gpu_check.sh needs a CUDA GPU (use gpu_check.py --tiny on a CPU)'"
exec "$python" benchmarks/gpu_check.py --out "$out" "${@:3}"
