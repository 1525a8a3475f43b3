"""Annotator backends: one small interface per kind, chosen by config.

A stage (``preprocess/annotators/{body,hands,head,refs}.py``) does everything that does not depend on
the model: subject tracking, placing joints in the camera frame, crops, conventions, shard fields.
A backend only runs a model and returns its raw estimate in the form its kind's interface fixes:

==========  ==========================================  =========================================
kind        interface                                   embedded backend (this package)
==========  ==========================================  =========================================
body        :class:`BodyBackend` → :class:`BodyFrame`   ``mediapipe_pose.MediaPipePose``
keypoints   :class:`KeypointsBackend` → KeypointsClip   (full: ``mmpose_wholebody.MMPoseWholeBody``)
hands       :class:`HandsBackend` → :class:`HandsClip`   ``mediapipe_hands.MediaPipeHands``
head, face  :class:`HeadBackend` → :class:`HeadClip`     ``mediapipe_face.MediaPipeFace``
identity    :class:`IdentityBackend`                    ``dlib_identity.DlibIdentity``
==========  ==========================================  =========================================

Production head and identity backends (``conf/annotators/full.yaml``): ``insightface_head.InsightFaceHead`` (SCRFD
detection + landmarks + a FaceVerse-style 3DMM fit, ``../morphable.py``) and ``insightface_identity.ArcFaceIdentity``
(512-D ArcFace).

Adding a backend (e.g. 4DHumans for body, HaMeR for hands) is one file with a subclass of the kind's
interface and one config entry ``backend: {target: preprocess.annotators.backends.<file>.<Class>, params: {...}}`` in
``conf/annotators/<name>.yaml``.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ...config import ConfigError


class Backend:
    """Common part of every backend: typed params, model loading in ``setup``, ``close``."""

    Params: ClassVar[type] = type("Params", (), {})

    def __init__(self, params: dict | None = None):
        params = dict(params or {})
        names = {f.name for f in dataclasses.fields(self.Params)} if dataclasses.is_dataclass(self.Params) else set()
        unknown = set(params) - names
        if unknown:
            raise ConfigError(f"backend {type(self).__name__}: unknown params {sorted(unknown)}; "
                              f"known: {sorted(names)}")
        self.params = self.Params(**params)

    def setup(self) -> None:
        """Load models (once per worker)."""

    def close(self) -> None:
        """Release models."""


def load_backend(spec: dict[str, Any] | None, kind: type[Backend], where: str) -> Backend:
    """Instantiate ``spec = {target: "module.Class", params: {...}}`` and check it is a ``kind`` backend."""
    if not spec or "target" not in spec:
        raise ConfigError(f"{where}: needs {{target: module.Class, params: {{...}}}} naming a {kind.__name__}")
    unknown = set(spec) - {"target", "params"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; use target and params")
    module, _, name = str(spec["target"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}.target: cannot import {spec['target']!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise ConfigError(f"{where}.target: {spec['target']!r} is not a {kind.__name__}")
    return cls(dict(spec.get("params") or {}))


# ---- body --------------------------------------------------------------------------------------

@dataclass
class BodyFrame:
    """Every person a body backend found in one frame; joints in the shard's SMPL-X body order."""

    joints2d: np.ndarray  # (P, N_BODY, 2) pixels
    joints3d: np.ndarray  # (P, N_BODY, 3) metres, camera-aligned axes (x right, y down, z away), any origin
    conf: np.ndarray  # (P, N_BODY) in [0, 1]; 0 for joints the backend does not fill
    boxes: np.ndarray | None = None  # (P, 4) person boxes when the backend has a detector; else from joints


class BodyBackend(Backend):
    """Finds people and their SMPL-X body joints in a clip."""

    filled: ClassVar[tuple[str, ...]] = ()  # SMPL-X names of the body joints this backend fills

    def estimate(self, frames: np.ndarray, timestamps_ms: np.ndarray, new_sequence: bool) -> list[BodyFrame]:
        """One :class:`BodyFrame` per frame. ``new_sequence`` is False when the clip continues the last one."""
        raise NotImplementedError


# ---- keypoints (2D, for the SMPL-X fit) ------------------------------------------------------------

@dataclass
class KeypointsClip:
    """2D keypoints of the main subject per frame, in SMPL-X joint order (``schema.N_SMPLX_JOINTS``: the joints
    smplx.SMPLX returns; a keypoint the model has no counterpart for stays at confidence 0)."""

    joints2d: np.ndarray  # (T, N_SMPLX_JOINTS, 2) pixels
    conf: np.ndarray  # (T, N_SMPLX_JOINTS) in [0, 1]


class KeypointsBackend(Backend):
    """Top-down 2D keypoints (body, feet, hands, face) of the subject inside its box in each frame."""

    def estimate(self, frames: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> KeypointsClip:
        """``boxes`` (T, 4) x0,y0,x1,y1 of the subject (the body stage's tracker); frames where ``valid`` is False
        are skipped (confidence 0)."""
        raise NotImplementedError


# ---- hands -------------------------------------------------------------------------------------

@dataclass
class HandsClip:
    """One hand per region of interest and frame; index 0 is the subject's left hand."""

    joints2d: np.ndarray  # (T, 2, 21, 2) pixels
    joints3d: np.ndarray  # (T, 2, 21, 3) metres, camera-aligned axes, any origin
    found: np.ndarray  # (T, 2) bool
    score: np.ndarray  # (T, 2) the backend's confidence of the hand, 0 where not found


class HandsBackend(Backend):
    """Estimates the 21 MediaPipe-ordered joints of the hand inside each region of interest."""

    def estimate(self, frames: np.ndarray, rois: np.ndarray, timestamps_ms: np.ndarray,
                 new_sequence: bool) -> HandsClip:
        """``rois`` (T, 2, 4): square x0,y0,x1,y1 boxes around each hand (NaN: skip)."""
        raise NotImplementedError


# ---- head and face -------------------------------------------------------------------------------

@dataclass
class HeadClip:
    """The face and its 3D pose, per frame."""

    valid: np.ndarray  # (T,) bool
    rotation: np.ndarray  # (T, 3, 3) head rotation, view frame (geometry.py convention)
    center: np.ndarray  # (T, 2) pixels of the head centre (centre of the head sphere)
    px_per_m: np.ndarray  # (T,) image scale at the head centre's depth, pixels per metre
    face_box: np.ndarray  # (T, 4) tight face box x0,y0,x1,y1 pixels
    landmarks: np.ndarray | None = None  # (T, 478, 3) pixels x, y and relative depth (pixel scale)
    blendshapes: np.ndarray | None = None  # (T, 52)
    fit_px: np.ndarray | None = None  # (T,) mean px error of a head-model fit to the landmarks (model-fitting backends)


class HeadBackend(Backend):
    """Finds the face inside each region of interest and estimates the head's 3D pose."""

    def estimate(self, frames: np.ndarray, rois: np.ndarray, timestamps_ms: np.ndarray,
                 new_sequence: bool, camera_K: np.ndarray | None = None) -> HeadClip:
        """``rois`` (T, 4): square x0,y0,x1,y1 boxes around the head (NaN: search the whole frame); ``camera_K``
        (T, 3, 3): the clip's intrinsics (geometry.py), for backends that fit a metric head model."""
        raise NotImplementedError

    def estimate_many(self, requests: list[dict]) -> list[HeadClip | Exception]:
        """:meth:`estimate` of several clips (each a dict of its keyword arguments), in order; a clip that fails gives
        its exception in its place and the others go on. One by one here; a backend that fits a head model overrides
        it to fit the clips together (``InsightFaceHead``: one 3DMM fit for all of them)."""
        out: list[HeadClip | Exception] = []
        for r in requests:
            try:
                out.append(self.estimate(**r))
            except Exception as e:  # noqa: BLE001 - one clip's failure is that clip's
                out.append(e)
        return out


# ---- identity ------------------------------------------------------------------------------------

class IdentityBackend(Backend):
    """A face-identity embedding (unit norm): cosine similarity compares two faces.

    ``dim``, the embedding's length, must be known from the config alone (before ``setup``): the pipeline records it
    in dataset.json (``dims.identity_dim``) before any model loads. A backend whose length depends on its model file
    makes it a param and checks the model against it in ``setup``.
    """

    dim: int = 0

    def embed(self, image: np.ndarray, face_box: np.ndarray) -> np.ndarray | None:
        """Embedding of the face in ``face_box`` (tight x0,y0,x1,y1 pixels) of an RGB image, or None."""
        raise NotImplementedError
