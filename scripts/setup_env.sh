#!/usr/bin/env bash
# Set up a fresh machine for napari-medseg: a virtual environment in .venv with torch pinned
# to the pair that imports here (requirements/constraints-cpu.txt), the package in editable
# mode with its test extras (bioimageio: the package export and its check), and (as root, when
# missing) a virtual X server for the GUI tests.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first and pinned, so that nothing lets pip resolve it on its own.
"${PIP[@]}" -c requirements/constraints-cpu.txt torch torchvision
"${PIP[@]}" -c requirements/constraints-cpu.txt -e ".[dev,bench,cluster,bioimageio]"

if ! command -v Xvfb >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Xvfb for the GUI tests ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 >/dev/null
  else
    echo "Xvfb is missing: install xvfb (Debian/Ubuntu: apt-get install xvfb) to run the GUI tests." >&2
  fi
fi
