"""Identity backend: dlib's ResNet face-identity embedding (``face_recognition_models``).

dlib aligns the face with its 5-point landmark model (trained on dlib's own CC0 data; the 68-point
model is left out: its training data is non-commercial), then the ResNet maps the aligned 150×150
chip to 128 numbers. dlib compares them by Euclidean distance (same person below ~0.6); here they are
returned unit-norm so that the cosine similarity of two faces is their dot product.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..assets import resolve
from . import IdentityBackend


class DlibIdentity(IdentityBackend):
    """128-D face embedding: dlib shape_predictor_5 + dlib_face_recognition_resnet_model_v1."""

    dim = 128

    @dataclass
    class Params:
        predictor_path: str | None = None  # null: the file shipped in face_recognition_models
        predictor_sha256: str | None = None
        model_path: str | None = None
        model_sha256: str | None = None
        num_jitters: int = 0  # >0: dlib averages over this many jittered chips (slower)

    def setup(self) -> None:
        import dlib

        p = self.params
        key = "video_stages.refs.params.identity.params"
        sp = resolve("dlib_shape_predictor_5", p.predictor_path, p.predictor_sha256, config_key=f"{key}.predictor_path")
        net = resolve("dlib_face_recognition_resnet", p.model_path, p.model_sha256, config_key=f"{key}.model_path")
        self._dlib = dlib
        self.predictor = dlib.shape_predictor(str(sp))
        self.net = dlib.face_recognition_model_v1(str(net))

    def embed(self, image: np.ndarray, face_box: np.ndarray) -> np.ndarray | None:
        if not np.isfinite(face_box).all() or face_box[2] - face_box[0] < 8 or face_box[3] - face_box[1] < 8:
            return None
        img = np.ascontiguousarray(image, dtype=np.uint8)
        rect = self._dlib.rectangle(*(int(round(v)) for v in face_box))
        shape = self.predictor(img, rect)
        d = np.asarray(self.net.compute_face_descriptor(img, shape, self.params.num_jitters), np.float32)
        n = float(np.linalg.norm(d))
        return d / n if n > 0 else None
