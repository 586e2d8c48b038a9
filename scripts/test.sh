#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the default test suite on the CPU. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the heavy opt-in tests.
# The review page's browser tests drive headless Chromium: where chromedriver is missing, this installs Debian's
# chromium and chromium-driver (as root, or through sudo); without either, those tests are skipped and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    if [ -z "$sudo" ] || command -v sudo >/dev/null; then
        echo "test: installing Debian's chromium and chromium-driver for the review page's browser tests" >&2
        if ! { $sudo apt-get update -q >/dev/null &&
               DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver >/dev/null; }; then
            echo "test: apt-get could not install them (no package mirror?): the browser tests will be skipped" >&2
        fi
    else
        echo "test: no root and no sudo: Chromium not installed, the browser tests will be skipped" >&2
    fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Two workers (pytest-xdist), one per core of the 2-core machines CI runs on: the tiny models' tests keep one core
# busy, so one process left the other idle most of the time (34 minutes against 21). Each test module stays on one
# worker (loadscope), so that its fixtures are made once, in the order conftest.py gives them (the heaviest first), and
# each worker's torch computes on one thread (with two each, the workers had run 60% of the tests when one each had run
# 94%; an OMP_NUM_THREADS set before this script is kept).
# -rs: every skipped test says why; --durations: the slowest tests, to keep the run near 20 minutes
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -q -rs --durations=15 -n 2 --dist loadscope --no-loadscope-reorder "$@"
