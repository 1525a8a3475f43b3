"""Head stage: FaceVerse-style head parameters and 224×224 face crops (paper 3.2, "3D Head Spheres" and
"Implicit Facial Representations").

The head backend runs on a square crop around the subject's head (from the body's face joints:
nose, eyes, ears), ``roi_m`` metres wide at the head's depth, so small faces in full-body frames are
found; frames where the body lost the subject are searched whole when ``full_frame_fallback``. Per
frame it stores the head rotation (view frame, geometry.py) and yaw/pitch/roll, the head centre and
the head-sphere radius in pixels (``head_radius_m`` at the head's image scale), the head centre in the
camera frame and the scale. The face crop is the backend's tight face box grown by ``face_margin`` of
its size on every side, made square, smoothed over time and resized to 224×224.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import BODY_JOINT_NAMES, FACE_CROP_SIZE
from ..stage import OK, run_clip_stage
from ..video import encode_mp4
from .backends import HeadBackend, HeadClip
from .common import BackendClipStage, finite_or_none, frac, timestamps_ms
from .geometry import crop, crop_affine, lift_to_rays, smooth_series, square_box, ypr_from_rotation

_FACE_JOINTS = [BODY_JOINT_NAMES.index(n) for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")]
_HEAD = BODY_JOINT_NAMES.index("head")


class HeadStage(BackendClipStage):
    """Head pose, head sphere parameters and face crops (``head`` and ``face`` field groups)."""

    name = "head"
    reads = ("frames", "fps", "timestamps", "frame_index", "video_key", "camera_K", "body_joints2d",
             "body_joints3d", "body_conf", "subject_valid")
    writes = ("head_rotation", "head_ypr", "head_center", "head_radius", "head_translation", "head_scale",
              "head_valid", "head_fit_px", "face", "face_box", "face_valid", "face_landmarks", "face_blendshapes",
              "m_yaw_mean", "m_yaw_min", "m_yaw_max", "m_head_valid_frac", "m_face_margin", "m_head_fit_px")

    backend_kind = HeadBackend

    @dataclass
    class Params:
        backend: dict[str, Any] = field(default_factory=dict)
        roi_m: float = 0.5  # side of the square searched around the head, metres at the head's depth
        min_joint_conf: float = 0.3  # face joints at least this sure place the head ROI
        full_frame_fallback: bool = True  # frames without the body's subject: search the whole frame
        head_radius_m: float = 0.1  # head sphere radius; head_radius (px) = head_scale (px/m) * this
        face_margin: float = 0.3  # the face crop grows the tight face box by this fraction per side
        face_smooth_sigma: float = 1.0  # temporal Gaussian (frames) on the face crop box; 0: off
        face_crf: int = 18  # H.264 quality of the stored face crops
        landmarks: bool = True  # also store the 478 landmarks and 52 blendshapes when the backend has them


    def rois(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        """(T, 4) square boxes around the head (NaN: search the whole frame) and which frames to search."""
        j2, j3, conf, K = row["body_joints2d"], row["body_joints3d"], row["body_conf"], row["camera_K"]
        T = len(j2)
        out = np.full((T, 4), np.nan)
        search = np.zeros(T, bool)
        for t in range(T):
            sure = [j for j in _FACE_JOINTS if conf[t, j] >= self.params.min_joint_conf]
            if row["subject_valid"][t] and sure:
                pts = j2[t, sure]
                z = j3[t, _HEAD, 2] if j3[t, _HEAD, 2] > 0 else np.median(j3[t, sure, 2])
                spread = np.ptp(pts, axis=0).max() if len(sure) > 1 else 0.0
                side = max(self.params.roi_m * K[t, 0, 0] / max(z, 1e-3), 2.5 * spread)
                out[t] = square_box(pts.mean(0), side)
                search[t] = True
            else:
                search[t] = self.params.full_frame_fallback
        return out, search

    def face_boxes(self, head: HeadClip) -> np.ndarray:
        """(T, 4) square face-crop boxes: tight box grown by the margin, smoothed over valid frames."""
        b = head.face_box
        center = (b[:, :2] + b[:, 2:]) / 2
        side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * (1 + 2 * self.params.face_margin)
        cs = smooth_series(np.concatenate([center, side[:, None]], 1), head.valid, self.params.face_smooth_sigma)
        return np.stack([square_box(c[:2], c[2]) for c in cs]) * head.valid[:, None]

    def request(self, row: dict) -> dict:
        """The backend's input for one clip: the frames to search (``estimate``'s keyword arguments) and, under
        ``idx``, which frames of the clip they are."""
        rois, search = self.rois(row)
        idx = np.flatnonzero(search)
        return {"idx": idx, "frames": row["frames"][idx], "rois": rois[idx], "timestamps_ms": timestamps_ms(row)[idx],
                "new_sequence": self.continuity.new_sequence(row),
                "camera_K": np.asarray(row["camera_K"], np.float64)[idx]}

    def process(self, row: dict) -> dict:
        req = self.request(row)
        idx = req.pop("idx")
        return self.fields(row, _scatter(self.backend.estimate(**req), idx, len(row["frames"])))

    def process_batch(self, rows: list[dict]) -> list[dict]:
        """The clips of a batch through one ``estimate_many`` (a model-fitting backend fits them together: its time
        per frame falls with the frames per fit); a clip that fails any step fails alone, with its reason; the
        backend's time is shared out by frames searched."""
        todo = [r for r in rows if r["status"] == OK and r["kind"] == "clip"]
        if len(todo) < 2:
            return super().process_batch(rows)
        reqs: dict[int, dict] = {}

        def prepare(row: dict) -> dict:
            reqs[id(row)] = self.request(row)
            return {}

        for r in todo:
            run_clip_stage(self, r, prepare)
        ready = [r for r in todo if r["status"] == OK]
        idx = [reqs[id(r)].pop("idx") for r in ready]
        t0 = time.perf_counter()
        parts = self.backend.estimate_many([reqs.pop(id(r)) for r in ready]) if ready else []
        seconds = time.perf_counter() - t0
        frames = max(1, sum(len(i) for i in idx))
        for r, i, part in zip(ready, idx, parts):
            r["timings"][self.name] = r["timings"].get(self.name, 0.0) + seconds * len(i) / frames

            def finish(row: dict, i=i, part=part) -> dict:
                if isinstance(part, Exception):
                    raise part
                return self.fields(row, _scatter(part, i, len(row["frames"])))

            run_clip_stage(self, r, finish)
        return rows

    def fields(self, row: dict, head: HeadClip) -> dict:
        """The stage's fields of a clip from the backend's estimate for all its frames."""
        frames = row["frames"]
        T = len(frames)
        K = row["camera_K"]
        valid = head.valid

        rot = np.where(valid[:, None, None], head.rotation, 0.0)
        ypr = np.where(valid[:, None], ypr_from_rotation(head.rotation), 0.0)
        scale = np.where(valid, head.px_per_m, 0.0)
        trans = np.zeros((T, 3))
        for t in np.flatnonzero(valid):
            trans[t] = lift_to_rays(np.array([K[t, 0, 0] / scale[t]]), head.center[t][None], K[t])[0]
        boxes = self.face_boxes(head)
        crops = np.zeros((T, FACE_CROP_SIZE, FACE_CROP_SIZE, 3), np.uint8)
        for t in np.flatnonzero(valid):
            c, side = (boxes[t, :2] + boxes[t, 2:]) / 2, boxes[t, 2] - boxes[t, 0]
            crops[t] = crop(frames[t], crop_affine(c, side, FACE_CROP_SIZE), FACE_CROP_SIZE)
        yaw = ypr[valid, 0]
        out = {
            "head_rotation": rot.astype(np.float32), "head_ypr": ypr.astype(np.float32),
            "head_center": (head.center * valid[:, None]).astype(np.float32),
            "head_radius": (scale * self.params.head_radius_m).astype(np.float32),
            "head_translation": trans.astype(np.float32), "head_scale": scale.astype(np.float32),
            "head_valid": valid.astype(np.uint8),
            "face": encode_mp4(crops, float(row["fps"]), crf=self.params.face_crf),
            "face_box": boxes.astype(np.float32), "face_valid": valid.astype(np.uint8),
            "m_yaw_mean": finite_or_none(yaw.mean() if len(yaw) else np.nan),
            "m_yaw_min": finite_or_none(yaw.min() if len(yaw) else np.nan),
            "m_yaw_max": finite_or_none(yaw.max() if len(yaw) else np.nan),
            "m_head_valid_frac": frac(valid),
            "m_face_margin": self.params.face_margin,
        }
        if self.params.landmarks and head.landmarks is not None:
            out["face_landmarks"] = (head.landmarks * valid[:, None, None]).astype(np.float16)
        if self.params.landmarks and head.blendshapes is not None:
            out["face_blendshapes"] = (head.blendshapes * valid[:, None]).astype(np.float16)
        if head.fit_px is not None:  # a backend that fits a head model: its per-frame error, and the clip's median
            fit = np.where(valid, head.fit_px, 0.0)
            out["head_fit_px"] = fit.astype(np.float32)
            out["m_head_fit_px"] = finite_or_none(np.median(fit[valid]) if valid.any() else np.nan)
        return out


def _scatter(part: HeadClip, idx: np.ndarray, T: int) -> HeadClip:
    """A HeadClip for all T frames from one computed on frames ``idx`` (the rest invalid)."""
    def full(a):
        if a is None:
            return None
        out = np.zeros((T, *a.shape[1:]), a.dtype)
        out[idx] = a
        return out
    return HeadClip(valid=full(part.valid), rotation=full(part.rotation), center=full(part.center),
                    px_per_m=full(part.px_per_m), face_box=full(part.face_box), landmarks=full(part.landmarks),
                    blendshapes=full(part.blendshapes), fit_px=full(part.fit_px))
