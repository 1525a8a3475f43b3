"""Skeleton maps from backends that fill only some SMPL-X joints: missing spine/collar joints are bridged
(shoulders hang off the neck, the neck off the pelvis), full skeletons are drawn as before."""
import numpy as np

from models.config import RenderConfig
from models.render import draw_skeleton
from models.skeleton import body_layout, bridged_limbs
from preprocess.schema import BODY_JOINT_NAMES


def _pose():
    layout = body_layout(BODY_JOINT_NAMES)
    pts = np.zeros((len(BODY_JOINT_NAMES), 2))
    place = {"pelvis": (50, 80), "spine1": (50, 70), "spine2": (50, 60), "spine3": (50, 50), "neck": (50, 40),
             "head": (50, 25), "left_collar": (58, 42), "right_collar": (42, 42), "left_shoulder": (65, 42),
             "right_shoulder": (35, 42), "left_elbow": (72, 55), "right_elbow": (28, 55)}
    for n, xy in place.items():
        pts[layout.column(n)] = xy
    valid = np.zeros(len(pts), bool)
    for n in place:
        valid[layout.column(n)] = True
    return layout, pts, valid


def test_full_skeleton_draws_the_real_limbs():
    layout, _, valid = _pose()
    drawn = {tuple(layout.names[i] for i in e) for e in bridged_limbs(layout, valid) if e[0] >= 0}
    assert ("spine3", "left_collar") in drawn and ("left_collar", "left_shoulder") in drawn
    assert ("spine3", "neck") in drawn and ("pelvis", "spine1") in drawn


def test_missing_spine_and_collars_are_bridged():
    layout, pts, valid = _pose()
    for n in ("spine1", "spine2", "spine3", "left_collar", "right_collar"):
        valid[layout.column(n)] = False
    drawn = {tuple(layout.names[i] for i in e) for e in bridged_limbs(layout, valid) if e[0] >= 0}
    assert ("neck", "left_shoulder") in drawn and ("neck", "right_shoulder") in drawn
    assert ("pelvis", "neck") in drawn and ("neck", "head") in drawn
    assert not any("spine" in a or "collar" in a or "spine" in b or "collar" in b for a, b in drawn)
    img = draw_skeleton(pts[None], valid[None], (100, 100), layout, RenderConfig(
        limb_width=0.02, joint_radius=0.0, hand_limb_width=0.01, hand_joint_radius=0.0, min_confidence=0.0,
        draw_hands=False))[0]
    assert img[60, 50].any() and img[41, 58].any()  # on pelvis-neck and on neck-left shoulder
    assert not img[90, 10].any()
