"""Hands backend: MediaPipe Hand Landmarker on a crop around each of the subject's wrists.

Hands are small in full-body frames; like MediaPipe Holistic, the landmarker runs on a square crop
around each wrist (the stage derives it from the body joints), one landmarker per side so VIDEO-mode
tracking follows one hand. MediaPipe's handedness label is not used: it assumes mirrored selfie
input and flips on ordinary video; the side is the side of the body wrist the crop was cut around.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...schema import N_HAND
from ..geometry import crop, crop_affine, uncrop_points
from . import HandsBackend, HandsClip
from .mediapipe_common import MediaPipeParams, VideoTask, landmarker_factory, mp_image, prefetch_enabled


class MediaPipeHands(HandsBackend):
    """``hand_landmarker.task`` (palm detector + 21 landmarks, image and metric world coordinates)."""

    @dataclass
    class Params(MediaPipeParams):
        crop_size: int = 256  # the wrist crop is resized to this before the landmarker

    def setup(self) -> None:
        factory = landmarker_factory("Hand", "hand_landmarker", self.params,
                                     "annotators.hands.params.backend.params.model_path", num_hands=1)
        prefetch = prefetch_enabled(self.params, factory, "annotators.hands.params.backend.params")
        self.tasks = [VideoTask(factory, self.params.video_mode, prefetch) for _ in range(2)]  # subject's left, right
        for task in self.tasks:
            task.start(True)

    def estimate(self, frames: np.ndarray, rois: np.ndarray, timestamps_ms: np.ndarray,
                 new_sequence: bool) -> HandsClip:
        T = len(frames)
        n = self.params.crop_size
        j2, j3 = np.zeros((T, 2, N_HAND, 2)), np.zeros((T, 2, N_HAND, 3))
        found, score = np.zeros((T, 2), bool), np.zeros((T, 2))
        for side, task in enumerate(self.tasks):
            task.start(new_sequence)
            for t in range(T):
                roi = rois[t, side]
                if not np.isfinite(roi).all():
                    continue
                A = crop_affine(((roi[0] + roi[2]) / 2, (roi[1] + roi[3]) / 2), roi[2] - roi[0], n)
                res = task.run(mp_image(crop(frames[t], A, n)), timestamps_ms[t])
                if not res.hand_landmarks:
                    continue
                uv = np.array([[p.x * n, p.y * n] for p in res.hand_landmarks[0]])
                j2[t, side] = uncrop_points(uv, A)
                j3[t, side] = [[p.x, p.y, p.z] for p in res.hand_world_landmarks[0]]
                found[t, side] = True
                score[t, side] = res.handedness[0][0].score if res.handedness else 1.0
        return HandsClip(joints2d=j2, joints3d=j3, found=found, score=score)

    def close(self) -> None:
        for task in getattr(self, "tasks", []):
            task.close()
