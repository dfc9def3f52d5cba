#!/usr/bin/env bash
# What the tests need beyond the project itself, all from this repository's own files: the
# Python test requirements, the ONNX converter (without the dependencies it declares:
# requirements-onnx.txt says why), Debian's Chromium for the page test, and the page's
# onnxruntime-web as demo/package-lock.json pins it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-onnx.txt
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tests/test_demo.py needs Debian's chromium: sudo apt-get install chromium" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
npm ci --prefix demo --no-audit --no-fund --silent
