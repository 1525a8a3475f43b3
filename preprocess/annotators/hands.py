"""Hands stage: 21 joints per hand of the main subject, 2D and in the camera frame (paper 3.2).

For each frame and side whose body wrist is visible, a square region around the hand (the wrist
pushed a little further along the forearm, ``roi_m`` metres wide at the wrist's depth) goes to the
hands backend. A hand is kept only when its wrist lands near the body's wrist (otherwise the crop
caught the other hand or someone else's); its metric joints are then placed in the camera frame at
the depth of the body's wrist and put on the rays of their 2D joints, like the body's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import BODY_JOINT_NAMES, N_HAND
from .backends import HandsBackend
from .common import BackendClipStage, frac, timestamps_ms
from .geometry import lift_to_rays, place_on_image, smooth_series, square_box

_WRIST = (BODY_JOINT_NAMES.index("left_wrist"), BODY_JOINT_NAMES.index("right_wrist"))
_ELBOW = (BODY_JOINT_NAMES.index("left_elbow"), BODY_JOINT_NAMES.index("right_elbow"))


class HandsStage(BackendClipStage):
    """Left and right hand joints of the main subject (``hands`` field group); index 0 = subject's left."""

    name = "hands"
    reads = ("frames", "timestamps", "frame_index", "video_key", "camera_K", "body_joints2d", "body_joints3d",
             "body_conf", "subject_valid")
    writes = ("hand_joints3d", "hand_joints2d", "hand_conf", "m_hands_valid_frac")

    backend_kind = HandsBackend

    @dataclass
    class Params:
        backend: dict[str, Any] = field(default_factory=dict)
        min_wrist_conf: float = 0.3  # look for a hand only where the body's wrist is at least this sure
        roi_m: float = 0.3  # side of the square searched around a hand, metres at the wrist's depth
        forearm_extend: float = 0.3  # ROI centre = wrist + this * (wrist - elbow), in 2D
        max_wrist_dist: float = 0.35  # keep a hand whose wrist is within this * ROI side of the body's wrist
        smooth_sigma: float = 1.0  # temporal Gaussian (frames) on 2D joints and depths; 0: off


    def rois(self, row: dict) -> np.ndarray:
        """(T, 2, 4) square search boxes around the subject's hands; NaN where there is no usable wrist."""
        j2, j3, conf, K = row["body_joints2d"], row["body_joints3d"], row["body_conf"], row["camera_K"]
        out = np.full((len(j2), 2, 4), np.nan)
        for t in np.flatnonzero(row["subject_valid"]):
            for side in range(2):
                w, e = _WRIST[side], _ELBOW[side]
                if conf[t, w] < self.params.min_wrist_conf or j3[t, w, 2] <= 0:
                    continue
                center = j2[t, w] + self.params.forearm_extend * (j2[t, w] - j2[t, e]) * (conf[t, e] > 0)
                side_px = max(self.params.roi_m * K[t, 0, 0] / j3[t, w, 2], float(np.linalg.norm(j2[t, w] - j2[t, e])))
                out[t, side] = square_box(center, side_px)
        return out

    def process(self, row: dict) -> dict:
        frames = row["frames"]
        T = len(frames)
        rois = self.rois(row)
        res = self.backend.estimate(frames, rois, timestamps_ms(row), self.continuity.new_sequence(row))
        body2d, body3d = row["body_joints2d"], row["body_joints3d"]
        side_px = rois[..., 2] - rois[..., 0]
        wrist_dist = np.stack([np.linalg.norm(res.joints2d[:, s, 0] - body2d[:, _WRIST[s]], axis=-1)
                               for s in range(2)], 1)
        ok = res.found & (wrist_dist <= self.params.max_wrist_dist * np.nan_to_num(side_px, nan=0.0))
        # both crops caught the same hand (hands together): it belongs to the side whose wrist is nearer
        apart = np.linalg.norm(res.joints2d[:, 0, 0] - res.joints2d[:, 1, 0], axis=-1)
        same = ok.all(1) & (apart < 0.1 * np.fmin(side_px[:, 0], side_px[:, 1]))
        for t in np.flatnonzero(same):
            ok[t, int(np.argmin(wrist_dist[t]))] = True
            ok[t, int(np.argmax(wrist_dist[t]))] = False

        uv = np.zeros((T, 2, N_HAND, 2))
        depth = np.zeros((T, 2, N_HAND))
        for t, s in zip(*np.nonzero(ok)):
            X = res.joints3d[t, s]
            tz = body3d[t, _WRIST[s], 2] - X[0, 2]  # the hand's wrist at the body wrist's depth
            p3, _ = place_on_image(X, res.joints2d[t, s], row["camera_K"][t], np.ones(N_HAND), tz=tz)
            uv[t, s], depth[t, s] = res.joints2d[t, s], p3[:, 2]
        j2 = np.zeros((T, 2, N_HAND, 2), np.float32)
        j3 = np.zeros((T, 2, N_HAND, 3), np.float32)
        for s in range(2):
            uv[:, s] = smooth_series(uv[:, s], ok[:, s], self.params.smooth_sigma)
            depth[:, s] = smooth_series(depth[:, s], ok[:, s], self.params.smooth_sigma)
            for t in np.flatnonzero(ok[:, s]):
                j2[t, s] = uv[t, s]
                j3[t, s] = lift_to_rays(depth[t, s], uv[t, s], row["camera_K"][t])
        # MediaPipe's Tasks API reports no per-joint or presence score: a kept hand's joints get 1
        conf = np.repeat(ok[..., None], N_HAND, axis=-1).astype(np.float32)
        return {"hand_joints3d": j3, "hand_joints2d": j2, "hand_conf": conf,
                "m_hands_valid_frac": frac(ok.any(1))}
