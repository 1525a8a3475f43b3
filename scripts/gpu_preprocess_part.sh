#!/usr/bin/env bash
# Installs part N of .whl-pp/ (scripts/gpu_preprocess_kit.sh says which call carries which) into /tmp/site on the
# lent GPU machine; part 3 joins the Ray wheel from the piece part 2 left in /tmp, part 4 adds .whl/ and unpacks the
# GL loader packages into / (root there). Then: export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: $0 PART (1-4)}
P=.whl-pp/p$N
TARGET=${TARGET:-/tmp/site}
[ -d "$P" ] || { echo "$P is not here: carry it in this call (run scripts/gpu_preprocess_kit.sh first)" >&2; exit 1; }
mkdir -p "$TARGET" /tmp/ppkit
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$@"; }
case "$N" in
  1) install "$P"/*.whl ;;
  2) cp "$P"/ray.part00 /tmp/ppkit/ ;;
  3) [ -f /tmp/ppkit/ray.part00 ] || { echo "part 2 did not run on this machine (it went cold?): start again" >&2; exit 1; }
     whl=/tmp/ppkit/$(cat "$P/ray.name")
     cat /tmp/ppkit/ray.part00 "$P"/ray.part01 > "$whl"
     install "$whl" "$P"/*.whl ;;
  4) cp -r "$P/face_recognition_models" "$TARGET/"
     [ -d .whl ] && install .whl/*.whl
     for f in "$P"/gl/*.deb; do dpkg -x "$f" /; done
     ldconfig ;;
  *) echo "no part $N (1-4)" >&2; exit 2 ;;
esac
echo "part $N installed into $TARGET"
