"""Body backend: MediaPipe Pose Landmarker (33 image + 33 metric world landmarks per person).

The 33 BlazePose landmarks map onto the SMPL-X body joints they honestly locate (``MP_TO_SMPLX``):
joints MediaPipe has no landmark for (spine1-3, collars, jaw, the feet's ball joints, small toes)
are left unfilled (confidence 0) rather than invented. The world landmarks are metric, hip-centred
and camera-aligned (x right, y down, z away from the camera), which is what :class:`BodyFrame` asks.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...schema import BODY_JOINT_NAMES, N_BODY
from . import BodyBackend, BodyFrame
from .mediapipe_common import MediaPipeParams, VideoTask, landmarker_factory, mp_image, prefetch_enabled

# SMPL-X joint -> BlazePose landmark(s) it is placed at (the mean when several).
MP_TO_SMPLX: dict[str, tuple[int, ...]] = {
    "pelvis": (23, 24),  # mid-hips
    "left_hip": (23,), "right_hip": (24,), "left_knee": (25,), "right_knee": (26,),
    "left_ankle": (27,), "right_ankle": (28,),
    "neck": (11, 12),  # mid-shoulders (the OpenPose neck)
    "head": (7, 8),  # mid-ears: the head-neck pivot sits between the ears
    "left_shoulder": (11,), "right_shoulder": (12,), "left_elbow": (13,), "right_elbow": (14,),
    "left_wrist": (15,), "right_wrist": (16,),
    "left_eye_smplhf": (2,), "right_eye_smplhf": (5,),  # eyeball centres
    "nose": (0,), "right_eye": (5,), "left_eye": (2,), "right_ear": (8,), "left_ear": (7,),
    "left_big_toe": (31,), "left_heel": (29,), "right_big_toe": (32,), "right_heel": (30,),
}


def _mapping_matrix() -> np.ndarray:
    """(N_BODY, 33) averaging matrix from BlazePose landmarks to the schema's SMPL-X body joints."""
    W = np.zeros((N_BODY, 33))
    for name, ids in MP_TO_SMPLX.items():
        W[BODY_JOINT_NAMES.index(name), list(ids)] = 1.0 / len(ids)
    return W


class MediaPipePose(BodyBackend):
    """``pose_landmarker_full.task`` through the Tasks API, in VIDEO (tracking) mode by default."""

    filled = tuple(n for n in BODY_JOINT_NAMES if n in MP_TO_SMPLX)

    @dataclass
    class Params(MediaPipeParams):
        num_poses: int = 2  # people detected per frame (person count saturates here)
        max_side: int = 0  # frames are downscaled so their long side is at most this (0: as decoded)

    def setup(self) -> None:
        p = self.params
        factory = landmarker_factory("Pose", "pose_landmarker_full", p,
                                     "annotators.body.params.backend.params.model_path", num_poses=p.num_poses)
        self.task = VideoTask(factory, p.video_mode,
                              prefetch_enabled(p, factory, "annotators.body.params.backend.params"))
        self.task.start(True)  # load now, not on the first clip
        self.W = _mapping_matrix()
        self.filled_mask = self.W.sum(1) > 0

    def estimate(self, frames: np.ndarray, timestamps_ms: np.ndarray, new_sequence: bool) -> list[BodyFrame]:
        self.task.start(new_sequence)
        T, H, W = frames.shape[:3]
        s = min(1.0, self.params.max_side / max(H, W)) if self.params.max_side else 1.0
        out = []
        for t in range(T):
            img = frames[t] if s == 1.0 else cv2.resize(frames[t], (round(W * s), round(H * s)),
                                                        interpolation=cv2.INTER_AREA)
            res = self.task.run(mp_image(img), timestamps_ms[t])
            out.append(self._convert(res, W, H))
        return out

    def _convert(self, res, W: int, H: int) -> BodyFrame:
        P = len(res.pose_landmarks)
        j2, j3, cf = np.zeros((P, N_BODY, 2)), np.zeros((P, N_BODY, 3)), np.zeros((P, N_BODY))
        for k in range(P):
            lm = res.pose_landmarks[k]
            img = np.array([[p.x * W, p.y * H] for p in lm])  # normalised -> pixels of the given frame
            world = np.array([[p.x, p.y, p.z] for p in res.pose_world_landmarks[k]])
            # a landmark's confidence: it is in the frame (presence) and not occluded (visibility)
            score = np.array([min(p.visibility or 0.0, p.presence or 0.0) for p in lm])
            j2[k], j3[k] = self.W @ img, self.W @ world
            # a joint averaged from several landmarks is as sure as its least sure landmark
            cf[k] = np.where(self.filled_mask, np.min(np.where(self.W > 0, score[None], np.inf), axis=1), 0.0)
        return BodyFrame(joints2d=j2, joints3d=j3, conf=cf)

    def close(self) -> None:
        if hasattr(self, "task"):
            self.task.close()
