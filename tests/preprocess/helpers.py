"""Helpers for preprocessing tests: tiny videos and in-process pipeline runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from preprocess import demo_media
from preprocess.annotators.backends import IdentityBackend
from preprocess.config import to_config
from preprocess.storage import list_inputs
from preprocess.synthetic import REFS_GROUPS, annotated_rows, face_crops, writer_peak  # noqa: F401
from tests.conftest import ROOT, compose


def make_video(path, photo="astronaut", n=30, size=96, motion=None, fps=25.0) -> Path:
    motion = demo_media.Motion() if motion is None else motion
    frames, _ = demo_media.render_motion(demo_media.load_photo(photo), (size, size), n, motion)
    return demo_media.write_video(path, frames, fps)


def make_corpus(d: Path, n_good: int = 3, n_frames: int = 20) -> list[Path]:
    photos = ["astronaut", "grace_hopper", "camera"]
    return [make_video(d / f"good{i}.mp4", photos[i % 3], n=n_frames,
                       motion=demo_media.Motion(shift=(2.0 * i, 1.0 * i))) for i in range(n_good)]


def make_vfr_video(path, n=60, size=96, fast_ms=33, slow_ms=67, stretch=15) -> Path:
    """A phone-style variable-frame-rate clip: stretches of ``stretch`` frames alternating ``fast_ms`` and
    ``slow_ms`` apart (H.264, millisecond timestamps)."""
    from fractions import Fraction

    import av

    frames, _ = demo_media.render_motion(demo_media.load_photo("grace_hopper"), (size, size), n,
                                      demo_media.Motion(shift=(size * 0.4, 0)))
    gaps = [fast_ms if (i // stretch) % 2 == 0 else slow_ms for i in range(n)]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for f, gap in zip(frames, gaps):
            fr = av.VideoFrame.from_ndarray(f, format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            t += gap
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return Path(path)


def make_damaged_video(path, n=120, size=96, at=0.45, share=0.1) -> Path:
    """An MPEG-TS clip with ``share`` of its bytes overwritten with noise at ``at`` of the file."""
    import numpy as np

    good = make_video(Path(path).with_suffix(".good.mp4"), "camera", n=n, size=size,
                      motion=demo_media.Motion(shift=(size * 0.3, 0)))
    import av
    with av.open(str(good)) as src, av.open(str(path), "w", format="mpegts") as dst:
        s_in = src.streams.video[0]
        s = dst.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        s.options = {"g": "12"}
        for fr in src.decode(s_in):
            fr.pict_type = av.video.frame.PictureType.NONE
            for pk in s.encode(fr):
                dst.mux(pk)
        for pk in s.encode():
            dst.mux(pk)
    good.unlink()
    data = bytearray(Path(path).read_bytes())
    a, k = int(len(data) * at), int(len(data) * share)
    data[a:a + k] = np.random.default_rng(0).integers(0, 256, k, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    return Path(path)


ENGINE_OVERRIDES = ["annotators=none", "plan.min_frames=8", "plan.max_frames=20", "decode.max_side=96",
                    "ray.progress_bars=false", "progress_interval_s=1000"]


def run_inprocess(input_: str, output: str, extra: list[str] | None = None) -> int:
    from preprocess import pipeline

    cfg = to_config(compose("preprocess", [f"input={input_}", f"output={output}", *ENGINE_OVERRIDES, *(extra or [])]))
    return pipeline.run(cfg, list_inputs(cfg.input))


def run_cli(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = dict(kw.pop("env", os.environ), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "preprocess" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=kw.pop("cwd", ROOT), **kw)


def index_keys(output) -> list[str]:
    import pandas as pd
    return sorted(pd.read_parquet(Path(output) / "index.parquet")["key"])


def failures(output):
    import pandas as pd
    return pd.read_parquet(Path(output) / "failures.parquet")


def tar_members(output) -> dict[str, list[str]]:
    import tarfile
    out = {}
    for t in sorted((Path(output) / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            out[t.name] = tf.getnames()
    return out


class ThumbnailIdentity(IdentityBackend):
    """A cheap stand-in identity (the face box as a 16x8 grey thumbnail, centred, unit norm): the same photo under
    a small shift matches, two photos do not. For tests of the per-video machinery, not of face recognition."""

    dim = 128

    def embed(self, image: np.ndarray, face_box: np.ndarray) -> np.ndarray | None:
        x0, y0, x1, y1 = (int(round(v)) for v in face_box)
        grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
        v = cv2.resize(grey, (8, 16), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        v -= v.mean()
        return v / np.linalg.norm(v)


# ---------------------------------------------------------------- videos with sound
BEEP_HZ, BEEP_S = 1000.0, 0.1  # a beep: a 1 kHz sine of 0.1 s starting at phase 0


def beep_wave(beeps_s, seconds: float, rate: int, start_s: float = 0.0) -> np.ndarray:
    """A track of ``seconds`` starting at source time ``start_s`` with a beep starting at each time of ``beeps_s``."""
    t = start_s + np.arange(int(round(seconds * rate))) / rate
    x = np.zeros_like(t)
    for b in beeps_s:
        on = (t >= b) & (t < b + BEEP_S)
        x[on] = 0.5 * np.sin(2 * np.pi * BEEP_HZ * (t[on] - b))
    return x.astype(np.float32)


def make_beep_video(path, n: int = 50, fps: float = 25.0, beep_frames=(10, 30), *, audio: bool = True,
                    audio_start_s: float = 0.0, rate: int = 44100, size: int = 64) -> Path:
    """A small video whose AAC track beeps at the start of frames ``beep_frames`` (source frame numbers); the track
    starts at ``audio_start_s`` and ends with the video."""
    from preprocess.video import write_mp4

    frames, _ = demo_media.render_motion(demo_media.load_photo("astronaut"), (size, size), n,
                                      demo_media.Motion(shift=(4.0, 0.0)))
    wave = beep_wave([f / fps for f in beep_frames], n / fps - audio_start_s, rate, audio_start_s) if audio else None
    write_mp4(str(path), frames, fps, crf=20, threads=1, audio=wave, audio_rate=rate, audio_start_s=audio_start_s)
    return Path(path)


def corrupt_audio(src, dst, t0: float, t1: float) -> Path:
    """A copy of ``src`` whose audio packets starting in [t0, t1) s are noise (they fail to decode)."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mp4") as o:
        out = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for p in i.demux():
            if p.dts is None:  # the demuxer's flush packets
                continue
            stream = out[p.stream.index]
            if p.stream.type == "audio" and t0 <= float(p.pts * p.time_base) < t1:
                q = av.Packet(rng.integers(0, 256, p.size, dtype=np.uint8).tobytes())
                q.pts, q.dts, q.time_base, q.duration = p.pts, p.dts, p.time_base, p.duration
                p = q
            p.stream = stream
            o.mux(p)
    return Path(dst)


def beep_onsets(x: np.ndarray, level: float = 0.1, quiet: int = 160) -> list[int]:
    """The first sample of each beep in a waveform in [-1, 1]: above ``level`` after ``quiet`` samples below it."""
    loud = np.flatnonzero(np.abs(np.asarray(x, np.float32)) > level)
    return [int(i) for k, i in enumerate(loud) if k == 0 or i - loud[k - 1] > quiet]


# name -> (make_beep_video kwargs, corrupt (t0, t1) or None, meta audio_status of each clip); 50 frames at 25 fps
# (the 50 fps one: 100) make two clips of 25 frames at plan.max_frames=25. Beeps at 0.4 s and 1.2 s everywhere.
AUDIO_CORPUS = {
    "beep25": ({}, None, ("ok", "ok")),
    "beep50": ({"n": 100, "fps": 50.0, "beep_frames": (20, 60), "audio_start_s": 0.04, "rate": 22050}, None,
               ("ok", "ok")),  # subsampled to 25 fps; the track starts 40 ms late (zeros there)
    "silent": ({"audio": False}, None, ("no_audio_stream", "no_audio_stream")),
    "late": ({"audio_start_s": 0.6}, None, ("not_covered", "ok")),
    "damaged": ({}, (1.3, 1.6), ("ok", "damaged")),
}
AUDIO_BEEPS_S = (0.4, 1.2)
AUDIO_PREPROCESS = ["annotators=none", "plan.min_frames=8", "plan.max_frames=25", "decode.max_side=64",
                    "ray.progress_bars=false", "progress_interval_s=1000"]


def make_audio_corpus(directory) -> Path:
    """The videos of :data:`AUDIO_CORPUS` in ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, (kw, corrupt, _) in AUDIO_CORPUS.items():
        if corrupt is None:
            make_beep_video(d / f"{name}.mp4", **kw)
        else:
            corrupt_audio(make_beep_video(d / f"{name}.src.mp4", **kw), d / f"{name}.mp4", *corrupt)
            (d / f"{name}.src.mp4").unlink()
    return d
