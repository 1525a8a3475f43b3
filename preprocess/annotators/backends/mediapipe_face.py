"""Head backend: MediaPipe Face Landmarker on a crop around the head.

The landmarker gives 478 landmarks, 52 blendshapes and a facial transformation matrix: the rigid
pose of MediaPipe's canonical face model (centimetres; x to the subject's left, y up, z out of the
face; origin between the ears) in a y-up camera frame. The rotation is what the head sphere and the
yaw-sorted references need (landmarks + a generic PnP has a 15-30° pitch bias and fails near
profile). Small faces are not found on a whole frame, so the landmarker runs on a square crop
around the head that the stage derives from the body joints; the rotation is the crop's view of the
head (geometry.py). The head centre and the image scale come from a weak-perspective fit of the
rotated canonical model to the 2D landmarks (three unknowns, linear least squares), which keeps them
consistent with the landmarks whatever field of view the crop implies.
"""
from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..geometry import crop, crop_affine, orthonormalize, rotation_from_yup, uncrop_points
from . import HeadBackend, HeadClip
from .mediapipe_common import MediaPipeParams, VideoTask, landmarker_factory, model_path, mp_image, prefetch_enabled

N_LANDMARKS, N_BLENDSHAPES = 478, 52


def _fields(buf: bytes):
    """(field number, wire type, value) of a serialized protobuf message (enough for the metadata)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 5:
            v, i = struct.unpack_from("<f", buf, i)[0], i + 4
        elif wt == 1:
            v, i = struct.unpack_from("<d", buf, i)[0], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield num, wt, v


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = buf[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def canonical_face_model(task_path: str) -> np.ndarray:
    """(468, 3) vertices (cm) of the canonical face mesh inside ``face_landmarker.task``.

    From ``geometry_pipeline_metadata_landmarks.binarypb``: GeometryPipelineMetadata.canonical_mesh (1)
    is a Mesh3d whose vertex_buffer (3) holds x, y, z, u, v per vertex.
    """
    with zipfile.ZipFile(task_path) as z:
        meta = z.read("geometry_pipeline_metadata_landmarks.binarypb")
    mesh = next(v for num, wt, v in _fields(meta) if num == 1 and wt == 2)
    vb = [v for num, wt, v in _fields(mesh) if num == 3 and wt == 5]
    if not vb:  # packed encoding
        packed = next(v for num, wt, v in _fields(mesh) if num == 3 and wt == 2)
        vb = list(struct.unpack(f"<{len(packed) // 4}f", packed))
    verts = np.asarray(vb, np.float64).reshape(-1, 5)[:, :3]
    if verts.shape[0] != 468:
        raise ValueError(f"{task_path}: canonical face mesh has {verts.shape[0]} vertices, expected 468")
    return verts


class MediaPipeFace(HeadBackend):
    """``face_landmarker.task`` (face detector + 478 landmarks + blendshapes + transformation matrix)."""

    @dataclass
    class Params(MediaPipeParams):
        crop_size: int = 256  # the head crop is resized to this before the landmarker
        full_frame_max_side: int = 512  # a whole-frame search (no head ROI) runs at most at this size
        # when no face is found in the head crop, retry with the crop scaled by these factors (the face
        # detector is sensitive to the face's size in the crop, most of all near profile)
        retry_scales: list[float] = field(default_factory=lambda: [0.75, 1.35])
        # head centre (sphere centre) in the canonical model's frame, cm: mid-skull at eye level
        head_center_cm: list[float] = field(default_factory=lambda: [0.0, 1.5, -3.0])

    def setup(self) -> None:
        p = self.params
        key = "annotators.head.params.backend.params.model_path"
        self.canonical = canonical_face_model(model_path("face_landmarker", p.model_path, p.model_sha256, key)) / 100.0
        self.center_m = np.asarray(p.head_center_cm, np.float64) / 100.0  # metres
        factory = landmarker_factory("Face", "face_landmarker", p, key, num_faces=1, output_face_blendshapes=True,
                                     output_facial_transformation_matrixes=True)
        self.task = VideoTask(factory, p.video_mode, prefetch_enabled(p, factory, key))
        self.task.start(True)

    def estimate(self, frames: np.ndarray, rois: np.ndarray, timestamps_ms: np.ndarray,
                 new_sequence: bool, camera_K: np.ndarray | None = None) -> HeadClip:
        T, H, W = frames.shape[:3]
        out = HeadClip(valid=np.zeros(T, bool), rotation=np.tile(np.eye(3), (T, 1, 1)), center=np.zeros((T, 2)),
                       px_per_m=np.zeros(T), face_box=np.zeros((T, 4)),
                       landmarks=np.zeros((T, N_LANDMARKS, 3)), blendshapes=np.zeros((T, N_BLENDSHAPES)))
        self.task.start(new_sequence)
        n = self.params.crop_size
        for t in range(T):
            roi = rois[t]
            if not np.isfinite(roi).all():  # no head ROI: search the whole (downscaled) frame
                s = min(1.0, self.params.full_frame_max_side / max(H, W))
                A = np.array([[s, 0.0, 0.0], [0.0, s, 0.0]])
                img = frames[t] if s == 1.0 else cv2.resize(frames[t], (round(W * s), round(H * s)),
                                                            interpolation=cv2.INTER_AREA)
                res = self.task.run(mp_image(img), timestamps_ms[t])
                if res.face_landmarks and res.facial_transformation_matrixes:
                    self._fill(out, t, res, A, img.shape[1], img.shape[0])
                continue
            center, side = ((roi[0] + roi[2]) / 2, (roi[1] + roi[3]) / 2), roi[2] - roi[0]
            for k in (1.0, *self.params.retry_scales):
                A = crop_affine(center, side * k, n)
                res = self.task.run(mp_image(crop(frames[t], A, n)), timestamps_ms[t])
                if res.face_landmarks and res.facial_transformation_matrixes:
                    self._fill(out, t, res, A, n, n)
                    break
        return out

    def _fill(self, out: HeadClip, t: int, res, A: np.ndarray, w: int, h: int) -> None:
        lm = np.array([[p.x * w, p.y * h, p.z * w] for p in res.face_landmarks[0]])  # crop px, z at x's scale
        G = orthonormalize(np.asarray(res.facial_transformation_matrixes[0], np.float64)[:3, :3])
        # weak perspective: crop_uv = s * (G v)_xy (y flipped: image y is down) + c, for the 468 mesh points
        P = self.canonical @ G.T
        n = len(P)
        M = np.zeros((2 * n, 3))
        M[:n, 0], M[:n, 1] = P[:, 0], 1.0
        M[n:, 0], M[n:, 2] = -P[:, 1], 1.0
        (s, cu, cv), *_ = np.linalg.lstsq(M, np.concatenate([lm[:n, 0], lm[:n, 1]]), rcond=None)
        if s <= 0:
            return
        c = G @ self.center_m
        center_crop = np.array([cu + s * c[0], cv - s * c[1]])
        zoom = A[0, 0]  # crop px per frame px
        uv = uncrop_points(lm[:, :2], A)
        out.valid[t] = True
        out.rotation[t] = rotation_from_yup(G)
        out.center[t] = uncrop_points(center_crop, A)
        out.px_per_m[t] = s / zoom
        out.face_box[t] = [uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(), uv[:, 1].max()]
        out.landmarks[t] = np.concatenate([uv, lm[:, 2:3] / zoom], axis=1)
        if res.face_blendshapes:
            out.blendshapes[t] = [c.score for c in res.face_blendshapes[0]][:N_BLENDSHAPES]

    def close(self) -> None:
        if hasattr(self, "task"):
            self.task.close()
