"""Head backend: insightface detection and landmarks, head pose from a FaceVerse-style 3DMM fit (production).

Per frame, SCRFD finds the face in a square crop around the head (the stage's ROI; retried at other scales, or the
whole frame where there is no ROI); then, for every frame with a face at once (one batch per model), the 2D-106 and
3D-68 landmark models run on insightface's own 192 px crops of the face. The 3DMM (``morphable.py``) is fitted to
the clip's 68 landmarks under the clip's camera: one identity, per frame expression, rotation and translation, with
temporal smoothness. From the fit, per frame: the head rotation in the view looking at the head (geometry.py), the
head centre (``head_center_m`` from the landmarks' centroid, head frame) in pixels, the image scale f / depth there,
and the fit's error; the tight face box (face crops) is the box of the 106 landmarks. Frames whose fit error exceeds
``max_fit_frac`` of the face's size are dropped (a wrong detection, a face the model cannot explain).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from ..geometry import crop, crop_affine, project, uncrop_points
from ..morphable import FitConfig, MorphableModel, fit_clips, view_rotation
from . import HeadBackend, HeadClip
from .insightface_common import InsightFaceParams, load_pack

_KEY = "annotators.head.params.backend.params"


class InsightFaceHead(HeadBackend):
    """SCRFD + 2D-106 / 3D-68 landmarks (an insightface pack) + a FaceVerse-style 3DMM fit per clip."""

    @dataclass
    class Params(InsightFaceParams):
        faceverse_path: str | None = None  # the 3DMM file (FaceVerse .npy, or an .npz with the same arrays)
        faceverse_axes: str = "yup"  # yup: FaceVerse / BFM (y up, z out of the face); ydown: the head frame
        faceverse_unit_m: float | None = None  # metres per model unit; null: guessed from the face's width
        crop_size: int = 320  # the head ROI is cut at this size for the detector
        retry_scales: list[float] = field(default_factory=lambda: [0.75, 1.35])
        # head centre from the landmarks' centroid, head frame (x left ear, y down, z into the head), metres:
        # eye level, mid-skull
        head_center_m: list[float] = field(default_factory=lambda: [0.0, -0.035, 0.08])
        max_fit_frac: float = 0.08  # frames whose mean landmark error exceeds this fraction of the face size: no head
        fit: dict = field(default_factory=dict)  # FitConfig overrides (iters, rounds, robust, *_reg, smooth_*, device)

    def setup(self) -> None:
        p = self.params
        self.models = load_pack(p, ("detection", "landmark_2d_106", "landmark_3d_68"), f"{_KEY}.model_dir")
        self.morphable = MorphableModel.load(p.faceverse_path, p.faceverse_axes, p.faceverse_unit_m,
                                             config_key=f"{_KEY}.faceverse_path")
        if self.morphable.n_landmarks != 68:
            raise ValueError(f"{p.faceverse_path}: {self.morphable.n_landmarks} keypoints; the fit uses insightface's "
                             "68 iBUG landmarks, so the model needs their 68 vertex indices in that order")
        self.fit_cfg = FitConfig(**p.fit)

    # ---- per frame: detection ----------------------------------------------------------------------------------
    def _detect(self, frame_bgr: np.ndarray, roi: np.ndarray):
        """(box x0,y0,x1,y1, 5 keypoints, score) of the face in the ROI (or the frame), frame px; None if none."""
        det = self.models["detection"]
        if not np.isfinite(roi).all():
            boxes, kpss = det.detect(frame_bgr, max_num=1)
            return (boxes[0, :4], kpss[0] if kpss is not None else None, boxes[0, 4]) if len(boxes) else None
        n = self.params.crop_size
        center, side = ((roi[0] + roi[2]) / 2, (roi[1] + roi[3]) / 2), roi[2] - roi[0]
        for k in (1.0, *self.params.retry_scales):
            A = crop_affine(center, side * k, n)
            boxes, kpss = det.detect(crop(frame_bgr, A, n), max_num=1)
            if len(boxes):
                box = uncrop_points(boxes[0, :4].reshape(2, 2).astype(np.float64), A).reshape(4)
                kps = uncrop_points(kpss[0].astype(np.float64), A) if kpss is not None else None
                return box, kps, boxes[0, 4]
        return None

    # ---- per clip: landmarks, batched ----------------------------------------------------------------------------
    def _landmarks(self, task: str, frames_bgr: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """(F, L, 2 or 3) landmarks in frame px of one landmark model, all faces in one batch (insightface's own
        crop: the box's centre, 1.5 x its longer side, at the model's input size)."""
        from insightface.utils import face_align

        m = self.models[task]
        size = m.input_size[0]
        crops, inv = [], []
        for img, b in zip(frames_bgr, boxes):
            w, h = b[2] - b[0], b[3] - b[1]
            aimg, M = face_align.transform(img, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), size, size / (max(w, h) * 1.5),
                                           0)
            crops.append(aimg)
            inv.append(cv2.invertAffineTransform(M))
        blob = cv2.dnn.blobFromImages(crops, 1.0 / m.input_std, (size, size), (m.input_mean,) * 3, swapRB=True)
        fixed_batch = isinstance(m.input_shape[0], int) and m.input_shape[0] > 0
        chunks = [blob[i:i + 1] for i in range(len(blob))] if fixed_batch else [blob]
        pred = np.concatenate([m.session.run(m.output_names, {m.input_name: c})[0] for c in chunks])
        dim = 3 if pred.shape[1] >= 3000 else 2
        pred = pred.reshape(len(blob), -1, dim)[:, -m.lmk_num:].astype(np.float64)
        pred[..., :2] = (pred[..., :2] + 1) * (size // 2)
        if dim == 3:
            pred[..., 2] *= size // 2
        out = np.empty_like(pred)
        for i, IM in enumerate(inv):  # back to the frame (z scaled like x, y)
            out[i, :, :2] = pred[i, :, :2] @ IM[:, :2].T + IM[:, 2]
            if dim == 3:
                out[i, :, 2] = pred[i, :, 2] * np.sqrt(IM[0, 0] ** 2 + IM[0, 1] ** 2)
        return out

    def estimate(self, frames: np.ndarray, rois: np.ndarray, timestamps_ms: np.ndarray,
                 new_sequence: bool, camera_K: np.ndarray | None = None) -> HeadClip:
        res = self.estimate_many([dict(frames=frames, rois=rois, timestamps_ms=timestamps_ms,
                                       new_sequence=new_sequence, camera_K=camera_K)])[0]
        if isinstance(res, Exception):
            raise res
        return res

    def estimate_many(self, requests: list[dict]) -> list:
        """Each clip's faces found and its landmarks placed, then one 3DMM fit of all of them
        (``morphable.fit_clips``: each clip its own identity and optimiser state; the fit is bound by kernel
        launches, so several clips cost little more than one), then each clip's head pose. A clip that fails fails
        alone."""
        seen: list = []
        for r in requests:
            try:
                seen.append(self._observe(r["frames"], r["rois"], r.get("camera_K")))
            except Exception as e:  # noqa: BLE001 - one clip's failure is that clip's
                seen.append(e)
        fitted = [o for o in seen if not isinstance(o, Exception) and o.idx.size]
        fits = fit_clips(self.morphable, [(o.uv, o.w, o.K) for o in fitted], self.fit_cfg) if fitted else []
        by_clip = {id(o): f for o, f in zip(fitted, fits)}
        out = []
        for o in seen:
            try:
                out.append(o if isinstance(o, Exception) else self._finish(o, by_clip.get(id(o))))
            except Exception as e:  # noqa: BLE001 - one clip's failure is that clip's
                out.append(e)
        return out

    def _observe(self, frames: np.ndarray, rois: np.ndarray, camera_K: np.ndarray | None) -> _Observed:
        """Faces found per frame and the landmarks of those found: the fit's input."""
        T = len(frames)
        if camera_K is None:
            raise ValueError("InsightFaceHead fits a metric head model: it needs the clip's camera_K")
        K = np.asarray(camera_K, np.float64)
        if K.shape not in ((3, 3), (T, 3, 3)):
            raise ValueError(f"camera_K of shape {K.shape} for {T} frames: one 3x3 intrinsics matrix, or one per frame")
        bgr = [np.ascontiguousarray(f[..., ::-1]) for f in frames]  # insightface's models take BGR
        found = [self._detect(bgr[t], rois[t]) for t in range(T)]
        idx = np.array([t for t in range(T) if found[t] is not None], np.int64)
        # the fit runs over the whole clip (frames without a face have no landmarks: weight 0)
        uv = np.zeros((T, 68, 2))
        w = np.zeros((T, 68))
        lm106 = np.zeros((0, 106, 2))
        if len(idx):
            boxes = np.stack([found[t][0] for t in idx])
            lm106 = self._landmarks("landmark_2d_106", [bgr[t] for t in idx], boxes)
            lm68 = self._landmarks("landmark_3d_68", [bgr[t] for t in idx], boxes)
            uv[idx], w[idx] = lm68[..., :2], 1.0
        return _Observed(T, idx, uv, w, K, lm106)

    def _finish(self, o: _Observed, res) -> HeadClip:
        """The head pose per frame from the clip's fit (``res``; None: no face found)."""
        T = o.T
        out = HeadClip(valid=np.zeros(T, bool), rotation=np.tile(np.eye(3), (T, 1, 1)), center=np.zeros((T, 2)),
                       px_per_m=np.zeros(T), face_box=np.zeros((T, 4)), fit_px=np.zeros(T))
        if res is None:
            return out
        camera_K = np.broadcast_to(o.K, (T, 3, 3))
        mean, idb, _ = self.morphable.landmarks()
        centre_head = (mean + idb @ res.identity).mean(0) + np.asarray(self.params.head_center_m, np.float64)
        size = np.ptp(o.lm106, axis=1).max(-1)  # face size px, per found frame
        for i, t in enumerate(o.idx):
            if not res.valid[t] or res.error_px[t] > self.params.max_fit_frac * size[i]:
                continue
            K = camera_K[t]
            c = res.rotation[t] @ centre_head + res.translation[t]
            if c[2] <= 0:
                continue
            out.valid[t] = True
            out.rotation[t] = view_rotation(c).T @ res.rotation[t]
            out.center[t] = project(c, K)
            out.px_per_m[t] = K[0, 0] / c[2]
            out.face_box[t] = [*o.lm106[i].min(0), *o.lm106[i].max(0)]
            out.fit_px[t] = res.error_px[t]
        return out


@dataclass
class _Observed:
    """One clip's detections and landmarks, the 3DMM fit's input."""

    T: int
    idx: np.ndarray  # frames with a face
    uv: np.ndarray  # (T, 68, 2) px, zero where no face
    w: np.ndarray  # (T, 68) 1 where a face was found
    K: np.ndarray  # (T, 3, 3) or (3, 3)
    lm106: np.ndarray  # (len(idx), 106, 2) px
