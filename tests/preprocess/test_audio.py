"""Each clip's audio (schema 3): cut from the source's track by the clip's time span, so that beeps at known frames
land on the right sample; what has no audio says why; the validator checks both."""
from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from preprocess import demo_media, schema
from preprocess.audio import MAX_FILL_S, AudioTrack, decode_flac, encode_flac, read_audio
from preprocess.validate import check_sample, validate
from tests.preprocess.helpers import AUDIO_BEEPS_S, AUDIO_CORPUS, beep_onsets, beep_wave
from tests.train.data.helpers import meta, npy, read_dataset

ALIGN = 48  # samples: 3 ms at 16 kHz
R = schema.AUDIO_RATE


def test_beeps_land_on_their_frames_in_the_shards(audio_dataset):
    """Through ``preprocess/run.py``: every clip's status is the one its source calls for; where there is audio it
    spans the clip (audio_length samples) and each beep starts within 3 ms of the time of its frame, also for a 50 fps
    source sampled at 25 fps and for tracks that start 40 ms or 0.6 s after the video."""
    clips = read_dataset(audio_dataset)
    assert len(clips) == 2 * len(AUDIO_CORPUS)
    index = pd.read_parquet(audio_dataset / "index.parquet").set_index("key")
    for key, m in clips.items():
        me = meta(m)
        name = Path(me["source"]).stem
        want = AUDIO_CORPUS[name][2][me["clip_index"]]
        assert (me["audio_status"], index.loc[key, "audio_status"]) == (want, want), (name, me["clip_index"])
        if want != schema.AUDIO_OK:
            assert "audio.flac" not in m
            continue
        ts, audio = npy(m, "timestamps"), decode_flac(m["audio.flac"])
        assert audio.dtype == np.int16 and len(audio) == schema.audio_length(ts, me["fps"]) == me["n_frames"] * R // 25
        expected = [round((s - ts[0]) * R) for s in AUDIO_BEEPS_S if 0 <= s - ts[0] < len(audio) / R]
        got = beep_onsets(audio / 32768.0)
        assert len(got) == len(expected) == 1 and abs(got[0] - expected[0]) <= ALIGN, (name, got, expected)
        # the beep's frame, counted in the stored clip, is the one the source showed then
        frame = int(np.searchsorted(ts, ts[0] + got[0] / R, side="right")) - 1
        src_fps = AUDIO_CORPUS[name][0].get("fps", 25.0)
        assert abs(npy(m, "frame_index")[frame] / src_fps - (ts[0] + got[0] / R)) < 1.0 / src_fps
    stats = pd.concat(pd.read_parquet(p) for p in (audio_dataset / "shards").glob("*.parquet"))
    videos = {Path(r.source).stem: json.loads(r.clips_dropped) for r in stats[stats["kind"] == "video"].itertuples()}
    assert "13 audio packets did not decode" in videos["damaged"]["audio"] and "1.300-1.602 s" in \
        videos["damaged"]["audio"]
    assert all("audio" not in d for name, d in videos.items() if name != "damaged")
    assert validate(str(audio_dataset), log=lambda *a: None) == []
    summary = json.loads((audio_dataset / "summary.json").read_text())
    assert summary["dataset_clips_by_audio"] == {"ok": 6, "no_audio_stream": 2, "not_covered": 1, "damaged": 1}


def test_the_validator_checks_the_audio_and_its_status(audio_dataset):
    clips = read_dataset(audio_dataset)
    fields = schema.fields_of(["clip"])
    key, m = next((k, m) for k, m in clips.items() if meta(m)["audio_status"] == "ok")
    assert check_sample(key, m, fields, deep=False) == []
    short = dict(m, **{"audio.flac": encode_flac(decode_flac(m["audio.flac"])[:-5])})
    assert check_sample(key, short, fields, deep=False) == [f"{key}: audio.flac: rate, channels, bits, samples "
                                                            f"({R}, 1, 16, 15995), expected ({R}, 1, 16, 16000)"]
    assert check_sample(key, dict(m, **{"audio.flac": b"RIFF" + bytes(60)}), fields, deep=False) == \
        [f"{key}: audio.flac: not a FLAC stream (no fLaC marker and STREAMINFO block)"]
    cut = dict(m, **{"audio.flac": m["audio.flac"][:len(m["audio.flac"]) // 2]})  # the header still says 16000
    assert check_sample(key, cut, fields, deep=False) == []
    assert [p for p in check_sample(key, cut, fields, deep=True) if "audio.flac does not decode (End of file" in p]
    gone = {k: v for k, v in m.items() if k != "audio.flac"}
    for status, problem in (("loud", "audio_status 'loud', expected one of"), ("no_audio_stream", "has an audio")):
        bad = dict(m, **{"meta.json": json.dumps({**meta(m), "audio_status": status}).encode()})
        assert [p for p in check_sample(key, bad, fields, deep=False) if problem in p], status
    # a version-3 meta must say; a version-2 one (made before audio was kept) need not
    v3 = {k: v for k, v in meta(m).items() if k != "audio_status"}
    assert "missing keys ['audio_status']" in check_sample(key, dict(gone, **{"meta.json": json.dumps(v3).encode()}),
                                                            fields, deep=False)[0]
    v2 = dict(gone, **{"meta.json": json.dumps({**v3, "schema_version": 2}).encode()})
    assert check_sample(key, v2, fields, deep=False) == []


def test_a_track_fills_short_holes_and_refuses_long_ones():
    """``AudioTrack.cut``: a clip's span inside the track is its samples; holes and uncovered edges up to MAX_FILL_S
    are zeros, longer ones give the clip no audio and the reason."""
    track = AudioTrack(start_s=0.5, samples=np.arange(3 * R, dtype=np.int64).astype(np.int16),
                       holes=[(1.5, 1.55), (2.5, 2.8)])
    a, status = track.cut(1.0, 2.0)  # over the 50 ms hole: kept (the decoder's zeros are in the samples)
    assert status == "ok" and np.array_equal(a, track.samples[R // 2:R // 2 + R])
    assert track.cut(2.0, 3.0) == (None, "damaged")
    a, status = track.cut(0.5 - MAX_FILL_S / 2, 1.0)  # starts before the track: zeros first
    assert status == "ok" and len(a) == R // 2 + int(MAX_FILL_S / 2 * R) and not a[:int(MAX_FILL_S / 2 * R)].any()
    assert track.cut(0.0, 1.0) == (None, "not_covered")
    assert track.cut(3.0, 3.5 + MAX_FILL_S * 1.5) == (None, "not_covered")
    assert AudioTrack(problem="no_audio_stream").cut(0.0, 1.0) == (None, "no_audio_stream")


class _Packet:
    """A demuxed packet as AudioTrack.add sees it: its frames, or the decoder's error."""

    def __init__(self, frames=(), error=None, pts=None):
        self.frames, self.error, self.pts, self.time_base = list(frames), error, pts, Fraction(1, R)

    def decode(self):
        if self.error:
            raise self.error
        return self.frames


def _frame(wave: np.ndarray, k: int, n: int = 320):
    frame = av.AudioFrame.from_ndarray((wave[k:k + n] * 32767).astype(np.int16)[None], format="s16", layout="mono")
    frame.sample_rate, frame.pts, frame.time_base = R, k, Fraction(1, R)
    return frame


def test_a_track_is_placed_by_its_timestamps():
    """Frames go where their timestamps say: after a packet that did not decode, a 60 ms jump ahead and a 30 ms jump
    back, the beep at 1.2 s is still on its sample; the holes are recorded and say which clips have no audio."""
    wave = beep_wave(AUDIO_BEEPS_S, 2.0, R)
    starts = [k for k in range(0, R, 320) if not 0.2 * R <= k < 0.26 * R]  # 60 ms left out
    starts += range(R - 480, 2 * R, 320)  # from 0.97 s on: 30 ms sent twice
    bad = av.error.InvalidDataError(1094995529, "Invalid data")
    packets = [_Packet(error=bad, pts=k) if 1.6 * R <= k < 1.8 * R else _Packet([_frame(wave, k)]) for k in starts]
    track = AudioTrack(stream=object())
    for p in packets:
        track.add(p)
    track.finish()
    assert track.start_s == 0.0 and len(track.samples) == 2 * R
    assert [abs(o - round(s * R)) <= 2 for o, s in zip(beep_onsets(track.samples / 32768), AUDIO_BEEPS_S)] == [True] * 2
    assert [(round(a, 3), round(b, 3)) for a, b in track.holes] == [(0.2, 0.26), (0.97, 1.0), (1.61, 1.81)]
    assert track.message == ("10 audio packets did not decode (the first at 1.610 s: Invalid data); holes in the "
                             "track (lost packets or timestamp jumps): 0.200-0.260 s, 0.970-1.000 s, 1.610-1.810 s; "
                             "the track starts at 0.000 s")
    assert [track.cut(t, t + 0.5)[1] for t in (0.0, 0.5, 1.0, 1.5)] == ["ok", "ok", "ok", "damaged"]


@pytest.mark.skipif(not demo_media.MEGAMIND.exists(), reason="opencv-doc's Megamind.avi is not installed")
def test_a_real_track_with_an_undecodable_packet():
    """Megamind.avi's AC3 track: its first packet does not decode (FFmpeg says so); the track starts 32 ms late,
    which is filled, and the rest is there: the audio spans the video with sound in it."""
    track = read_audio(str(demo_media.MEGAMIND))
    assert track.problem == "" and "1 audio packets did not decode (the first at 0.000 s: Invalid data" in \
        track.message
    assert abs(track.start_s - 0.032) < 1e-6 and abs(len(track.samples) / R + track.start_s - 11.26) < 0.05
    a, status = track.cut(0.0, 2.0)
    assert status == "ok" and len(a) == 2 * R and np.abs(a.astype(np.float32)).mean() > 100


def test_a_talking_video_moves_its_mouth_with_its_speech(tmp_path):
    """demo_media.talking_video: a shipped photo saying a sentence (espeak-ng); the muxed speech decodes, spans the
    video, and its loudness per frame goes with how dark the mouth is (the open mouth); the same call gives the same
    file, another sentence another one."""
    from preprocess.video import decode_mp4

    try:
        v = demo_media.talking_video(tmp_path / "a.mp4", "grace_hopper", demo_media.SENTENCES[0], size=(96, 112))
    except demo_media.SpeechUnavailable as e:
        pytest.skip(f"{e} (CI installs it through scripts/install.sh)")
    frames = decode_mp4(v.path.read_bytes())
    assert len(frames) == v.n_frames and frames.shape[1:] == (112, 96, 3)
    track = read_audio(str(v.path))
    assert track.problem == "" and abs(len(track.samples) / R - v.n_frames / v.fps) < 0.05
    x = track.samples.astype(np.float32) / 32768
    hop = R / v.fps
    loud = np.array([np.sqrt(np.mean(x[int(i * hop):int((i + 1) * hop)] ** 2)) for i in range(v.n_frames)])
    assert loud.max() > 0.05 and (v.openness > 0.5).sum() > 5 and (v.openness == 0).sum() > 5
    # where the mouth is in the frame: the photo's mouth through the fitting affine
    affine = demo_media.motion_affines(demo_media.load_photo("grace_hopper").shape[:2], (96, 112), 1,
                                       demo_media.Motion())[0]
    cx, cy, mw = demo_media.MOUTHS["grace_hopper"]
    (fx, fy), r = affine @ np.array([cx, cy + 0.2 * mw, 1.0]), 0.3 * mw * affine[0, 0]
    box = frames[:, int(fy - r):int(fy + r) + 1, int(fx - r):int(fx + r) + 1]
    darkness = -box.astype(np.float32).mean(axis=(1, 2, 3))
    assert np.corrcoef(darkness, loud)[0, 1] > 0.7
    again = demo_media.talking_video(tmp_path / "b.mp4", "grace_hopper", demo_media.SENTENCES[0], size=(96, 112))
    assert again.path.read_bytes() == v.path.read_bytes()
    other = demo_media.talking_video(tmp_path / "c.mp4", "astronaut", demo_media.SENTENCES[1], size=(96, 96))
    assert other.n_frames != v.n_frames and len(set(demo_media.SENTENCES)) >= 5


def test_flac_decodes_without_pyav(tmp_path):
    """A training-only machine (the GPU one) has no PyAV: the loader's FLAC decoding falls back to libsndfile and gives
    the same samples; the rest of preprocess.audio says that PyAV is needed."""
    import subprocess
    import sys

    x = (np.sin(np.arange(8000) / 7.0) * 12000).astype(np.int16)
    (tmp_path / "a.flac").write_bytes(encode_flac(x))
    code = f"""
import importlib.abc, sys
class NoAV(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "av" or name.startswith("av."):
            raise ImportError("no av here")
sys.meta_path.insert(0, NoAV())
import numpy as np
from preprocess.audio import HAVE_AV, decode_flac, read_audio
assert not HAVE_AV
np.save({str(tmp_path / "b.npy")!r}, decode_flac(open({str(tmp_path / "a.flac")!r}, "rb").read()))
try:
    read_audio({str(tmp_path / "a.flac")!r})
except ImportError as e:
    print(e)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "PyAV is needed" in r.stdout
    got = np.load(tmp_path / "b.npy")
    assert got.dtype == np.int16 and np.array_equal(got, decode_flac((tmp_path / "a.flac").read_bytes()))
    assert np.array_equal(got, x)
