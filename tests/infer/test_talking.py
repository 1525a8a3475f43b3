"""Animation from a sound file (infer/talking.py, ``infer/run.py driving_audio=...``): the output lasts as long as the
audio and carries it; audio of any file read at 16 kHz mono; the still head's sway is the reference's rotation plus a
small smooth yaw/pitch; a shorter driving video plays back and forth; weights without an audio encoder are refused
in a line that says what to train."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from infer import talking as T
from infer.animate import InferError
from infer.annotate import Annotations
from preprocess.annotators.geometry import rotation_from_ypr, ypr_from_rotation
from tests.infer.test_animate import frames_of, infer, make_export


def write_audio(path: Path, channels: np.ndarray, rate: int, codec: str = "pcm_s16le") -> Path:
    """``channels`` (C, S) float in [-1, 1] as an audio file (WAV PCM, or AAC in an MP4/M4A)."""
    import av

    layout = "mono" if len(channels) == 1 else "stereo"
    with av.open(str(path), "w") as c:
        a = c.add_stream(codec, rate=rate)
        a.layout = layout
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.time_base, frame.pts = rate, Fraction(1, rate), 0
        for p in a.encode(frame):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    return path


def _tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.4 * np.sin(2 * np.pi * freq * t)


def test_the_command_talks_for_the_audios_length_and_carries_it(tmp_path):
    """No driving video: the reference held still; 0.52 s of stereo 22.05 kHz speech -> 13 frames at 25 fps with an
    AAC track of that length (a WAV's PCM does not go into an MP4 as it is)."""
    import av

    export = make_export(tmp_path / "export", audio=True)
    speech = write_audio(tmp_path / "speech.wav", np.stack([_tone(0.52, 22050), _tone(0.52, 22050, 220.0)]), 22050)
    out = tmp_path / "talk.mp4"
    r = infer([f"checkpoint={export}", f"driving_audio={speech}", f"output={out}", "sampling.segment_frames=9",
               "sampling.steps=1", f"samples.dir={tmp_path / 'samples'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert frames_of(out).shape == (13, 64, 64, 3)
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac" and abs(float(a.duration * a.time_base) - 0.52) < 0.08
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["frames_out"] == 13 and rec["audio_copied"] and rec["driving"] is None
    assert rec["driving_audio"]["seconds"] == 0.52 and "held still" in rec["driving_audio"]["body_and_head"]
    assert frames_of(out.with_name("talk_side_by_side.mp4")).shape == (13, 64, 192, 3)


def test_audio_is_read_from_any_file_at_16_khz_mono(tmp_path):
    left = _tone(1.0, 44100)
    wav = write_audio(tmp_path / "a.wav", np.stack([left, 0.5 * left]), 44100)
    x = T.read_audio(str(wav))
    assert x.dtype == np.float32 and abs(len(x) - T.SAMPLE_RATE) <= 32
    assert abs(np.abs(x[2000:-2000]).max() - 0.75 * 0.4) < 0.01  # the mean of the channels
    m4a = write_audio(tmp_path / "a.m4a", _tone(1.0, 16000)[None], 16000, codec="aac")
    assert abs(len(T.read_audio(str(m4a))) - T.SAMPLE_RATE) <= 2048  # AAC's priming and padding
    for bad, needle in ((tmp_path / "none.wav", "no such file"), (tmp_path / "text.wav", "not a readable")):
        if bad.name == "text.wav":
            bad.write_text("not audio\n")
        with pytest.raises(InferError, match=needle):
            T.read_audio(str(bad))
    assert T.num_frames(x, 25.0, None) == 25 and T.num_frames(x, 30.0, 7) == 7


def test_the_still_head_sways_a_little_and_smoothly():
    sway = T.head_sway(250, 25.0, 3.0, 2.0, seed=1)
    assert np.abs(sway).max(0).tolist() <= [3.0, 2.0] and np.abs(sway).max(0).min() > 0.5
    assert np.abs(np.diff(sway, axis=0)).max() < 0.2  # degrees per frame: slow
    ref_rot = rotation_from_ypr(12.0, -5.0, 4.0)
    ref = Annotations({"head_rotation": ref_rot[None], "head_center": np.array([[30.0, 20.0]]),
                       "head_radius": np.array([8.0]), "head_valid": np.array([1], np.uint8),
                       "body_joints3d": np.ones((1, 5, 3)), "face_crops": np.zeros((1, 4, 4, 3), np.uint8)})
    still = T.still_annotations(ref, sway)
    ypr = ypr_from_rotation(still["head_rotation"])
    np.testing.assert_allclose(ypr[:, 0] - 12.0, sway[:, 0], atol=1e-6)
    np.testing.assert_allclose(ypr[:, 1] + 5.0, sway[:, 1], atol=1e-6)
    np.testing.assert_allclose(ypr[:, 2], 4.0, atol=1e-6)
    assert still["body_joints3d"].shape == (250, 5, 3) and (still["head_center"] == [30.0, 20.0]).all()
    assert "face_crops" not in still  # the face comes from the audio
    np.testing.assert_allclose(T.still_annotations(ref, np.zeros((3, 2)))["head_rotation"][2], ref_rot, atol=1e-12)


def test_a_shorter_driving_video_plays_back_and_forth(monkeypatch):
    assert T.pingpong(4, 11).tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert T.pingpong(1, 3).tolist() == [0, 0, 0]
    from infer import animate as A

    maps = np.arange(5)[:, None, None, None] * np.ones((5, 2, 2, 6), np.uint8)
    drive = A.Driving("d.mp4", maps[..., :3].copy(), 25.0, 25.0, False)
    prepared = A.Prepared([], [], drive, Annotations({}), (2, 2), np.eye(3), maps, 0.0)
    monkeypatch.setattr(T, "prepare", lambda *a: prepared)
    prep, n = T.prepare_driven(None, None, "ref.png", "d.mp4", np.zeros(T.SAMPLE_RATE // 2, np.float32), A.Settings())
    assert n == 12 and prep.maps[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    assert prep.driving.frames.shape[0] == 12


def test_weights_without_an_audio_encoder_are_refused():
    from infer.animate import Export
    from models.config import load_preset
    from models.dreamactor import DreamActor

    cfg = load_preset("tiny")
    exp = Export(DreamActor(cfg), None, cfg, Path("stage3/export/ema.safetensors"), "-", 0, 3)
    with pytest.raises(InferError, match="no audio encoder; driving_audio needs the export of the audio stage"):
        T.face_tokens_from_audio(exp, np.zeros(1600, np.float32), 25.0, 2, torch.float32)
    talking = Export(DreamActor(cfg, audio=True), None, cfg, Path("-"), "-", 0, 4)
    speech = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    assert T.face_tokens_from_audio(talking, speech, 25.0, 25, torch.float32).shape == (1, 25, cfg.dit.dim)
