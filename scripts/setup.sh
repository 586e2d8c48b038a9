#!/usr/bin/env bash
# Create .venv with diffusion-align and its test dependencies, and Debian's Chromium + ChromeDriver for the review
# page's browser test. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    if [ -z "$sudo" ] || command -v sudo >/dev/null; then
        $sudo apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium chromium-driver >/dev/null
    else
        echo "setup: no root and no sudo: Chromium not installed, the browser test will be skipped" >&2
    fi
fi
