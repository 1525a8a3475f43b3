"""Camera placement, head-angle conventions, crops, smoothing and main-subject tracking (no models)."""
import numpy as np
import pytest

from preprocess.annotators import geometry as g
from preprocess.annotators.tracking import distinct_people, main_subject

RNG = np.random.default_rng(0)


def _rz_image_ccw(theta_deg):
    """Camera-frame rotation of an in-plane image rotation by theta, counter-clockwise on screen (y down)."""
    t = np.radians(theta_deg)
    return np.array([[np.cos(t), np.sin(t), 0], [-np.sin(t), np.cos(t), 0], [0, 0, 1]])


@pytest.mark.parametrize("ypr", [(30, 10, -5), (-70, -20, 15), (5, 40, 80), (0, 0, 0)])
def test_ypr_round_trip(ypr):
    R = g.rotation_from_ypr(*ypr)
    assert np.allclose(R @ R.T, np.eye(3)) and np.isclose(np.linalg.det(R), 1)
    assert np.allclose(g.ypr_from_rotation(R), ypr, atol=1e-9)


def test_angle_signs_follow_the_documented_convention():
    def fwd(R):  # the face points along -z of the head frame (OpenCV camera: x right, y down)
        return -R[:, 2]

    assert fwd(g.rotation_from_ypr(30, 0, 0))[0] > 0.4  # yaw > 0: face towards image right
    assert fwd(g.rotation_from_ypr(0, 30, 0))[1] < -0.4  # pitch > 0: chin up (towards image top)
    ear = g.rotation_from_ypr(0, 0, 30)[:, 0]  # roll > 0: head's x axis turns counter-clockwise on screen
    assert ear[0] > 0 and ear[1] < 0
    assert np.allclose(g.rotation_from_ypr(0, 0, 0), np.eye(3))  # facing the camera = identity


@pytest.mark.parametrize("theta", [-40, 12, 75])
def test_in_plane_rotation_changes_only_roll(theta):
    for _ in range(5):
        ypr = RNG.uniform([-60, -30, -30], [60, 30, 30])
        got = g.ypr_from_rotation(_rz_image_ccw(theta) @ g.rotation_from_ypr(*ypr))
        assert np.allclose(got, ypr + [0, 0, theta], atol=1e-6)


def test_mirror_negates_yaw_and_roll_keeps_pitch():
    M = np.diag([-1.0, 1.0, 1.0])  # horizontal flip of the image, applied to camera and head frames
    for _ in range(5):
        ypr = RNG.uniform([-60, -30, -30], [60, 30, 30])
        assert np.allclose(g.ypr_from_rotation(M @ g.rotation_from_ypr(*ypr) @ M), ypr * [-1, 1, -1], atol=1e-6)


def test_place_on_image_recovers_a_known_placement_and_projects_exactly():
    K = g.intrinsics(640, 480, 1.0)
    X = RNG.normal(0, 0.3, (25, 3))  # a metric, hip-centred body
    t = np.array([0.2, -0.1, 3.0])
    uv = g.project(X + t, K)
    assert np.allclose(g.solve_translation(X, uv, K, np.ones(25)), t, atol=1e-6)
    noisy = uv + RNG.normal(0, 3, uv.shape)
    P, fit = g.place_on_image(X, noisy, K, np.ones(25))
    assert np.abs(g.project(P, K) - noisy).max() < 1e-6  # on the rays of the detections
    assert 1 < fit < 8 and np.abs(P[:, 2] - (X + t)[:, 2]).max() < 0.1  # depth kept from the placement
    # with the depth fixed (hands anchored at the body's wrist), x/y are solved
    t2 = g.solve_translation(X, uv, K, np.ones(25), tz=3.0)
    assert np.allclose(t2, t, atol=1e-6)


def test_crop_round_trip_and_smoothing():
    A = g.crop_affine((100.0, 50.0), 80.0, 224)
    p = np.array([[60.0, 10.0], [140.0, 90.0], [100.0, 50.0]])
    crop_px = p @ A[:, :2].T + A[:, 2]
    assert np.allclose(crop_px, [[0, 0], [224, 224], [112, 112]])
    assert np.allclose(g.uncrop_points(crop_px, A), p)
    # linear motion stays linear away from the ends; jitter shrinks; invalid frames are untouched
    t = np.arange(40, dtype=float)
    x = np.stack([2 * t, -t], 1) + RNG.normal(0, 2, (40, 2))
    valid = np.ones(40, bool)
    valid[20] = False
    s = g.smooth_series(x, valid, 1.5)
    assert s[20].tolist() == x[20].tolist()
    inner = np.r_[5:18, 23:35]
    truth = np.stack([2 * t, -t], 1)[inner]
    assert np.abs(s[inner] - truth).mean() < 0.7 * np.abs(x[inner] - truth).mean()
    assert g.smooth_series(x[:3], np.ones(3, bool), 2.0).shape == (3, 2)  # shorter than the kernel


def test_main_subject_is_largest_central_and_kept_by_overlap():
    W, H = 640, 480
    big = np.array([200.0, 100, 440, 470])
    small = np.array([10.0, 10, 80, 120])
    boxes = []
    for t in range(20):
        b = big + [3 * t, 0, 3 * t, 0]
        s = small + [0, 2 * t, 0, 2 * t]
        frame = [s, b] if t % 2 else [b, s]  # detection order changes from frame to frame
        if t in (7, 8):  # the subject is missed for two frames
            frame = [s]
        boxes.append(np.array(frame))
    idx = main_subject(boxes, W, H)
    for t in range(20):
        if t in (7, 8):
            assert idx[t] == -1
        else:
            assert np.allclose(boxes[t][idx[t]], big + [3 * t, 0, 3 * t, 0])
    assert (main_subject([np.zeros((0, 4))] * 3, W, H) == -1).all()


def _box(joints):
    return np.r_[joints.min(0) - 2, joints.max(0) + 2]


def test_a_person_detected_twice_is_one_person():
    j, c = 20 + RNG.uniform(0, 50, (12, 2)), np.ones(12)  # a person's joints (~50 px), all sure
    b = _box(j)
    dup = j + RNG.normal(0, 1.5, j.shape)  # the same joints, a few px apart ...
    dup[:3] += [25, 10]  # ... but for a few (an arm placed elsewhere), which widen its box
    other = j + [0.3 * 50, 0]  # another person in the same pose, 30% of a body size away
    joints, conf = np.stack([j, dup, other]), np.stack([c, c * 0.9, c])
    boxes = np.stack([b, _box(dup), _box(other)])
    assert distinct_people(joints, conf, boxes).tolist() == [0, 2]
    conf[0] = 0.6  # the surer copy is the one kept
    assert distinct_people(joints, conf, boxes).tolist() == [1, 2]
    conf[0, :10] = 0.2  # too few joints both see: kept apart
    assert distinct_people(joints, conf, boxes).tolist() == [0, 1, 2]
    assert distinct_people(np.zeros((0, 12, 2)), np.zeros((0, 12)), np.zeros((0, 4))).tolist() == []


# MediaPipe Pose on the test dataset's 96 px camera clip, frame 26: one person detected twice. Pelvis,
# hips, neck, head, shoulders, elbows, wrists, eyes, nose, ears: x, y, confidence per detection.
_TWICE = np.array([
    [[8.7, 61.6, .80], [13.1, 60.5, .98], [4.2, 62.8, .80], [21.9, 32.5, .82], [34.3, 27.7, .91], [30.2, 32.1, .99],
     [13.5, 33.0, .82], [38.7, 50.2, .52], [22.8, 56.6, .55], [45.4, 39.3, .49], [39.8, 42.2, .83], [40.3, 29.5, .97],
     [38.6, 29.5, .92], [39.5, 32.7, .95], [32.7, 27.6, .91], [36.0, 27.8, .99]],
    [[2.0, 59.4, .66], [10.4, 61.2, .90], [-6.5, 57.6, .66], [24.6, 32.0, .87], [34.0, 28.2, .88], [35.7, 33.7, .99],
     [13.5, 30.4, .87], [50.1, 43.6, .79], [15.5, 51.8, .67], [70.5, 38.3, .55], [40.5, 42.2, .79], [39.9, 30.7, .91],
     [36.3, 30.3, .87], [37.8, 33.2, .89], [30.1, 27.3, .88], [37.8, 29.0, .95]]])


def test_a_duplicate_detection_does_not_split_the_subject():
    """Boxes of that clip's subject: the duplicate at frame 9 starts a second track that then takes
    frames 10 and 13-16 from the subject, unless it is merged first."""
    W = H = 96
    one = [[0, 13, 86, 77], [0, 20, 56, 70], [0, 17, 76, 69], [0, 21, 59, 68], [0, 19, 60, 96], [0, 22, 56, 67],
           [0, 20, 55, 88], [0, 22, 46, 66], [0, 22, 46, 68], [0, 22, 46, 68], [0, 18, 64, 66], [0, 20, 53, 63],
           [0, 21, 52, 63], [0, 18, 65, 71], [0, 18, 58, 73], [0, 17, 71, 72], [0, 14, 80, 73]]
    boxes = [np.array([b], float) for b in one]
    boxes[9] = np.array([one[9], [0, 16, 82, 73]], float)
    assert (main_subject(boxes, W, H) < 0).sum() == 5  # what the duplicate did
    keep = distinct_people(_TWICE[..., :2], _TWICE[..., 2], boxes[9])
    assert keep.tolist() == [0]  # the surer detection
    boxes[9] = boxes[9][keep]
    assert (main_subject(boxes, W, H) == 0).all()
