"""Yaw-sorted references, identity consistency and the person check of the per-video stage (paper 3.3)."""
import cv2
import numpy as np
import pytest

from preprocess.annotators.refs import NoPersonError, SubjectLostError
from preprocess.demo_media import Motion
from preprocess.stage import FAILED, OK

from .conftest import annotate, megamind, needs_opencv_doc, opencv_image, render, to_writer_row


@pytest.fixture(scope="module")
def stages(clip_stages):
    return clip_stages


def _video(stages, clips, vk):
    """Writer-side rows of one video made of the given frame arrays (consecutive source frames)."""
    rows, start = [], 0
    for i, frames in enumerate(clips):
        rows.append(to_writer_row(annotate(stages, frames, video_key=vk, clip_index=i, start=start)))
        start += len(frames)
    return rows


def _frame_of(rows, source_index):
    """The decoded frame of the video at a source frame index, and the row/t it belongs to."""
    from preprocess.video import decode_mp4
    for r in rows:
        hit = np.flatnonzero(r["frame_index"] == source_index)
        if len(hit):
            return decode_mp4(r["video"])[hit[0]], r, int(hit[0])
    raise KeyError(source_index)


def _jpeg(b):
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


_FACES: dict = {}
_EMB: dict = {}


def _embed(refs_stage, row, t):
    """The identity embedding of frame t's face crop, computed here from the stored crop (cached)."""
    from preprocess.video import decode_mp4
    if row["key"] not in _FACES:
        _FACES[row["key"]] = decode_mp4(row["face"])
    if (row["key"], t) not in _EMB:
        crop = _FACES[row["key"]][t]
        inner = crop.shape[0] / (1 + 2 * row["m_face_margin"])
        _EMB[(row["key"], t)] = refs_stage.identity.embed(crop, np.array([-inner, -inner, inner, inner]) / 2
                                                          + crop.shape[0] / 2)
    return _EMB[(row["key"], t)]


def _check_role_picks(refs_stage, rows, row, pool_rows):
    """Each reference is the pool's frame at max / min / median yaw, skipping only frames whose face
    is less similar than the threshold to the clip's identity; stored as that very frame."""
    thr = refs_stage.params.min_similarity
    pool = [(float(r["head_ypr"][t, 0]), r, int(t)) for r in pool_rows for t in np.flatnonzero(r["head_valid"])]
    yaws = np.array([y for y, _, _ in pool])
    keys = {"yaw_max": -yaws, "yaw_min": yaws, "yaw_median": np.abs(yaws - np.median(yaws))}
    for role, key in keys.items():
        frame, src, t = _frame_of(rows, row[f"m_ref_{role}_frame"])
        assert any(src is r for r in pool_rows)
        assert src["head_ypr"][t, 0] == pytest.approx(row[f"m_ref_{role}_yaw"], abs=1e-4)
        sim = float(_embed(refs_stage, src, t) @ row["identity"])
        assert sim >= thr and sim == pytest.approx(row[f"m_ref_{role}_sim"], abs=1e-4)
        for k in np.argsort(key, kind="stable"):  # every frame ranked before it was another face
            y, r, tt = pool[k]
            if r is src and tt == t:
                break
            assert float(_embed(refs_stage, r, tt) @ row["identity"]) < thr
        img = _jpeg(row[f"ref_{role}"])
        assert img.shape == frame.shape and np.abs(img.astype(int) - frame).mean() < 3.0


def test_references_are_the_yaw_extremes_of_the_same_person(stages, refs_stage):
    clips = [render("camera", Motion(), 5)[0],  # looks towards image right: yaw ~ +55
             render("camera", Motion(flip=True, shift=(10.0, 0.0)), 5)[0],  # mirrored: yaw ~ -55
             render("astronaut", Motion(), 5)[0],  # another person, frontal
             np.full((5, 384, 384, 3), 40, np.uint8)]  # nobody
    rows = _video(stages, clips, "00000000000000c1")
    refs_stage.process_video(rows)
    cam, flipped, astro, blank = rows
    assert blank["status"] == FAILED and blank["error_class"] == "NoPersonError"
    assert [r["status"] for r in (cam, flipped, astro)] == [OK, OK, OK]
    # identity: the mirrored cameraman is the same person, the astronaut is not
    thr = refs_stage.params.min_similarity
    assert float(cam["identity"] @ flipped["identity"]) >= thr > float(cam["identity"] @ astro["identity"])
    assert cam["m_identity_valid"] and np.linalg.norm(cam["identity"]) == pytest.approx(1.0, abs=1e-4)
    for row in (cam, flipped):
        _check_role_picks(refs_stage, rows, row, [cam, flipped])  # the astronaut's frames are never references
        assert row["m_ref_yaw_max_yaw"] > 40 and row["m_ref_yaw_min_yaw"] < -40
        assert "ref_half_body" not in row  # upper-body clips get no half-body reference
    _check_role_picks(refs_stage, rows, astro, [astro])


def test_person_check(stages, refs_stage):
    lost = render("grace_hopper", Motion(), 6)[0]
    lost[2:] = 40  # person in 2 of 6 frames
    rows = _video(stages, [render("grace_hopper", Motion(), 4)[0], lost], "00000000000000c2")
    refs_stage.process_video(rows)
    assert rows[0]["status"] == OK and rows[1]["error_class"] == "SubjectLostError"
    assert rows[1]["m_person_frac"] == pytest.approx(2 / 6)
    with pytest.raises(NoPersonError):
        refs_stage.process_video(_video(stages, [np.full((4, 96, 96, 3), 40, np.uint8)] * 2, "00000000000000c3"))
    with pytest.raises(SubjectLostError):
        refs_stage.process_video(_video(stages, [lost], "00000000000000c4"))


@needs_opencv_doc
def test_turning_head_in_a_real_clip(stages, refs_stage):
    frames = megamind(30, 80)  # one shot: she turns her head (yaw ~ +10 .. +30)
    rows = _video(stages, [frames[:25], frames[25:]], "00000000000000c5")
    refs_stage.process_video(rows)
    for row in rows:
        assert row["status"] == OK
        _check_role_picks(refs_stage, rows, row, rows)
    yaws = np.concatenate([r["head_ypr"][:, 0] for r in rows])
    assert np.ptp(yaws) > 10  # the head really turns


@needs_opencv_doc
def test_full_body_clip_gets_a_half_body_portrait(stages, refs_stage):
    img = opencv_image("messi5.jpg")
    rows = _video(stages, [np.repeat(img[None], 4, axis=0)], "00000000000000c6")
    assert rows[0]["m_shot_scale"] == "full_body"
    refs_stage.process_video(rows)
    row = rows[0]
    half = _jpeg(row["ref_half_body"])
    assert half.shape[1] / half.shape[0] == pytest.approx(0.75, abs=0.02)
    t = int(np.flatnonzero(row["frame_index"] == row["m_ref_half_body_frame"])[0])
    x0, y0, x1, y1 = refs_stage.half_body_box(row, t)
    j = row["body_joints2d"][t]
    names = __import__("preprocess.schema", fromlist=["BODY_JOINT_NAMES"]).BODY_JOINT_NAMES
    for n in ("nose", "neck", "left_hip", "right_hip"):
        x, y = j[names.index(n)]
        assert x0 <= x <= x1 and y0 <= y <= y1, n
    ankle_y = j[names.index("left_ankle"), 1]
    assert ankle_y > y1  # a half-body portrait: the feet are cut off
