"""The insightface backends driven end to end through insightface's own model router (FaceAnalysis /
model_zoo.get_model) by tiny ONNX models with the real signatures (face_models.py), and ``annotators=full``."""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

from preprocess import demo_media, schema  # noqa: E402
from preprocess.annotators.assets import ModelFileError  # noqa: E402
from preprocess.annotators.backends.insightface_head import InsightFaceHead  # noqa: E402
from preprocess.annotators.backends.insightface_identity import ArcFaceIdentity  # noqa: E402
from preprocess.annotators.geometry import intrinsics  # noqa: E402
from preprocess.config import Resources, StageSpec  # noqa: E402
from preprocess.stage import load_stage  # noqa: E402

from .conftest import clip_row  # noqa: E402

FULL = demo_media.Path(__file__).resolve().parents[3] / "conf" / "annotators" / "full.yaml"


@pytest.fixture(scope="module")
def files(full_stack_files):
    return full_stack_files


def test_router_sees_the_real_signatures(files):
    from insightface.app import FaceAnalysis

    fa = FaceAnalysis(name=files["pack"], providers=["CPUExecutionProvider"])
    assert sorted(fa.models) == ["detection", "landmark_2d_106", "landmark_3d_68", "recognition"]
    assert type(fa.models["detection"]).__name__ == "SCRFD" and fa.models["detection"].use_kps
    assert fa.models["landmark_2d_106"].lmk_num == 106 and fa.models["landmark_3d_68"].lmk_num == 68
    assert tuple(fa.models["recognition"].input_size) == (112, 112) and fa.models["recognition"].output_shape[-1] == 512


def test_missing_model_directory_names_itself(tmp_path, files):
    missing = tmp_path / "nowhere" / "buffalo_l"
    with pytest.raises(ModelFileError, match=f"{missing}.*buffalo_l.zip.*model_dir"):
        InsightFaceHead({"model_dir": str(missing), "faceverse_path": files["faceverse"]}).setup()
    with pytest.raises(ModelFileError, match="no insightface model directory configured"):
        ArcFaceIdentity({}).setup()
    with pytest.raises(ModelFileError, match="faceverse_simple_v2.npy.*faceverse_path"):
        InsightFaceHead({"model_dir": files["pack"],
                         "faceverse_path": str(tmp_path / "faceverse_simple_v2.npy")}).setup()


def test_head_backend_output_layout(files):
    be = InsightFaceHead({"model_dir": files["pack"], "faceverse_path": files["faceverse"], "det_size": 160})
    be.setup()
    T, S = 5, 256
    frames = np.random.default_rng(0).integers(0, 255, (T, S, S, 3), dtype=np.uint8)
    rois = np.tile(np.array([60.0, 50.0, 200.0, 190.0]), (T, 1))
    K = np.tile(intrinsics(S, S, 1.0), (T, 1, 1))
    head = be.estimate(frames, rois, np.arange(T) * 40.0, True, camera_K=K)
    assert head.valid.all()
    assert head.rotation.shape == (T, 3, 3) and head.center.shape == (T, 2) and head.fit_px.shape == (T,)
    assert head.landmarks is None and head.blendshapes is None
    np.testing.assert_allclose(np.einsum("tij,tkj->tik", head.rotation, head.rotation), np.tile(np.eye(3), (T, 1, 1)),
                               atol=1e-9)
    # the tiny detector finds a face of 40% of the ROI crop in its middle: the face box is inside the ROI
    box = head.face_box[0]
    assert 60 < box[0] < box[2] < 200 and 50 < box[1] < box[3] < 190
    assert np.all(head.fit_px < 3.0) and np.all(head.px_per_m > 0)
    assert np.all(np.abs(head.center - [130, 120]).max(1) < 40)
    # no body ROI: the whole frame is searched (the tiny detector's face is then 40% of the frame, in its middle)
    whole = be.estimate(frames[:3], np.full((3, 4), np.nan), np.arange(3) * 40.0, True, camera_K=K[:3])
    assert whole.valid.all() and np.all(np.abs(whole.center - S / 2).max(1) < 40)
    assert np.all(whole.px_per_m > head.px_per_m[:3])  # a bigger face: nearer


def test_arcface_identity_dims_and_similarity(files):
    ident = ArcFaceIdentity({"model_dir": files["pack"], "det_size": 160})
    assert ident.dim == 512  # known before setup: dataset.json records it
    ident.setup()
    img = demo_media.load_photo("grace_hopper")
    other = demo_media.load_photo("astronaut")
    box = np.array([160.0, 120.0, 390.0, 350.0])
    a, b = ident.embed(img, box), ident.embed(img, box + 3)
    c = ident.embed(other, np.array([150.0, 50.0, 290.0, 190.0]))
    assert a.shape == (512,) and a.dtype == np.float32 and np.linalg.norm(a) == pytest.approx(1, abs=1e-5)
    assert float(a @ b) > 0.9 > float(a @ c)
    assert ident.embed(img, np.array([0.0, 0.0, 4.0, 4.0])) is None
    with pytest.raises(ValueError, match="dim"):
        ArcFaceIdentity({"model_dir": files["pack"], "dim": 128}).setup()


def _spec(section, name, **params):
    d = OmegaConf.to_container(OmegaConf.load(FULL)[section][name], resolve=True)
    resources = Resources(**d["resources"]) if d.get("resources") else None
    return StageSpec(target=d["target"], enabled=d["enabled"], resources=resources, params={**d["params"], **params})


def test_full_config_head_stage_writes_fit_columns(files):
    st = _head_stage(files)
    T = 6
    out = st.process(_head_row(T, 192, 1))
    assert out["head_valid"].all() and out["head_fit_px"].shape == (T,) and out["m_head_fit_px"] < 3.0
    assert "face_landmarks" not in out and out["face_box"].shape == (T, 4)
    assert np.abs(out["head_ypr"]).max() < 20  # the tiny landmark models show a frontal face


def _head_stage(files):
    spec = _spec("annotators", "head")
    backend = dict(spec.params["backend"])
    backend["params"] = {**backend["params"], "model_dir": files["pack"], "faceverse_path": files["faceverse"],
                         "det_size": 160}
    st = load_stage("head", StageSpec(spec.target, spec.enabled, spec.resources, {**spec.params, "backend": backend}))
    st.setup()
    return st


def _head_row(T, S, seed):
    row = clip_row(np.random.default_rng(seed).integers(0, 255, (T, S, S, 3), dtype=np.uint8))
    row.update(camera_K=np.tile(intrinsics(S, S, 1.0), (T, 1, 1)).astype(np.float32),
               body_joints2d=np.zeros((T, 36, 2), np.float32), body_joints3d=np.zeros((T, 36, 3), np.float32),
               body_conf=np.zeros((T, 36), np.float32), subject_valid=np.zeros(T, np.uint8))
    return row


def test_head_stage_fits_the_clips_of_a_batch_together(files):
    """process_batch: every clip's faces and landmarks, then one 3DMM fit of all of them (fit_clips), then each
    clip's fields: the same as one clip at a time, and a clip that breaks fails alone with its reason."""
    from preprocess.stage import FAILED, OK

    st = _head_stage(files)
    rows = [_head_row(T, S, seed) for T, S, seed in ((6, 192, 1), (9, 224, 2), (4, 160, 3))]
    alone = [st.process(dict(r)) for r in rows]
    broken = _head_row(5, 192, 4)
    broken["camera_K"] = broken["camera_K"][:, :2]  # a camera that cannot be one
    out = st.process_batch([dict(r) for r in rows] + [broken])
    assert [r["status"] for r in out] == [OK, OK, OK, FAILED] and out[-1]["error_stage"] == "head"
    for r, a in zip(out, alone):
        assert r["head_valid"].all() and r["timings"]["head"] > 0
        np.testing.assert_allclose(r["head_ypr"], a["head_ypr"], atol=0.5)
        np.testing.assert_allclose(r["head_fit_px"], a["head_fit_px"], rtol=0.05, atol=0.02)
        np.testing.assert_allclose(r["head_center"], a["head_center"], atol=1.0)


def test_annotators_full_on_sample_media_writes_valid_shards(full_stack_run):
    """``annotators=full`` (the whole stack: SMPL-X fit, these head/refs backends, all with stand-in model files) on
    built-in sample videos and a person in motion (conftest.full_stack_run): valid shards, 512-D identities recorded
    in dataset.json, fit errors in the index; the only failure is the video of nobody (test_full_body.py)."""
    import json

    import pandas as pd

    from preprocess.validate import validate
    from tests.preprocess.helpers import failures

    out, proc = full_stack_run
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(failures(out)["source"].map(lambda s: s.rsplit("/", 1)[-1])) == {"nobody.mp4"}
    assert validate(str(out), log=lambda *a: None) == []
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["schema_version"] == schema.SCHEMA_VERSION and ds["dims"] == {"identity_dim": 512}
    idx = pd.read_parquet(out / "index.parquet")
    samples = idx[idx["source"].str.contains("astronaut_")]
    assert len(samples) >= 2 and samples["source"].nunique() == 2
    assert len(idx) >= 2 and "m_head_fit_px" in idx and idx["m_identity_valid"].any()
