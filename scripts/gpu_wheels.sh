#!/usr/bin/env bash
# Builds .whl/: the wheels a bare CUDA machine with Python 3.12 + PyTorch (the lent GPU machine's image: torch,
# numpy, opencv, matplotlib, pyarrow, safetensors, msgpack, ninja, einops, psutil, py-cpuinfo, tqdm there) lacks
# for training, the learning tests and the GPU benches. Run here, where pip reaches the registry; on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# ~20 MB. deepspeed and antlr4 are sdists: built here as pure-Python wheels (DS_BUILD_OPS=0: its ops JIT-build there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.whl}
mkdir -p "$OUT"
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
      --platform manylinux1_x86_64)
# the trainer (deepspeed + its pydantic), the configs (hydra), the shards (webdataset), the loader's readers (decord;
# soundfile for FLAC audio where PyAV is absent), the skeleton's joint names (smplx)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$OUT" \
  hjson "pydantic==2.14.4" "pydantic-core==2.50.5" annotated-types typing-inspection "typing-extensions>=4.16" \
  "hydra-core==1.3.2" "omegaconf==2.3.0" "webdataset==1.0.2" braceexpand "decord==0.6.0" "smplx==0.1.28" \
  "soundfile>=0.12" cffi pycparser
python3 -m pip wheel -q --no-deps -w "$OUT" "antlr4-python3-runtime==4.9.3"
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w "$OUT" "deepspeed==0.19.8"
du -sh "$OUT"
