"""Pseudo-references (paper 3.3): from one reference image, views the driving video will need.

First pass: the model animates the reference with controls that turn its own skeleton and head sphere about
the vertical axis (yaw from ``-max_yaw_deg`` to ``+max_yaw_deg``); the head annotator measures the yaw of the
generated frames; the frames of maximum, minimum and median yaw join the reference as extra references for
the real animation (second pass).
"""
from __future__ import annotations

import numpy as np

from models import render
from preprocess.schema import BODY_JOINT_NAMES

from .annotate import Annotations

HEAD_JOINT = BODY_JOINT_NAMES.index("head")


def rot_y(deg: float) -> np.ndarray:
    """Rotation about the camera's vertical (y) axis."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def turning_annotations(ref: Annotations, n_frames: int, max_yaw_deg: float) -> Annotations:
    """``n_frames`` copies of the reference's first-frame annotations with the body, hands and head turned
    about a vertical axis through the body's centre, from ``-max_yaw_deg`` to ``+max_yaw_deg``."""
    a = {k: np.repeat(v[:1], n_frames, axis=0) for k, v in ref.arrays.items()}
    j3 = ref["body_joints3d"][0].astype(np.float64)
    ok = ref["body_conf"][0] > 0
    pivot = j3[ok].mean(0) if ok.any() else j3.mean(0)
    yaws = np.linspace(-max_yaw_deg, max_yaw_deg, n_frames)
    rots = np.stack([rot_y(y) for y in yaws])
    a["body_joints3d"] = np.einsum("tij,kj->tki", rots, j3 - pivot) + pivot
    if "hand_joints3d" in ref:
        h3 = ref["hand_joints3d"][0].astype(np.float64)
        a["hand_joints3d"] = np.einsum("tij,skj->tski", rots, h3 - pivot) + pivot
    if "head_rotation" in ref:
        a["head_rotation"] = rots @ ref["head_rotation"][0].astype(np.float64)
        K = ref["camera_K"][0]
        before, _ = render.project(j3[None, HEAD_JOINT:HEAD_JOINT + 1], K[None])
        after, _ = render.project(a["body_joints3d"][:, HEAD_JOINT:HEAD_JOINT + 1], np.repeat(K[None], n_frames, 0))
        shift = np.where(np.isfinite(after - before), after - before, 0.0)[:, 0]
        a["head_center"] = ref["head_center"][0] + shift
    return Annotations(a)


def pick_by_yaw(yaw: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """Frames of maximum, minimum and median yaw among the valid ones: {role: frame}. The median is the frame
    whose yaw is nearest the median of the valid yaws (the earliest on a tie)."""
    idx = np.flatnonzero(np.asarray(valid, bool) & np.isfinite(yaw))
    if not len(idx):
        raise ValueError("no generated frame has a measured head pose")
    y = np.asarray(yaw, np.float64)[idx]
    med = idx[int(np.argmin(np.abs(y - np.median(y))))]
    return {"yaw_max": int(idx[int(np.argmax(y))]), "yaw_min": int(idx[int(np.argmin(y))]), "yaw_median": int(med)}
