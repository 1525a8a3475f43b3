"""``annotators=full`` (body + hands part) end to end on sample media, with a synthetic SMPL-X model file of the real
structure. Substitution, documented: the fit's keypoints are the body backend's own (MediaPipe Pose, 26 SMPL-X joints:
``annotators.body.params.keypoints=null``) instead of the 133-point RTMW model (``full_stack_overrides``); the
head/refs part runs insightface's router on tiny stand-in models. Where mmpose is installed (a production extra:
scripts/install_mmpose.sh) the RTMW-x model of full.yaml's config runs too, with random weights: through our backend
against mmpose's own ``inference_topdown``, and through the whole stack.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from preprocess import demo_media, schema
from preprocess.annotators.smplx_model import write_synthetic_model
from preprocess.validate import validate
from tests.preprocess.helpers import failures, make_video, run_cli

from .conftest import full_stack_overrides

HAS_MMPOSE = importlib.util.find_spec("mmpose") is not None


def test_full_annotators_fit_smplx_and_record_why_a_fit_failed(full_stack_run):
    """The session's ``annotators=full`` run (conftest.full_stack_run): the person's clips carry the SMPL-X fit, the
    video of nobody fails with the fit's reason."""
    out, r = full_stack_run
    assert r.returncode in (0, 3), r.stderr[-3000:]
    assert validate(str(out), log=lambda *a: None) == []
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["schema_version"] == schema.SCHEMA_VERSION
    index = pd.read_parquet(out / "index.parquet")
    person = set(index.loc[index["source"].str.endswith("person.mp4"), "key"])
    assert person
    members = {}
    for t in (out / "shards").glob("*.tar"):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                if key in person:
                    members[member] = tf.extractfile(m).read()
    for f in ("smplx_betas", "smplx_body_pose", "smplx_hand_pose", "smplx_joints3d", "smplx_fit_px", "smplx_valid"):
        assert f"{f}.npy" in members, f
    valid = schema.decode(schema.field("smplx_valid"), members["smplx_valid.npy"])
    assert valid.mean() > 0.5
    filled = schema.decode(schema.field("body_filled"), members["body_filled.npy"])
    assert filled.all()  # every skeleton joint comes from the fitted body
    meta = json.loads(members["meta.json"])
    assert meta["smplx_valid_frac"] > 0.5 and meta["smplx_fit_px_body"] is not None
    assert meta["smplx_fit_px_face"] is None  # MediaPipe Pose's joints (the substitution) have no face points
    fail = failures(out)
    row = fail[fail["source"].str.endswith("nobody.mp4")].iloc[0]
    assert row["error_class"] == "FitError" and "no frame to fit" in row["error_message"], row.to_dict()


needs_mmpose = pytest.mark.skipif(not HAS_MMPOSE, reason="mmpose is not installed (a production extra: mmcv builds "
                                  "from source, scripts/install_mmpose.sh); the 133-point model cannot be built")


@needs_mmpose
def test_mmpose_wholebody_random_weights_on_a_real_frame(tmp_path):
    """mmpose's own RTMW-x model class, built from full.yaml's config with random weights, saved as a checkpoint and
    loaded by our backend, on a real frame: the same points as mmpose's ``inference_topdown`` one box at a time, inside
    the crop the model saw, independent of the batch a box lands in."""
    import torch
    from mmpose.apis import inference_topdown, init_model
    from omegaconf import OmegaConf

    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody, resolve_config, wholebody_to_smplx
    from tests.preprocess.annotators.conftest import opencv_image

    full = OmegaConf.load(Path(__file__).resolve().parents[3] / "conf" / "annotators" / "full.yaml")
    config = OmegaConf.to_container(full.annotators.body.params.keypoints.params, resolve=True)["config"]
    assert config.startswith("mmpose::") and "rtmw-x" in config
    torch.manual_seed(0)
    ref = init_model(str(resolve_config(config)), None, device="cpu")  # random weights: no checkpoint, no init_cfg
    ckpt = tmp_path / "rtmw_random.pth"
    torch.save(ref.state_dict(), ckpt)
    be = MMPoseWholeBody({"config": config, "checkpoint": str(ckpt), "device": "cpu", "batch_size": 2})
    be.setup()
    assert type(be.model).__name__ == "TopdownPoseEstimator" and type(be.model.head).__name__ == "RTMWHead"

    img = opencv_image("messi5.jpg")
    H, W = img.shape[:2]
    frames = np.stack([img] * 4)
    boxes = np.array([[0, 0, W, H], [0, 0, W, H], [0.25 * W, 0.1 * H, 0.6 * W, 0.95 * H], [0, 0, W, H]], np.float32)
    res = be.estimate(frames, boxes, np.array([True, False, True, True]))
    assert res.joints2d.shape == (4, 127, 2) and res.conf.shape == (4, 127)
    assert (res.conf[1] == 0).all() and (res.joints2d[1] == 0).all()
    for t in (0, 2):
        r = inference_topdown(ref, np.ascontiguousarray(img[..., ::-1]), boxes[t: t + 1])[0].pred_instances
        kp, score = r.keypoints[0], r.keypoint_scores[0]
        assert kp.shape == (133, 2)
        j2, conf = wholebody_to_smplx(kp, score)
        np.testing.assert_allclose(res.joints2d[t], j2, atol=1e-3)
        np.testing.assert_allclose(res.conf[t], conf, atol=1e-5)
        # GetBBoxCenterScale pads the box by 1.25, TopdownAffine widens it to the input's aspect (w/h = 288/384)
        w, h = 1.25 * (boxes[t, 2] - boxes[t, 0]), 1.25 * (boxes[t, 3] - boxes[t, 1])
        w, h = max(w, h * 0.75), max(h, w / 0.75)
        c = (boxes[t, :2] + boxes[t, 2:]) / 2
        assert (np.abs(kp - c) <= np.array([w, h]) * (0.5 + 1 / 288)).all()  # within one input pixel
    np.testing.assert_allclose(res.joints2d[0], res.joints2d[3], atol=1e-3)  # batches [0, 2] and [3]


@needs_mmpose
def test_wholebody_map_agrees_with_mmpose_metainfo():
    """The map against mmpose's own COCO-WholeBody metainfo: the same 133 names in order, and its left/right swaps
    land on SMPL-X joints whose names swap left and right (an independent check of every side and face index)."""
    from mmpose.datasets.datasets.utils import parse_pose_metainfo

    from preprocess.annotators.backends.mmpose_wholebody import _wholebody_to_smplx, coco_wholebody_names
    from preprocess.annotators.smplx_model import smplx_joint_names

    meta = parse_pose_metainfo(dict(from_file="configs/_base_/datasets/coco_wholebody.py"))
    assert [meta["keypoint_id2name"][k] for k in range(meta["num_keypoints"])] == coco_wholebody_names()
    names, pairs = smplx_joint_names(), dict(_wholebody_to_smplx())

    def swap(n: str) -> str:
        return n.replace("left", "@").replace("right", "left").replace("@", "right")

    for w, s in pairs.items():
        assert names[pairs[meta["flip_indices"][w]]] == swap(names[s]), (w, names[s])


def test_mmpose_backend_names_a_missing_config_or_checkpoint(tmp_path):
    """Runs with or without mmpose: a missing file raises ModelFileError naming it and how to provide it."""
    from preprocess.annotators.assets import ModelFileError
    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody

    with pytest.raises(ModelFileError, match=r"mmpose::no/such\.py is missing.*install_mmpose\.sh"):
        MMPoseWholeBody({"config": "mmpose::no/such.py", "checkpoint": None}).setup()
    cfg = tmp_path / "cfg.py"
    cfg.write_text("")
    with pytest.raises(ModelFileError, match=r"checkpoint .*w\.pth is missing"):
        MMPoseWholeBody({"config": str(cfg), "checkpoint": str(tmp_path / "w.pth")}).setup()


def test_mmpose_backend_names_a_bad_precision():
    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody
    from preprocess.config import ConfigError

    with pytest.raises(ConfigError, match=r"keypoints\.params\.precision='bf16': tf32 or fp32"):
        MMPoseWholeBody({"config": "mmpose::no/such.py", "precision": "bf16"}).setup()


@needs_mmpose
def test_mmpose_backend_refuses_a_layout_it_cannot_map():
    """A 17-keypoint COCO body model of mmpose builds, and the backend refuses it (its map is COCO-WholeBody's)."""
    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody

    be = MMPoseWholeBody({"config": "mmpose::body_2d_keypoint/rtmpose/coco/rtmpose-t_8xb256-420e_coco-256x192.py",
                          "checkpoint": None, "device": "cpu"})
    with pytest.raises(ValueError, match="a 17-keypoint model"):
        be.setup()


@needs_mmpose
def test_body_stage_with_mmpose_survives_the_gpu_delegate_check():
    """The body stage of full.yaml with ``delegate=auto`` set up in a fresh process: MediaPipe's GPU-delegate check
    (Mesa's LLVM here) and mmpose (torch's triton and its LLVM) load in the order that does not crash."""
    script = """
from omegaconf import OmegaConf
from preprocess.annotators.body import BodyStage
full = OmegaConf.load("conf/annotators/full.yaml")
params = OmegaConf.to_container(full.annotators.body.params, resolve=True)
params["backend"]["params"]["delegate"] = "auto"
params["keypoints"]["params"].update(checkpoint=None, device="cpu")
params["fit"] = None
stage = BodyStage(params)
stage.setup()
print("set up:", type(stage.keypoints.model.head).__name__)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[3])
    assert r.returncode == 0 and "set up: RTMWHead" in r.stdout, (r.returncode, r.stderr[-3000:])


@needs_mmpose
def test_full_annotators_with_the_rtmw_model(tmp_path, full_stack_files):
    """``annotators=full`` with its 133-point keypoints from full.yaml's RTMW-x model (random weights, so the fit's
    errors mean nothing and ``max_body_px`` is lifted): the whole stack runs, the shards validate, and the fit has
    keypoints in every group, the face's 51 landmarks included, which the substitution (MediaPipe Pose) has not."""
    import pandas as pd

    media = tmp_path / "in"
    make_video(media / "person.mp4", "astronaut", n=10, size=256)  # short: RTMW-x takes ~3.5 s a frame on a busy CPU
    out = tmp_path / "out"
    args = [f"input={media}", f"output={out}", "annotators=full", "probe.min_seconds=0.3", "plan.min_frames=5",
            "plan.max_frames=10", "ray.progress_bars=false", "video_stages.refs.enabled=false",
            *full_stack_overrides(full_stack_files, fit_iters=30, max_body_px=100.0, rtmw_random=True)]
    r = run_cli(args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert validate(str(out), log=lambda *a: None) == []
    idx = pd.read_parquet(out / "index.parquet")
    assert len(idx) == 1 and idx["m_smplx_valid_frac"].iloc[0] > 0.5, idx.T
    for group in ("body", "feet", "left_hand", "right_hand", "face"):
        assert np.isfinite(idx[f"m_smplx_fit_px_{group}"].astype(float)).all(), group


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


def test_body_stage_fits_a_batch_of_clips_in_one_fit(tmp_path):
    """A batch of clips (two people in motion, one clip of nobody) through the body stage with a SMPL-X fit: one
    ``fit_many`` for the batch; each fitted clip gets its fields as when processed alone (same keys, fits as close),
    the clip of nobody fails alone with its reason, and every clip's time includes its share of the fit."""
    from preprocess.annotators.smplx_fit import SMPLXFitter
    from preprocess.stage import OK, load_stage

    from .conftest import clip_row, render, stage_spec

    model = write_synthetic_model(tmp_path / "SMPLX_NEUTRAL.npz")
    spec = stage_spec("annotators", "body", keypoints=None,
                      fit={"model_path": str(model), "iters": 150, "max_body_px": 0.5, "device": "cpu"})
    st = load_stage("body", spec)
    st.setup()
    a, _ = render("astronaut", demo_media.Motion(shift=(30, 0)), 8, size=256)
    b, _ = render("grace_hopper", demo_media.Motion(scale=(1.0, 0.8)), 6, size=256)
    blank = np.full((6, 256, 256, 3), 90, np.uint8)
    calls = []
    fit_many = SMPLXFitter.fit_many
    st.fitter.fit_many = lambda clips: calls.append(len(clips)) or fit_many(st.fitter, clips)
    rows = st.process_batch([clip_row(a), clip_row(blank), clip_row(b)])
    assert calls == [3]  # one fit for the batch (the clip of nobody gets its FitError from it)
    assert [r["status"] for r in rows] == [OK, "failed", OK]
    assert rows[1]["error_stage"] == "body" and "no frame to fit" in rows[1]["error_message"]
    for r, frames in ((rows[0], a), (rows[2], b)):
        alone = st.process(clip_row(frames))
        assert set(alone) <= set(r), set(alone) - set(r)
        assert r["smplx_valid"].all() and r["m_smplx_fit_px_body"] < 8.0
        # as good as alone (4.2 vs 4.0 and 1.9 vs 2.2 px here; one L-BFGS over the sum of the clips: 16.9 vs 4.0)
        assert abs(r["m_smplx_fit_px_body"] - alone["m_smplx_fit_px_body"]) < 1.5
        assert r["timings"]["body"] >= r["m_smplx_fit_s"] > 0
