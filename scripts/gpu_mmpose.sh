#!/usr/bin/env bash
# Installs .whl-mm/ on the lent GPU machine (no internet, no mmpose/mmcv; Python 3.12, torch 2.11, numpy 2.x, opencv,
# scipy, matplotlib, cython there): mmpose 1.3.2 + mmdet 3.3.0 + mmengine 0.10.7 + mmcv-lite 2.1.0, enough to time the
# RTMW-x whole-body keypoints (preprocess/annotators/backends/mmpose_wholebody.py, bench/annotators_gpu.py) there.
# Run from the repo root, after .whl/ (scripts/gpu_wheels.sh: omegaconf, smplx, ... which `preprocess` imports):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   bash scripts/gpu_mmpose.sh [--target /tmp/site] && export PYTHONPATH=/tmp/site:$PWD
#   python3 bench/annotators_gpu.py --face-size none --iters 5      # keypoints (121 frames, 512 px) + a short fit
#
# Rebuild .whl-mm/ here (where pip reaches the registry; ~6.5 MB; the sdist's metadata step needs numpy + cython in
# the python that downloads it, e.g. scripts/install_mmpose.sh's venv):
#   PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
#         --platform manylinux2014_x86_64"
#   python3 -m pip download -q --no-deps --only-binary=:all: $PLAT -d .whl-mm "mmengine==0.10.7" "mmcv-lite==2.1.0" \
#     "mmdet==3.3.0" "mmpose==1.3.2" "addict==2.4.0" "yapf==0.43.0" "platformdirs==4.14.9" "termcolor==3.3.0" \
#     "munkres==1.1.4" "setuptools==80.10.2"
#   python3 -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl-mm "xtcocotools==1.14.3"
#
# What and why (checked with python 3.11 + torch 2.14.1 here: RTMW-x builds and runs through MMPoseWholeBody):
# - only what the mmpose path imports and the image lacks: mmengine needs addict, yapf (+ platformdirs), termcolor;
#   mmpose's codecs need munkres (1.1.4: the original pure-Python one; 3.0.0 is a new maintainer's rewrite);
#   mmpose.datasets needs xtcocotools (imported by `mmpose.apis`). mmpose's other declared deps (chumpy, json_tricks)
#   and mmdet's (pycocotools, shapely, terminaltables) are not imported on this path and are not carried.
# - xtcocotools has no wheel built against numpy 2: its sdist is built here first (C extension: cython, numpy's
#   headers, gcc and Python.h of this python; ~10 s).
# - mmpose.apis imports pkg_resources (mmengine's get_installed_path), which setuptools >= 81 removed: setuptools
#   80.10.2 (the project's constraints.txt pin, <81) goes in only where `import pkg_resources` fails.
# - mmcv-lite has no compiled ops (mmcv._ext), and `mmpose.models` imports mmcv.ops (edpose_head), which looks them up
#   at import. RTMW (CSPNeXt + RTMCC head) calls none of them, so for the bench a stand-in mmcv/_ext.py is written
#   into the target (BENCH-ONLY WORKAROUND, not in any production install: production builds mmcv 2.1.0 with its
#   ops, scripts/install_mmpose.sh): its functions exist but raise NotImplementedError when called, so a model that
#   does need an op fails loudly instead of being timed without it. Carry a real mmcv-2.1.0-cp312 wheel in .whl-mm/
#   and it is installed instead of mmcv-lite, with no stand-in.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=/tmp/site
WHL=.whl-mm
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET=$2; shift 2 ;;
    --target=*) TARGET=${1#--target=}; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (usage: $0 [--target DIR])" >&2; exit 2 ;;
  esac
done
[ -d "$WHL" ] || { echo "$WHL/ is missing: build it where pip reaches the registry (see the top of $0)" >&2; exit 1; }
mkdir -p "$TARGET" && TARGET=$(cd "$TARGET" && pwd)
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT

# 1. sdists (xtcocotools) -> wheels for this python and numpy
shopt -s nullglob
sdists=("$WHL"/*.tar.gz)
if [ ${#sdists[@]} -gt 0 ]; then
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$inc/Python.h" ] || echo "warning: no $inc/Python.h: building ${sdists[*]} will likely fail" >&2
  command -v "${CC:-gcc}" >/dev/null || command -v cc >/dev/null || echo "warning: no C compiler on PATH" >&2
  t0=$SECONDS
  "$PY" -m pip wheel -q --no-index --no-build-isolation --no-deps --no-cache-dir -w "$BUILD" "${sdists[@]}"
  echo "built $(cd "$BUILD" && ls *.whl | tr '\n' ' ')($((SECONDS - t0)) s)"
fi

# 2. the wheels: setuptools only where pkg_resources is missing; a real mmcv wheel, if carried, instead of mmcv-lite
wheels=()
real_mmcv=("$WHL"/mmcv-2*.whl)
for w in "$WHL"/*.whl "$BUILD"/*.whl; do
  case "$(basename "$w")" in
    setuptools-*) PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c 'import pkg_resources' 2>/dev/null \
                    || wheels+=("$w") ;;
    mmcv_lite-*) [ ${#real_mmcv[@]} -gt 0 ] || wheels+=("$w") ;;
    *) wheels+=("$w") ;;
  esac
done
# (--upgrade replaces a top-level folder of the target whole: keep the console scripts already in its bin/)
[ ! -d "$TARGET/bin" ] || cp -a "$TARGET/bin" "$BUILD/bin.keep"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "${wheels[@]}"
[ ! -d "$BUILD/bin.keep" ] || cp -an "$BUILD/bin.keep/." "$TARGET/bin/"

# 3. mmcv-lite: the stand-in for the compiled ops (bench only, see above)
if ! compgen -G "$TARGET/mmcv/_ext*.so" >/dev/null; then
  cat > "$TARGET/mmcv/_ext.py" <<'EOF'
"""BENCH-ONLY stand-in for mmcv's compiled ops, written by scripts/gpu_mmpose.sh into mmcv-lite: mmpose imports
mmcv.ops, whose modules only check at import that these functions exist. Calling one raises."""
CALLED = []


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def op(*args, **kwargs):
        CALLED.append(name)
        raise NotImplementedError(f"mmcv._ext.{name}: mmcv's compiled ops are not installed (mmcv-lite + stand-in)")

    op.__name__ = name
    return op
EOF
fi

# 4. the check: versions, and mmpose.apis (xtcocotools, pkg_resources, mmcv.ops) imports
PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -W ignore -c '
import os, mmpose, mmcv, mmdet, mmengine, xtcocotools, mmcv._ext as ext
from mmpose.apis import init_model
print(f"ok: mmpose {mmpose.__version__}, mmdet {mmdet.__version__}, mmengine {mmengine.__version__}, mmcv "
      f"{mmcv.__version__} (ops: {os.path.basename(ext.__file__)}), xtcocotools at {xtcocotools.__path__[0]}")'
echo "export PYTHONPATH=$TARGET:$PWD"
