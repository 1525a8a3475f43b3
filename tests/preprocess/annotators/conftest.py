"""Annotator stages built from the shipped config (conf/annotators/embedded.yaml), once per session,
and a helper that runs a clip through them the way the pipeline does."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from preprocess import demo_media
from preprocess.config import Resources, StageSpec
from preprocess.stage import load_stage, new_row

if importlib.util.find_spec("triton") is not None:  # CUDA builds of torch (the mmpose venv), not the default install
    # Loaded before any test loads Mesa's LLVM (test_delegate.py's real GPU-delegate check): triton's own LLVM crashes
    # the process when it comes second, as the body stage's setup order also avoids (body.py).
    import triton  # noqa: F401

CONF = Path(__file__).resolve().parents[3] / "conf" / "annotators" / "embedded.yaml"
OPENCV_DATA = demo_media.MEGAMIND.parent
needs_opencv_doc = pytest.mark.skipif(not demo_media.MEGAMIND.exists(), reason="opencv-doc not installed")


def stage_spec(section: str, name: str, **params) -> StageSpec:
    """The StageSpec of ``section.name`` in the embedded config, with ``params`` overridden."""
    d = OmegaConf.to_container(OmegaConf.load(CONF)[section][name], resolve=True)
    resources = Resources(**d["resources"]) if d.get("resources") else None  # video stages have none
    return StageSpec(target=d["target"], enabled=d["enabled"], resources=resources, params={**d["params"], **params})


@pytest.fixture(scope="session")
def clip_stages():
    """body, hands, head stages from the embedded config, models loaded."""
    names = list(OmegaConf.load(CONF)["annotators"])
    stages = [load_stage(n, stage_spec("annotators", n)) for n in names]
    for st in stages:
        st.setup()
    return stages


@pytest.fixture(scope="session")
def refs_stage():
    st = load_stage("refs", stage_spec("video_stages", "refs"))
    st.setup()
    return st


_counter = iter(range(1_000_000))


def clip_row(frames: np.ndarray, video_key: str | None = None, clip_index: int = 0, start: int = 0,
             fps: float = 25.0) -> dict:
    """A decoded-clip row as the engine hands it to the clip stages."""
    T, H, W = frames.shape[:3]
    vk = video_key or f"{next(_counter):016x}"
    fi = np.arange(start, start + T)
    return new_row(key=f"{vk}_{clip_index:04d}", video_key=vk, frames=frames, fps=fps, frame_index=fi,
                   timestamps=fi / fps, width=W, height=H, clip_index=clip_index, shot_index=0, source="test")


def annotate(stages, frames: np.ndarray, **kw) -> dict:
    """Run a clip through the clip stages; every stage must succeed."""
    row = clip_row(frames, **kw)
    for st in stages:
        row.update(st.process(row))
    return row


def to_writer_row(row: dict) -> dict:
    """What a row looks like when it reaches the video stages: frames dropped, the clip as MP4."""
    from preprocess.video import encode_mp4  # PyAV: imported here, so the folder's GPU-only tests run without it

    row = dict(row)
    row["video"] = encode_mp4(row.pop("frames"), row["fps"], crf=16)
    return row


def render(photo: str, motion: demo_media.Motion, n: int, size: int = 384):
    """Frames and photo->frame affines of a shipped photo under a known motion."""
    return demo_media.render_motion(demo_media.load_photo(photo), (size, size), n, motion)


def opencv_image(name: str) -> np.ndarray:
    """An RGB image of opencv-doc's examples/data, cropped to even sides."""
    img = cv2.imread(str(OPENCV_DATA / name), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)[: h // 2 * 2, : w // 2 * 2])


def megamind(start: int, stop: int, width: int = 512) -> np.ndarray:
    """Frames [start, stop) of Megamind.avi, resized to ``width`` (even height)."""
    cap = cv2.VideoCapture(str(demo_media.MEGAMIND))
    out = []
    for k in range(stop):  # sequential reads: exact frame numbers
        ok, f = cap.read()
        if not ok:
            break
        if k < start:
            continue
        h = int(round(f.shape[0] * width / f.shape[1] / 2)) * 2
        out.append(cv2.cvtColor(cv2.resize(f, (width, h), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(out)


@pytest.fixture(scope="session")
def full_stack_files(tmp_path_factory) -> dict[str, str]:
    """Stand-ins for every model file ``annotators=full`` needs, of the real structures: a synthetic SMPL-X model, an
    insightface pack of tiny ONNX models with the real signatures, a synthetic FaceVerse-layout 3DMM."""
    pytest.importorskip("insightface")
    pytest.importorskip("onnxruntime")
    from preprocess.annotators.smplx_model import write_synthetic_model

    from .face_models import write_faceverse, write_model_pack

    d = tmp_path_factory.mktemp("full_stack_models")
    return {"smplx": str(write_synthetic_model(d / "SMPLX_NEUTRAL.npz")),
            "pack": str(write_model_pack(d / "buffalo_tiny")), "faceverse": str(write_faceverse(d / "fv.npy"))}


def full_stack_overrides(files: dict[str, str], det_size: int = 160, fit_iters: int = 80, max_body_px: float = 0.5,
                         rtmw_random: bool = False) -> list[str]:
    """Command-line overrides pointing ``annotators=full`` at :func:`full_stack_files`. Substitution, documented: the
    fit's keypoints are the body backend's own (MediaPipe Pose: ``annotators.body.params.keypoints=null``) instead of
    the 133-point RTMW model, whose weights are not shipped; ``rtmw_random``: the RTMW-x model of full.yaml's config
    (mmpose installed) with random weights instead."""
    head, refs, fit = ("annotators.head.params.backend.params", "video_stages.refs.params.identity.params",
                       "annotators.body.params.fit")
    out = [f"{fit}.model_path={files['smplx']}", f"{fit}.iters={fit_iters}", f"{fit}.max_body_px={max_body_px}",
           f"{head}.model_dir={files['pack']}", f"{head}.faceverse_path={files['faceverse']}",
           f"{head}.det_size={det_size}",
           f"{refs}.model_dir={files['pack']}", f"{refs}.det_size={det_size}"]
    kp = "annotators.body.params.keypoints"
    out += ([f"{kp}.params.checkpoint=null", f"{kp}.params.device=cpu", f"{kp}.params.batch_size=8"] if rtmw_random
            else [f"{kp}=null"])
    return out


@pytest.fixture(scope="session")
def full_stack_run(full_stack_files, tmp_path_factory):
    """``annotators=full`` (the whole stack with :func:`full_stack_files`, references and identities included) through
    the command, once for the session's tests of it, on: a person in motion (``person.mp4``, 256 px, 20 frames), a
    video of nobody (``nobody.mp4``: nothing to fit) and the first two built-in sample videos (128 px, 26 frames).
    Returns (its output, its CompletedProcess)."""
    from tests.preprocess.helpers import make_video, run_cli

    root = tmp_path_factory.mktemp("full_stack_run")
    media = root / "in"
    make_video(media / "person.mp4", "astronaut", n=20, size=256)
    blank = np.full((20, 256, 256, 3), 90, np.uint8)  # nobody in it: nothing to fit
    blank[:, 100:150, 60:200] = 200
    demo_media.write_video(media / "nobody.mp4", blank, 25.0)
    for p in demo_media.ensure_samples(root / "samples", size=128, n_frames=26, fps=25, megamind=False)[:2]:
        (media / Path(p).name).symlink_to(p)
    out = root / "out"
    proc = run_cli([f"input={media}", f"output={out}", "annotators=full", "plan.min_frames=8", "plan.max_frames=26",
                    "ray.progress_bars=false", *full_stack_overrides(full_stack_files)], timeout=900)
    return out, proc
