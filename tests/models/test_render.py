"""Control-signal renderers against hand-computed pixels, colours and lengths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.render import (
    bone_length_adjust,
    bone_lengths,
    crop_resize_transform,
    maps_to_tensor,
    project,
    render_control_maps,
    render_head_sphere_map,
    render_skeleton_map,
    retarget_head_radius,
    scale_offset_transform,
    transform_points,
)
from models.skeleton import (
    HAND_FINGERS,
    HAND_PARENTS,
    SMPLX_JOINT_NAMES,
    SMPLX_PARENT,
    body_layout,
)

K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])
FRONTAL = np.diag([1.0, -1.0, -1.0])  # head frame (x left-to-right, y up, z out of the face) facing the camera


def yaw(deg: float) -> np.ndarray:
    """Head->camera rotation of a head turned by ``deg`` about its vertical axis."""
    a = np.deg2rad(deg)
    r_y = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return FRONTAL @ r_y


def standing_skeleton(names=None):
    """A T-posed body 3 m in front of the camera, in SMPL-X joint order (camera frame, metres)."""
    names = list(SMPLX_JOINT_NAMES) if names is None else list(names)
    offsets = {  # child offset from its parent, metres (x right, y down)
        "left_hip": (0.1, 0.05, 0), "right_hip": (-0.1, 0.05, 0), "spine1": (0, -0.1, 0), "left_knee": (0, 0.4, 0),
        "right_knee": (0, 0.4, 0), "spine2": (0, -0.12, 0), "left_ankle": (0, 0.4, 0), "right_ankle": (0, 0.4, 0),
        "spine3": (0, -0.05, 0), "left_foot": (0, 0.05, -0.1), "right_foot": (0, 0.05, -0.1), "neck": (0, -0.2, 0),
        "left_collar": (0.05, -0.15, 0), "right_collar": (-0.05, -0.15, 0), "head": (0, -0.1, 0),
        "left_shoulder": (0.12, 0.0, 0), "right_shoulder": (-0.12, 0.0, 0), "left_elbow": (0.25, 0, 0),
        "right_elbow": (-0.25, 0, 0), "left_wrist": (0.25, 0, 0), "right_wrist": (-0.25, 0, 0),
    }
    pos = {"pelvis": np.array([0.0, 0.0, 3.0])}
    for n in names:
        chain, p = [], n
        while p is not None and p not in pos:
            chain.append(p)
            p = SMPLX_PARENT.get(p)
        for c in reversed(chain):
            par = SMPLX_PARENT.get(c)
            pos[c] = pos.get(par, pos["pelvis"]) + np.array(offsets.get(c, (0.02, 0.02, 0.0)))
    return np.stack([pos[n] if n in SMPLX_PARENT else np.zeros(3) for n in names])


def test_joint_lands_on_expected_pixel():
    from models.config import load_preset

    cfg = load_preset("wan1_3b").render
    names = ("pelvis", "left_hip", "left_knee")
    joints = np.array([[[0.0, 0.0, 2.0], [0.2, 0.04, 2.0], [0.2, 0.44, 2.0]]])  # left_hip -> u = 320 + 500*0.1
    conf = np.ones((1, 3))
    maps = render_skeleton_map(joints, conf, K, (480, 640), cfg, joint_names=names)
    layout = body_layout(names)
    hip = layout.column("left_hip")
    # Hand-computed: u = f X / Z + cx = 500 * 0.2 / 2 + 320 = 370, v = 500 * 0.04 / 2 + 240 = 250.
    assert tuple(maps[0, 250, 370]) == tuple(layout.joint_colors[hip])
    assert tuple(maps[0, 240, 320]) == (255, 255, 255)  # pelvis: a limb root, white
    assert not maps[0, :200].any() and not maps[0, :, :300].any()  # nothing above the hips or left of the pelvis
    # The same joint rendered into a half-resolution crop starting at (100, 50): transform on K, not on pixels.
    a = crop_resize_transform((100, 50, 740, 530), (240, 320))
    small = render_skeleton_map(joints, conf, torch.tensor(K), (240, 320), cfg, joint_names=names, transform=a)
    u, v = transform_points([370.0, 250.0], a)
    assert (u, v) == (134.75, 99.75)  # (370 + .5 - 100) / 2 - .5, (250 + .5 - 50) / 2 - .5
    assert tuple(small[0, 100, 135]) == tuple(layout.joint_colors[hip])


def test_projection_and_transform_conventions():
    uv, z = project(np.array([[[0.3, -0.6, 3.0]]]), K)
    np.testing.assert_allclose(uv[0, 0], [370.0, 140.0])
    assert z[0, 0] == 3.0
    a = scale_offset_transform(2.0, (5, -3))
    np.testing.assert_allclose(transform_points([[1.0, 2.0]], a), [[7.0, 1.0]])
    identity = crop_resize_transform((0, 0, 640, 480), (480, 640))
    np.testing.assert_allclose(identity, np.eye(3))
    # 2x downsampling: input pixels 0 and 1 average into output pixel 0, so their midpoint 0.5 maps to 0.
    np.testing.assert_allclose(transform_points([[0.5, 0.5]], crop_resize_transform((0, 0, 64, 64), (32, 32))),
                               [[0, 0]])


def test_invisible_joints_are_not_drawn():
    from models.config import load_preset

    cfg = load_preset("tiny").render
    names = ("pelvis", "left_hip")
    joints = np.array([[[0.0, 0.0, 2.0], [0.2, 0.0, 2.0]], [[0.0, 0.0, 2.0], [0.2, 0.0, -2.0]]])
    conf = np.array([[1.0, 0.0], [1.0, 1.0]])  # frame 0: hip not filled; frame 1: hip behind the camera
    maps = render_skeleton_map(joints, conf, K, (480, 640), cfg, joint_names=names)
    assert not maps[:, :, 340:].any()  # no limb to the hip in either frame
    assert maps[:, 240, 320].any()  # the pelvis is drawn


def test_schema_joint_names_resolve():
    schema = pytest.importorskip("preprocess.schema")
    layout = body_layout(tuple(schema.BODY_JOINT_NAMES))
    drawn = {(layout.names[a], layout.names[b]) for a, b in layout.limbs}
    assert ("left_shoulder", "left_elbow") in drawn and ("right_knee", "right_ankle") in drawn
    assert layout.parents[layout.column("left_big_toe")] == layout.column("left_foot")
    # Hands: MediaPipe order, 4 joints per finger from thumb to pinky, as the schema stores them.
    names = schema.HAND_JOINT_NAMES
    for j in range(1, len(names)):
        finger = HAND_FINGERS[(j - 1) // 4]
        assert names[j].startswith(finger)
        assert HAND_PARENTS[j] == (0 if (j - 1) % 4 == 0 else j - 1)


def test_sphere_colour_follows_yaw_and_mirrors():
    center = np.array([[100.0, 80.0]])
    frontal = render_head_sphere_map(center, yaw(0)[None], 30.0, (160, 200))
    assert tuple(frontal[0, 80, 100]) == (128, 128, 255)  # normal towards the camera = head +z: (0, 0, 1)
    left = render_head_sphere_map(center, yaw(30)[None], 30.0, (160, 200))[0, 80, 100].astype(int)
    right = render_head_sphere_map(center, yaw(-30)[None], 30.0, (160, 200))[0, 80, 100].astype(int)
    # Hand-computed: n_head = R_y(a)^T (0, 0, 1) = (-sin a, 0, cos a) -> RGB = 127.5 * (n + 1).
    assert tuple(left) == (64, 128, 238)  # round(127.5 * (1 - 0.5)), 128, round(127.5 * (1 + cos 30))
    assert left[0] + right[0] == 255 and left[1] == right[1] and left[2] == right[2]
    assert not np.array_equal(left, frontal[0, 80, 100])


def test_sphere_geometry_radius_and_transform():
    maps = render_head_sphere_map(np.array([[100.0, 80.0], [0.0, 0.0]]), np.stack([yaw(0)] * 2), [20.0, 20.0],
                                  (160, 200), valid=[1, 0])
    lit = maps[0].any(-1)
    assert lit[80, 120] and not lit[80, 121] and lit[60, 100] and not lit[59, 100]  # radius 20 exactly
    assert not maps[1].any()  # invalid frame: empty
    # Top of the sphere: camera normal (0, -1, 0) -> head frame (0, 1, 0) -> green.
    assert tuple(maps[0, 60, 100]) == (128, 255, 128)
    half = render_head_sphere_map(np.array([[100.0, 80.0]]), yaw(0)[None], 20.0, (80, 100),
                                  transform=crop_resize_transform((0, 0, 200, 160), (80, 100)))
    lit = half[0].any(-1)  # centre (49.75, 39.75), radius 10
    assert lit[39, 59] and not lit[39, 61] and lit[30, 49] and not lit[28, 49]


def test_retarget_head_radius_keeps_zoom():
    r = retarget_head_radius([10.0, 20.0, 30.0, 0.0], 40.0)
    np.testing.assert_allclose(r[:3], [20.0, 40.0, 60.0])


def test_bone_length_adjustment_exact_lengths_and_directions():
    names = tuple(SMPLX_JOINT_NAMES[:22])
    layout = body_layout(names)
    rng = np.random.default_rng(0)
    drive = standing_skeleton(names)[None] + rng.normal(0, 0.05, (4, 22, 3))  # 4 frames of a jittered pose
    ref = 1.3 * standing_skeleton(names)[None]  # a taller subject
    conf = np.ones((4, 22))
    out, _ = bone_length_adjust(drive, conf, ref, np.ones((1, 22)), joint_names=names)
    target = bone_lengths(ref, np.ones((1, 22), bool), layout.parents)
    for j, p in enumerate(layout.parents):
        if p < 0:
            np.testing.assert_allclose(out[:, j], drive[:, j])  # the pelvis stays
            continue
        new, old = out[:, j] - out[:, p], drive[:, j] - drive[:, p]
        np.testing.assert_allclose(np.linalg.norm(new, axis=-1), target[j], rtol=1e-12)
        cos = (new * old).sum(-1) / np.linalg.norm(new, axis=-1) / np.linalg.norm(old, axis=-1)
        np.testing.assert_allclose(cos, 1.0, rtol=1e-12)


def test_bone_length_adjustment_missing_joints_and_hands():
    names = tuple(SMPLX_JOINT_NAMES[:22])
    layout = body_layout(names)
    drive = standing_skeleton(names)[None]
    conf = np.ones((1, 22))
    elbow, wrist = layout.column("left_elbow"), layout.column("left_wrist")
    conf[0, elbow] = 0  # elbow not filled: the wrist follows its parent chain rigidly
    ref = 2.0 * drive
    hands = (drive[:, [wrist, layout.column("right_wrist")], None, :]
             + np.random.default_rng(1).normal(0, 0.03, (1, 2, 21, 3)))
    hands[:, :, 0] = drive[:, [wrist, layout.column("right_wrist")]]  # hand wrist = body wrist
    out, out_hands = bone_length_adjust(drive, conf, ref, np.ones((1, 22)), joint_names=names, drive_hands3d=hands,
                                        drive_hand_conf=np.ones((1, 2, 21)), ref_hands3d=hands,
                                        ref_hand_conf=np.ones((1, 2, 21)))
    shoulder = layout.column("left_shoulder")
    np.testing.assert_allclose(out[0, elbow] - drive[0, elbow], out[0, shoulder] - drive[0, shoulder])
    np.testing.assert_allclose(out[0, wrist] - drive[0, wrist], out[0, shoulder] - drive[0, shoulder])
    np.testing.assert_allclose(out_hands[0, 0, 0], out[0, wrist])  # the hand stays on the adjusted wrist
    # Hand bones kept (reference hand = driving hand), so the hand moved rigidly.
    np.testing.assert_allclose(out_hands[0, 0] - out_hands[0, 0, :1], hands[0, 0] - hands[0, 0, :1], atol=1e-12)


def test_control_maps_concatenate_and_convert(tiny_cfg):
    names = tuple(SMPLX_JOINT_NAMES[:22])
    joints = standing_skeleton(names)[None].repeat(5, 0)
    maps = render_control_maps((48, 64), tiny_cfg.render, joints3d=joints, joint_conf=np.ones((5, 22)),
                               K=np.repeat(K[None] / 10 * np.array([1, 1, 10])[:, None], 5, 0),
                               head_center=np.tile([32.0, 10.0], (5, 1)), head_rotation=np.stack([yaw(0)] * 5),
                               head_radius=np.full(5, 6.0), joint_names=names)
    assert maps.shape == (5, 48, 64, 6) and maps.dtype == np.uint8
    assert maps[..., :3].any() and tuple(maps[0, 10, 32, 3:]) == (128, 128, 255)
    t = maps_to_tensor(maps)
    assert t.shape == (6, 5, 48, 64) and t.dtype == torch.float32 and float(t.max()) <= 1.0


def test_hands_are_drawn_with_finger_colours():
    from models.config import load_preset
    from models.skeleton import HAND_LIMB_COLORS

    cfg = load_preset("wan1_3b").render
    hands = np.zeros((1, 2, 21, 3))
    hands[..., 2] = 2.0
    # Left hand: the index finger (joints 5..8) straight to the right of the wrist, 2 cm per joint.
    hands[0, 0, 5:9, 0] = 0.02 * np.arange(1, 5)
    conf = np.zeros((1, 2, 21))
    conf[0, 0, [0, 5, 6, 7, 8]] = 1.0
    body = np.zeros((1, 1, 3))
    maps = render_skeleton_map(body, np.zeros((1, 1)), K, (480, 640), cfg, joint_names=("pelvis",),
                               hands3d=hands, hand_conf=conf)
    # Index tip: u = 320 + 500 * 0.08 / 2 = 340, v = 240; its dot has the colour of the bone ending in it (limb 7).
    assert tuple(maps[0, 240, 340]) == tuple(HAND_LIMB_COLORS[7])
    assert tuple(maps[0, 240, 320]) == (255, 255, 255)  # the wrist
    assert not maps[0, :, 345:].any() and not maps[0, :230].any()  # nothing else: right hand not filled
