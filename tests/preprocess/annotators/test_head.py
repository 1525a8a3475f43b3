"""Head stage on shipped photos under known transforms: yaw under a flip, roll under an in-plane
rotation, head centre and sphere radius under shift and zoom, face crops (issue 3 acceptance)."""
import numpy as np
import pytest

from preprocess.annotators.geometry import project
from preprocess.demo_media import Motion
from preprocess.schema import FACE_CROP_SIZE
from preprocess.video import decode_mp4

from .conftest import annotate, render


@pytest.fixture(scope="module")
def stages(clip_stages):
    return [s for s in clip_stages if s.name in ("body", "head")]


def test_yaw_sign_convention_and_flip(stages):
    # the cameraman looks towards image right: yaw > 0 (face towards image right); mirrored: yaw < 0
    ru = annotate(stages, render("camera", Motion(), 4)[0])
    rf = annotate(stages, render("camera", Motion(flip=True), 4)[0])
    assert ru["head_valid"].all() and rf["head_valid"].all()
    yu, yf = ru["head_ypr"][:, 0], rf["head_ypr"][:, 0]
    assert (np.abs(yu) > 10).all() and (yu > 0).all() and (yf < 0).all()
    assert np.abs(yu + yf).max() <= 10.0  # the same turn, mirrored
    # pitch keeps its sign and value under a mirror, roll flips
    assert np.abs(ru["head_ypr"][:, 1] - rf["head_ypr"][:, 1]).max() <= 6.0
    assert np.abs(ru["head_ypr"][:, 2] + rf["head_ypr"][:, 2]).max() <= 6.0


def test_flip_reverses_yaw_of_every_head_turned_more_than_10_degrees(stages):
    for photo, m in (("astronaut", Motion()), ("grace_hopper", Motion(scale=(0.8, 0.8)))):
        ru = annotate(stages, render(photo, m, 3)[0])
        rf = annotate(stages, render(photo, Motion(scale=m.scale, flip=True), 3)[0])
        yu, yf = ru["head_ypr"][:, 0], rf["head_ypr"][:, 0]
        turned = np.abs(yu) > 10
        assert (np.sign(yu[turned]) == -np.sign(yf[turned])).all()
        assert np.abs(yu + yf).max() <= 10.0  # near-frontal faces: mirrored within 10°


def test_in_plane_rotation_changes_roll_by_theta(stages):
    frames, _ = render("grace_hopper", Motion(rotate=(0.0, 30.0)), 11)  # 3° per frame, counter-clockwise
    row = annotate(stages, frames)
    assert row["head_valid"].all()
    theta = np.linspace(0.0, 30.0, 11)
    ypr = row["head_ypr"].astype(np.float64)
    droll = ypr[:, 2] - ypr[0, 2]
    assert np.abs(droll - theta).max() <= 3.0, droll.round(1)
    assert np.abs(ypr[:, :2] - ypr[0, :2]).max() <= 5.0  # yaw and pitch stay


def test_head_centre_follows_a_shift_and_radius_follows_zoom(stages):
    frames, A = render("grace_hopper", Motion(shift=(30.0, 15.0), scale=(0.6, 0.6)), 11)
    row = annotate(stages, frames)
    assert row["head_valid"].all()
    resid = row["head_center"].astype(np.float64) - A[:, :, 2]
    assert np.linalg.norm(resid - np.median(resid, axis=0), axis=-1).max() <= 2.0
    # the head centre is inside the face box, the radius covers the face
    box = row["face_box"]
    c = row["head_center"]
    assert ((c[:, 0] > box[:, 0]) & (c[:, 0] < box[:, 2]) & (c[:, 1] > box[:, 1]) & (c[:, 1] < box[:, 3])).all()
    # the camera-frame translation projects onto the head centre; scale = radius / 0.1 m
    for t in range(len(frames)):
        projected = project(row["head_translation"][t].astype(np.float64), row["camera_K"][t].astype(np.float64))
        assert np.allclose(projected, c[t], atol=0.05)
    assert np.allclose(row["head_radius"], row["head_scale"] * 0.1, rtol=1e-5)

    zoom = annotate(stages, render("grace_hopper", Motion(scale=(0.5, 0.75)), 6)[0])
    r = zoom["head_radius"].astype(np.float64)
    assert zoom["head_valid"].all() and r[-1] / r[0] == pytest.approx(1.5, rel=0.1)


def test_face_crops_and_invalid_frames(stages):
    frames, _ = render("astronaut", Motion(scale=(0.8, 0.8)), 6)
    frames[3] = 40
    row = annotate(stages, frames)
    assert row["head_valid"].tolist() == [1, 1, 1, 0, 1, 1] and (row["face_valid"] == row["head_valid"]).all()
    crops = decode_mp4(row["face"])
    assert crops.shape == (6, FACE_CROP_SIZE, FACE_CROP_SIZE, 3)
    assert crops[3].max() < 20 and crops[0].std() > 20  # black where there is no face
    box = row["face_box"]
    assert np.allclose(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])  # square
    assert not box[3].any() and not row["head_rotation"][3].any() and not row["head_ypr"][3].any()
    # the crop is the tight landmark box grown by face_margin per side
    lm = row["face_landmarks"].astype(np.float64)
    tight = np.maximum(np.ptp(lm[0, :, 0]), np.ptp(lm[0, :, 1]))
    assert (box[0, 2] - box[0, 0]) == pytest.approx(tight * (1 + 2 * row["m_face_margin"]), rel=0.05)
    assert row["face_blendshapes"].shape == (6, 52) and row["face_blendshapes"][0].max() > 0.1
    R = row["head_rotation"][0].astype(np.float64)
    assert np.allclose(R @ R.T, np.eye(3), atol=1e-3)
