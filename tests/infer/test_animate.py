"""The animation job (infer/run.py, infer/animate.py): end to end on the CPU with the tiny preset, and its
parts: bone lengths retargeted to the reference, missing driving frames filled, pseudo-reference picks, the
audio track copied, and bad inputs refused in one line naming the file."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from infer.annotate import AnnotationError, Annotations, fill_missing, nearest_valid
from infer.pseudo_refs import pick_by_yaw, turning_annotations
from models import render
from preprocess.schema import BODY_JOINT_NAMES

ROOT = Path(__file__).resolve().parents[2]


def make_export(out: Path, preset: str = "tiny", audio: bool = False) -> Path:
    """A random-weights export of ``preset`` as the trainer writes one: weights + the run's config.yaml (with
    ``audio``: as stage 4 writes one, with the audio encoder)."""
    import yaml
    from safetensors.torch import save_file

    from models.config import load_preset
    from models.dreamactor import DreamActor

    cfg = load_preset(preset)
    torch.manual_seed(0)
    model = DreamActor.from_config(cfg, load_weights=False, audio=audio)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    save_file(state, str(out / "ema.safetensors"))

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    run = {"model": plain(dataclasses.asdict(cfg)), "train": {"seed": 0}, "data": {"buckets": {"area": 64 * 64}},
           "stage": {"id": 4 if audio else 1}}
    (out / "config.yaml").write_text(yaml.safe_dump(run))
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "export")


def infer(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "infer" / "run.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def frames_of(path: Path) -> np.ndarray:
    from preprocess.video import iter_frames

    return np.stack(list(iter_frames(str(path))))


def test_the_command_animates_the_driving_length_in_two_segments(export, tmp_path):
    out = tmp_path / "anim.mp4"
    r = infer([f"checkpoint={export}", f"output={out}", "sampling.segment_frames=9", "sampling.steps=2",
               "video.max_frames=13", f"samples.dir={tmp_path / 'samples'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    video = frames_of(out)
    assert video.shape == (13, 64, 64, 3)  # the driving length, at the training area
    sbs = frames_of(out.with_name("anim_side_by_side.mp4"))
    assert sbs.shape == (13, 64, 192, 3)  # [driving | controls | output]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["frames_out"] == 13 and rec["preset"] == "tiny" and len(rec["weights_sha256"]) == 64
    assert rec["settings"]["segment_frames"] == 9 and rec["settings"]["guidance_ref"] == 2.5  # the preset's CFG
    assert rec["weights"].endswith("ema.safetensors") and rec["references_used"] == 1
    assert "animating" in r.stderr  # the progress bar over sampling steps


@pytest.mark.parametrize("make,needle", [
    ("blank_reference", "no person detected in it"),
    ("text_driving", "not a readable media file"),
    ("other_preset", "these weights are of the 'tiny' preset, not 'small'"),
    ("missing_reference", "no such file or directory"),
])
def test_bad_inputs_are_one_line_naming_the_file(export, tmp_path, make, needle):
    import cv2

    from preprocess import demo_media

    ref, drive = tmp_path / "ref.png", tmp_path / "drive.mp4"
    cv2.imwrite(str(ref), cv2.cvtColor(demo_media.load_photo("grace_hopper"), cv2.COLOR_RGB2BGR))
    demo_media.write_video(drive, demo_media.render_motion(demo_media.load_photo("astronaut"), (128, 128), 9,
                                                           demo_media.Motion(shift=(10.0, 0.0)))[0], 25.0)
    args = [f"checkpoint={export}", f"output={tmp_path / 'o.mp4'}", "sampling.steps=1", "video.max_frames=5"]
    bad = {"blank_reference": ref, "text_driving": drive, "missing_reference": tmp_path / "nope.png"}.get(make)
    if make == "blank_reference":
        cv2.imwrite(str(ref), np.full((96, 96, 3), 128, np.uint8))
    if make == "text_driving":
        drive.write_text("not a video\n")
    if make == "other_preset":
        args.append("preset=small")
    if make == "missing_reference":
        ref = bad
    r = infer([*args, f"reference={ref}", f"driving={drive}"])
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    if bad is not None:
        assert str(bad) in r.stderr
    else:
        assert "ema.safetensors" in r.stderr


def _skeleton(t: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, J, 3) joints of a random plausible body in front of the camera, and all-confident (T, J)."""
    rng = np.random.default_rng(seed)
    parents = render.body_layout(BODY_JOINT_NAMES).parents
    j = np.zeros((t, len(parents), 3))
    dirs = rng.normal(size=(len(parents), 3))
    for k in render.topological_order(parents):
        p = parents[k]
        if p < 0:
            j[:, k] = [0.0, 0.0, 3.0] + rng.normal(scale=0.01, size=(t, 3))
        else:
            wobble = rng.normal(scale=0.05, size=(t, 3))
            d = dirs[k] + wobble
            j[:, k] = j[:, p] + scale * rng.uniform(0.1, 0.4) * d / np.linalg.norm(d, axis=-1, keepdims=True)
    return j, np.ones((t, len(parents)))


def test_bone_lengths_become_the_references_with_directions_kept():
    from infer.animate import adjusted_joints

    drive_j, conf = _skeleton(12, 1.3, seed=1)
    ref_j, ref_conf = _skeleton(1, 0.8, seed=2)
    drive = Annotations({"body_joints3d": drive_j, "body_conf": conf})
    ref = Annotations({"body_joints3d": ref_j, "body_conf": ref_conf})
    body, hands = adjusted_joints(drive, ref, 0.0, enabled=True)
    parents = render.body_layout(BODY_JOINT_NAMES).parents
    want = render.bone_lengths(ref_j, ref_conf > 0, parents)
    for k, p in enumerate(parents):
        if p < 0:
            assert np.allclose(body[:, k], drive_j[:, k])  # the root stays where the driving video has it
            continue
        new, old = body[:, k] - body[:, p], drive_j[:, k] - drive_j[:, p]
        assert np.allclose(np.linalg.norm(new, axis=-1), want[k], rtol=0.01)
        cos = (new * old).sum(-1) / np.linalg.norm(new, axis=-1) / np.linalg.norm(old, axis=-1)
        assert cos.min() > 0.9999
    same, _ = adjusted_joints(drive, ref, 0.0, enabled=False)
    assert np.array_equal(same, drive_j)


def test_frames_without_a_person_reuse_the_nearest_good_frame():
    valid = np.array([0, 1, 1, 0, 0, 0, 1, 0], bool)
    assert nearest_valid(valid).tolist() == [1, 1, 2, 2, 2, 6, 6, 6]
    ann = Annotations({"subject_valid": valid.astype(np.uint8), "body_joints3d": np.arange(8.0)[:, None, None]})
    filled = fill_missing(ann, "drive.mp4")
    assert filled.filled == [0, 3, 4, 5, 7]
    assert filled["body_joints3d"][:, 0, 0].tolist() == [1, 1, 2, 2, 2, 6, 6, 6]
    with pytest.raises(AnnotationError, match="drive.mp4: no person was detected in any of its 8 frames"):
        fill_missing(Annotations({"subject_valid": np.zeros(8, np.uint8)}), "drive.mp4")


def test_pseudo_references_are_the_frames_of_max_min_and_median_yaw():
    yaw = np.array([3.0, -40.0, 12.0, 41.0, -5.0, 0.5, 90.0])
    valid = np.array([1, 1, 1, 1, 1, 1, 0], bool)  # the 90° frame has no measured head: never picked
    assert pick_by_yaw(yaw, valid) == {"yaw_max": 3, "yaw_min": 1, "yaw_median": 0}
    # the turning controls sweep the reference's head and body from -max to +max yaw about a vertical axis
    j, conf = _skeleton(1, 1.0, seed=3)
    K = np.array([[[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]]])
    ref = Annotations({"body_joints3d": j, "body_conf": conf, "camera_K": K, "head_rotation": np.eye(3)[None],
                       "head_center": np.array([[32.0, 20.0]])})
    turn = turning_annotations(ref, 9, 40.0)
    rot = turn["head_rotation"]
    yaws = np.degrees(np.arctan2(rot[:, 0, 2], rot[:, 2, 2]))
    assert np.allclose(yaws, np.linspace(-40, 40, 9))
    lengths = np.linalg.norm(turn["body_joints3d"][:, 1:] - turn["body_joints3d"][:, :1], axis=-1)
    assert np.allclose(lengths, lengths[0])  # a rigid turn


def test_the_driving_audio_track_is_copied(tmp_path):
    import av

    from infer.video_out import write_video

    src = tmp_path / "with_audio.mp4"
    with av.open(str(src), mode="w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(25):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 9, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                           format="fltp", layout="mono")
        frame.sample_rate, frame.time_base, frame.pts = 16000, Fraction(1, 16000), 0
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    out = write_video(tmp_path / "out.mp4", np.zeros((13, 32, 32, 3), np.uint8), 25.0, audio_from=str(src))
    with av.open(str(out)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        assert c.streams.audio[0].codec_context.name == "aac"
    assert frames_of(out).shape[0] == 13


def test_pseudo_reference_mode_adds_the_picked_frames_as_references(export, tmp_path, monkeypatch):
    """Two passes: the reference turning (its frames' yaw measured by the head annotator, here replaced by known
    yaws), then the animation with the reference + the frames of max/min/median yaw."""
    from infer import annotate as annotate_mod
    from infer.config import to_config
    from infer.run import run
    from tests.conftest import compose

    real = annotate_mod.Annotator.annotate
    yaws = np.array([-30.0, -10.0, 5.0, 20.0, 35.0, 0.0, 0.0, 0.0, 0.0])

    def annotate(self, frames, fps, name):
        if name != "pseudo-reference video":
            return real(self, frames, fps, name)
        n = len(frames)
        ypr = np.zeros((n, 3))
        ypr[:, 0] = yaws[:n]
        valid = (np.arange(n) < 5).astype(np.uint8)  # frames 5-8: no head found
        return Annotations({"subject_valid": np.ones(n, np.uint8), "head_ypr": ypr, "head_valid": valid})

    monkeypatch.setattr(annotate_mod.Annotator, "annotate", annotate)
    cfg = to_config(compose("infer", [f"checkpoint={export}", f"output={tmp_path / 'p.mp4'}", "sampling.steps=1",
                                      "sampling.segment_frames=9", "video.max_frames=5", "pseudo_refs.enabled=true",
                                      "pseudo_refs.frames=9", f"samples.dir={tmp_path / 'samples'}"]))
    rec = run(cfg)
    assert rec["pseudo_references"] == {"yaw_max": {"frame": 4, "yaw_deg": 35.0},
                                        "yaw_min": {"frame": 0, "yaw_deg": -30.0},
                                        "yaw_median": {"frame": 2, "yaw_deg": 5.0}}
    assert rec["references_used"] == 4 and rec["frames_out"] == 5


def test_one_switch_puts_every_annotator_on_a_mediapipe_delegate():
    from infer.annotate import Annotator
    from infer.config import to_config
    from tests.conftest import compose

    cfg = to_config(compose("infer", ["annotate.delegate=auto"]))
    stages = Annotator(cfg.annotators, 8, cfg.annotate.delegate).stages
    assert [st.name for st in stages] == ["body", "hands", "head"]
    assert all(st.params.backend["params"]["delegate"] == "auto" for st in stages)


def test_the_inference_bench_runs_its_two_steps(tmp_path):
    """bench/infer.py: controls prepared (annotated) on one machine, sampled on another (here both the CPU)."""
    npz = tmp_path / "drive.npz"
    for args in (["prepare", "--preset", "tiny", "--frames", "9", "--height", "64", "--width", "64", "--out", str(npz)],
                 ["sample", "--preset", "tiny", "--prepared", str(npz), "--steps", "1", "--segment-frames", "5",
                  "--json", str(tmp_path / "b.json")]):
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "infer.py"), *args], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["frames"] == 9 and res["size"] == [64, 64] and res["total_steps"] == 2  # 2 segments of 5 frames
    assert res["seconds_per_output_frame"] > 0
