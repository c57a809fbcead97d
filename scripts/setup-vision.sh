#!/usr/bin/env bash
# A second environment, .venv-vision, for the model families whose packages import torchvision (timm,
# open_clip). PyPI's torchvision wheels are built against one exact torch, and none of them imports beside
# the CPU torch 2.13.0 of .venv ("operator torchvision::nms does not exist"); torch 2.14.1 with torchvision
# 0.29.1 is the pair a Linux user gets from PyPI (a CUDA build, about 5.5 GB, that also runs on the CPU).
# Run ./scripts/setup.sh first (system corpora and the data cache are shared). Quick to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv-vision/bin/python ] || "$PYTHON" -m venv .venv-vision
pip=(.venv-vision/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" "timm==1.0.29" "open_clip_torch==3.3.0"
"${pip[@]}" -e ".[dev]"
