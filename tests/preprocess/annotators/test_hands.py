"""Hands stage on a real full-body photo (opencv-doc's messi5.jpg): sides, mirror, camera placement."""
import numpy as np
import pytest

from preprocess.annotators.geometry import project
from preprocess.demo_media import Motion
from preprocess.schema import BODY_JOINT_NAMES, N_HAND

from .conftest import annotate, needs_opencv_doc, opencv_image, render

pytestmark = needs_opencv_doc
WRIST = [BODY_JOINT_NAMES.index("left_wrist"), BODY_JOINT_NAMES.index("right_wrist")]


@pytest.fixture(scope="module")
def stages(clip_stages):
    return [s for s in clip_stages if s.name in ("body", "hands")]


@pytest.fixture(scope="module")
def messi(stages):
    img = opencv_image("messi5.jpg")
    return (img, annotate(stages, np.repeat(img[None], 3, axis=0)),
            annotate(stages, np.repeat(img[None, :, ::-1], 3, axis=0)))


def test_both_hands_found_on_their_own_side(messi):
    img, row, _ = messi
    assert row["hand_conf"].min() == 1.0 and row["m_hands_valid_frac"] == 1.0
    j2 = row["hand_joints2d"].astype(np.float64)
    # each hand's wrist sits at the body's wrist of the same side, and its fingers spread out from it
    for s in range(2):
        d = np.linalg.norm(j2[:, s, 0] - row["body_joints2d"][:, WRIST[s]], axis=-1)
        assert d.max() < 12.0
        assert np.ptp(j2[:, s, :, 0], axis=1).min() > 10
    # messi faces the camera: his left hand is on image right
    assert (j2[:, 0, 0, 0] > j2[:, 1, 0, 0]).all()


def test_mirrored_image_swaps_and_mirrors_the_hands(messi):
    img, row, flipped = messi
    W = img.shape[1]
    ok = flipped["hand_conf"][:, :, 0].min() == 1.0
    assert ok
    a = row["hand_joints2d"][:, ::-1].astype(np.float64)  # left <-> right
    b = flipped["hand_joints2d"].astype(np.float64)
    b[..., 0] = W - b[..., 0]  # mirror back (pixel centres: x' = W - x for continuous coordinates)
    assert np.median(np.linalg.norm(a - b, axis=-1)) < 3.0


def test_hand_joints_are_in_the_camera_frame(messi):
    _, row, _ = messi
    for t in range(3):
        K = row["camera_K"][t].astype(np.float64)
        for s in range(2):
            P = row["hand_joints3d"][t, s].astype(np.float64)
            assert np.abs(project(P, K) - row["hand_joints2d"][t, s]).max() < 0.5
            # anchored at the body's wrist depth, with a hand-sized extent
            assert P[0, 2] == pytest.approx(row["body_joints3d"][t, WRIST[s], 2], abs=0.02)
            assert 0.05 < np.linalg.norm(P[12] - P[0]) < 0.3  # wrist to middle fingertip, metres


def test_no_hands_without_a_subject(stages):
    frames, _ = render("grace_hopper", Motion(), 3)  # portrait: wrists out of the frame
    row = annotate(stages, frames)
    assert row["hand_joints2d"].shape == (3, 2, N_HAND, 2)
    assert not row["hand_conf"].any() and not row["hand_joints3d"].any()
    blank = annotate(stages, np.full((2, 96, 96, 3), 40, np.uint8))
    assert not blank["hand_conf"].any()
