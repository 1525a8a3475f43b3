"""``annotators=full`` (body + hands part) end to end on sample media, with a synthetic SMPL-X model file of the real
structure. Substitution, documented: where mmpose is not installed (the default install) the fit's keypoints are the
body backend's own (MediaPipe Pose, 26 SMPL-X joints: ``annotators.body.params.keypoints=null``) instead of the
133-point RTMW model (``full_stack_overrides``); the head/refs part runs insightface's router on tiny stand-in models.
"""
from __future__ import annotations

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from preprocess import demo_media, schema
from preprocess.annotators.smplx_model import write_synthetic_model
from preprocess.validate import validate
from tests.preprocess.helpers import failures, make_video, run_cli

from .conftest import full_stack_overrides

HAS_MMPOSE = importlib.util.find_spec("mmpose") is not None


def test_full_annotators_fit_smplx_and_record_why_a_fit_failed(tmp_path, full_stack_files):
    model = write_synthetic_model(tmp_path / "SMPLX_NEUTRAL.npz")
    media = tmp_path / "in"
    make_video(media / "person.mp4", "astronaut", n=20, size=256)
    blank = np.full((20, 256, 256, 3), 90, np.uint8)  # nobody in it: nothing to fit
    blank[:, 100:150, 60:200] = 200
    demo_media.write_video(media / "nobody.mp4", blank, 25.0)
    out = tmp_path / "out"
    args = [f"input={media}", f"output={out}", "annotators=full", "plan.min_frames=8", "plan.max_frames=16",
            "ray.progress_bars=false", *full_stack_overrides({**full_stack_files, "smplx": str(model)}),
            "video_stages.refs.enabled=false"]
    r = run_cli(args, timeout=600)
    assert r.returncode in (0, 3), r.stderr[-3000:]
    assert validate(str(out), log=lambda *a: None) == []
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["schema_version"] == schema.SCHEMA_VERSION
    members = {}
    for t in (out / "shards").glob("*.tar"):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                members[m.name.split(".", 1)[1]] = tf.extractfile(m).read()
    for f in ("smplx_betas", "smplx_body_pose", "smplx_hand_pose", "smplx_joints3d", "smplx_fit_px", "smplx_valid"):
        assert f"{f}.npy" in members, f
    valid = schema.decode(schema.field("smplx_valid"), members["smplx_valid.npy"])
    assert valid.mean() > 0.5
    filled = schema.decode(schema.field("body_filled"), members["body_filled.npy"])
    assert filled.all()  # every skeleton joint comes from the fitted body
    meta = json.loads(members["meta.json"])
    assert meta["smplx_valid_frac"] > 0.5 and meta["smplx_fit_px_body"] is not None
    fail = failures(out)
    row = fail[fail["source"].str.endswith("nobody.mp4")].iloc[0]
    assert row["error_class"] == "FitError" and "no frame to fit" in row["error_message"], row.to_dict()


@pytest.mark.skipif(not HAS_MMPOSE, reason="mmpose is not installed (a production extra: mmcv builds from source, "
                    "docs/annotators.md); the 133-point model cannot be built")
def test_mmpose_wholebody_random_weights_on_a_real_frame():
    """mmpose's own RTMPose-wholebody model class from its config, random weights, through our backend."""
    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody
    from tests.preprocess.annotators.conftest import opencv_image

    spec = importlib.util.find_spec("mmpose")
    root = Path(next(iter(spec.submodule_search_locations)))
    cfgs = sorted(root.rglob("rtmpose-m_8xb64-270e_coco-wholebody-256x192.py"))
    if not cfgs:
        pytest.skip("mmpose's packaged configs (.mim) are not installed")
    be = MMPoseWholeBody({"config": str(cfgs[0]), "checkpoint": None, "device": "cpu", "batch_size": 2})
    be.setup()
    img = opencv_image("messi5.jpg")
    frames = np.stack([img, img, img])
    boxes = np.array([[0, 0, img.shape[1], img.shape[0]]] * 3, np.float32)
    res = be.estimate(frames, boxes, np.array([True, False, True]))
    assert res.joints2d.shape == (3, 127, 2) and res.conf.shape == (3, 127)
    assert (res.conf[1] == 0).all() and (res.conf[0] > 0).sum() > 100  # 114 of 133 points map onto SMPL-X joints
    np.testing.assert_allclose(res.joints2d[0], res.joints2d[2], atol=1e-3)


def test_wholebody_map_is_one_to_one_and_sided():
    """The 133 -> 127 map (runs without mmpose): 114 distinct targets, left points on left joints, hands complete."""
    from preprocess.annotators.backends.mmpose_wholebody import _wholebody_to_smplx, wholebody_to_smplx
    from preprocess.annotators.smplx_model import smplx_joint_names

    pairs = _wholebody_to_smplx()
    names = smplx_joint_names()
    assert len(pairs) == 114 and len({s for _, s in pairs}) == 114 and len({w for w, _ in pairs}) == 114
    assert names[dict(pairs)[9]] == "left_wrist" and 91 not in dict(pairs)  # the body's wrist, not the hand's
    assert names[dict(pairs)[95]] == "left_thumb" and names[dict(pairs)[132]] == "right_pinky"
    kp = np.random.default_rng(0).random((2, 133, 2))
    j2, conf = wholebody_to_smplx(kp, np.ones((2, 133)))
    assert (conf.sum(1) == 114).all() and np.allclose(j2[:, dict(pairs)[0]], kp[:, 0])
