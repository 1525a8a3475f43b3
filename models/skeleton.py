"""Joint hierarchy, drawn limbs and colours of the control-signal skeleton: the one place these live.

Body joints are named as in SMPL-X (``smplx.joint_names.JOINT_NAMES``). Arrays may hold any subset of
them in any order: :func:`body_layout` resolves a list of joint names (e.g. the shard schema's
``BODY_JOINT_NAMES``) into column indices. Hands use the 21-joint MediaPipe/OpenPose order
(wrist, then 4 joints per finger from thumb to pinky).

Hierarchy (used by bone-length adjustment, paper 3.2): the root is the pelvis; the 22 kinematic body
joints follow the SMPL-X kinematic tree; the vertex-based extras hang off the nearest body joint
(face points off ``head``, toes off ``*_foot``, heels off ``*_ankle``). Each hand's root is its wrist,
which is anchored at the body's wrist.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from smplx.joint_names import JOINT_NAMES as SMPLX_JOINT_NAMES

# Parent of each SMPL-X joint the skeleton knows (None = root).
SMPLX_PARENT: dict[str, str | None] = {
    "pelvis": None,
    "left_hip": "pelvis", "right_hip": "pelvis", "spine1": "pelvis",
    "left_knee": "left_hip", "right_knee": "right_hip", "spine2": "spine1",
    "left_ankle": "left_knee", "right_ankle": "right_knee", "spine3": "spine2",
    "left_foot": "left_ankle", "right_foot": "right_ankle", "neck": "spine3",
    "left_collar": "spine3", "right_collar": "spine3", "head": "neck",
    "left_shoulder": "left_collar", "right_shoulder": "right_collar",
    "left_elbow": "left_shoulder", "right_elbow": "right_shoulder",
    "left_wrist": "left_elbow", "right_wrist": "right_elbow",
    "jaw": "head", "left_eye_smplhf": "head", "right_eye_smplhf": "head",
    "nose": "head", "right_eye": "head", "left_eye": "head", "right_ear": "head", "left_ear": "head",
    "left_big_toe": "left_foot", "left_small_toe": "left_foot", "left_heel": "left_ankle",
    "right_big_toe": "right_foot", "right_small_toe": "right_foot", "right_heel": "right_ankle",
}

# Limbs drawn in the skeleton map (paper 3.2: "select the body joints ... connect them with lines").
# Face points are left out on purpose: head pose is carried by the head sphere.
BODY_LIMBS: tuple[tuple[str, str], ...] = (
    ("pelvis", "spine1"), ("spine1", "spine2"), ("spine2", "spine3"), ("spine3", "neck"), ("neck", "head"),
    ("spine3", "left_collar"), ("left_collar", "left_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("spine3", "right_collar"), ("right_collar", "right_shoulder"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
    ("pelvis", "left_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
    ("left_ankle", "left_foot"), ("left_ankle", "left_heel"), ("left_foot", "left_big_toe"),
    ("pelvis", "right_hip"), ("right_hip", "right_knee"), ("right_knee", "right_ankle"),
    ("right_ankle", "right_foot"), ("right_ankle", "right_heel"), ("right_foot", "right_big_toe"),
)

# When a limb's start joint is missing (a backend that cannot fill it), the limb is drawn from the next
# joint up its chain instead: the drawn parent, or this joint for the collars, so that with no spine
# or collar joints the shoulders still hang off the neck and the neck off the pelvis.
BRIDGE_PARENT: dict[str, str] = {"left_collar": "neck", "right_collar": "neck"}

HAND_FINGERS = ("thumb", "index", "middle", "ring", "pinky")
N_HAND_JOINTS = 1 + 4 * len(HAND_FINGERS)
# MediaPipe order: joint 1 + 4f + k is segment k of finger f; its parent is the previous one or the wrist.
HAND_PARENTS = np.array([-1] + [0 if k == 0 else 1 + 4 * f + k - 1 for f in range(5) for k in range(4)])
HAND_LIMBS: tuple[tuple[int, int], ...] = tuple((int(HAND_PARENTS[j]), j) for j in range(1, N_HAND_JOINTS))
# Body wrist that anchors each hand; hand index 0 is the subject's left hand (shard schema).
HAND_WRISTS = ("left_wrist", "right_wrist")


def _palette(n: int, value: float = 1.0) -> np.ndarray:
    """``n`` evenly spaced saturated hues as uint8 RGB."""
    rgb = [colorsys.hsv_to_rgb(i / n, 1.0, value) for i in range(n)]
    return np.round(np.array(rgb) * 255).astype(np.uint8).reshape(n, 3)


LIMB_COLORS = _palette(len(BODY_LIMBS))
# Per finger one hue, darker towards the tip so finger direction is visible.
HAND_LIMB_COLORS = np.stack([
    np.round(np.array(colorsys.hsv_to_rgb(f / 5, 1.0, 1.0 - 0.15 * k)) * 255)
    for f in range(5) for k in range(4)
]).astype(np.uint8)


@dataclass(frozen=True)
class BodyLayout:
    """Column indices of the skeleton for one ordering of body joints."""

    names: tuple[str, ...]
    parents: np.ndarray  # (J,) column of each joint's nearest present ancestor, -1 for roots
    limbs: np.ndarray  # (L, 2) columns of the drawn limbs present in this layout
    limb_colors: np.ndarray  # (L, 3) uint8
    joint_colors: np.ndarray  # (J, 3) uint8
    drawn_joints: np.ndarray  # (K,) columns of joints that belong to a drawn limb
    wrists: tuple[int, int]  # columns of the left / right wrist (-1 if absent)
    fallback: np.ndarray  # (J,) column to draw from when this joint is missing (-1: none), see BRIDGE_PARENT

    def column(self, name: str) -> int:
        """Column of a joint by SMPL-X name."""
        return self.names.index(name)


@lru_cache(maxsize=16)
def body_layout(joint_names: tuple[str, ...] | None = None) -> BodyLayout:
    """Resolve joint names (default: all SMPL-X joints in SMPL-X order) into a :class:`BodyLayout`."""
    names = tuple(SMPLX_JOINT_NAMES) if joint_names is None else tuple(joint_names)
    unknown = [n for n in names if n not in SMPLX_JOINT_NAMES]
    if unknown:
        raise KeyError(f"not SMPL-X joint names: {unknown}")
    col = {n: i for i, n in enumerate(names)}
    parents = np.full(len(names), -1, dtype=np.int64)
    for i, n in enumerate(names):
        p = SMPLX_PARENT.get(n)
        while p is not None and p not in col:
            p = SMPLX_PARENT[p]
        parents[i] = -1 if p is None else col[p]
    keep = [k for k, (a, b) in enumerate(BODY_LIMBS) if a in col and b in col]
    limbs = np.array([[col[BODY_LIMBS[k][0]], col[BODY_LIMBS[k][1]]] for k in keep], dtype=np.int64).reshape(-1, 2)
    joint_colors = np.zeros((len(names), 3), dtype=np.uint8)
    for k, (_a, b) in zip(keep, limbs):
        joint_colors[b] = LIMB_COLORS[k]  # a joint takes the colour of the limb that ends in it
    drawn = np.unique(limbs.reshape(-1))
    for j in drawn:
        if not joint_colors[j].any():
            joint_colors[j] = 255  # limb roots (pelvis): white
    wrists = tuple(col.get(w, -1) for w in HAND_WRISTS)
    fallback = np.full(len(names), -1, dtype=np.int64)
    for a, b in limbs:
        fallback[b] = a  # each joint ends at most one drawn limb
    for name, bridge in BRIDGE_PARENT.items():
        if name in col and bridge in col:
            fallback[col[name]] = col[bridge]
    return BodyLayout(names, parents, limbs, LIMB_COLORS[keep].reshape(-1, 3), joint_colors, drawn, wrists,
                      fallback)


def bridged_limbs(layout: BodyLayout, valid: np.ndarray) -> np.ndarray:
    """(L, 2) limbs to draw for one frame: a limb whose start joint is missing starts at the nearest
    present joint up its chain (``fallback``); a limb whose end is missing, or with no present start,
    is dropped (its row is (-1, -1)). Row k keeps limb k's colour."""
    out = np.full_like(layout.limbs, -1)
    for k, (a, b) in enumerate(layout.limbs):
        if not valid[b]:
            continue
        seen = 0
        while a >= 0 and not valid[a] and seen < len(valid):
            a, seen = layout.fallback[a], seen + 1
        if a >= 0 and valid[a]:
            out[k] = (a, b)
    return out


def topological_order(parents: np.ndarray) -> np.ndarray:
    """Joint indices ordered so that every parent comes before its children."""
    parents = np.asarray(parents)
    depth = np.zeros(len(parents), dtype=np.int64)
    for j in range(len(parents)):
        p, d = parents[j], 0
        while p >= 0:
            p, d = parents[p], d + 1
            if d > len(parents):
                raise ValueError("joint hierarchy has a cycle")
        depth[j] = d
    return np.argsort(depth, kind="stable")
