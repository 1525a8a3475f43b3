"""Video I/O: probing, frame readers (PyAV and decord behind one interface) and the H.264 encoder.

Measured on the dev CPU (bench/decode.py, docs/performance.md): PyAV decodes contiguous frame
ranges faster than decord, and frame numbers are taken from presentation timestamps, which is exact
on files where decord's index drifts (Megamind.avi: packed B-frames in AVI put decord's frames off
by up to a few positions). ``auto`` is therefore PyAV in preprocessing; decord remains selectable and
is the reader of the training loader, which reads our own re-encoded MP4 clips.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np


class VideoError(RuntimeError):
    """An input that cannot be read as a video; the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across the isolated decoder process
        return (VideoError, (self.reason, str(self)))


# FFmpeg demuxers that turn text or still images into a "video" stream.
NON_VIDEO_FORMATS = {"tty", "image2", "image2pipe", "lavfi", "srt", "ass", "webvtt", "txt", "subviewer", "mpl2"}


@dataclass
class ProbeInfo:
    fps: float
    n_frames: int
    width: int  # as displayed (rotation applied)
    height: int
    codec: str
    rotation: int  # degrees clockwise the frames must be turned for display
    duration: float  # seconds
    start_pts: int = 0  # pts of frame 0 (the smallest of the first frames; not always stream.start_time)


def _display_rotation(frame) -> int:
    """Degrees clockwise a decoded frame must be turned for display (from its display matrix)."""
    rot = int(round(getattr(frame, "rotation", 0) or 0))
    return (-rot) % 360


def probe(path: str, fileobj=None) -> ProbeInfo:
    """Container metadata of a video; raises VideoError for anything that is not a decodable video."""
    try:
        container = av.open(fileobj if fileobj is not None else path, metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        raise VideoError("not_a_video", f"{path}: not a readable media file ({e})") from None
    except av.error.FFmpegError as e:
        raise VideoError("unreadable", f"{path}: {e}") from None
    with container:
        fmt = container.format.name or ""
        if fmt.split(",")[0] in NON_VIDEO_FORMATS or fmt.endswith("_pipe"):
            raise VideoError("not_a_video", f"{path}: FFmpeg reads it as {fmt!r} (text or a still image), not a video")
        if not container.streams.video:
            raise VideoError("no_video_stream", f"{path}: no video stream")
        s = container.streams.video[0]
        if s.codec_context is None or s.codec_context.name is None:
            raise VideoError("unsupported_codec", f"{path}: unsupported video codec")
        rate = s.average_rate or s.guessed_rate or s.base_rate
        fps = float(rate) if rate else 0.0
        if not fps or not math.isfinite(fps) or fps <= 0:
            raise VideoError("no_frame_rate", f"{path}: the video stream has no frame rate")
        duration = 0.0
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        n = int(s.frames or 0) or int(round(duration * fps))
        try:  # the first frames prove the stream decodes and carry the display rotation and pts origin
            head = []
            for fr in container.decode(s):
                head.append(fr)
                if len(head) >= 8:
                    break
        except av.error.FFmpegError as e:
            raise VideoError("undecodable", f"{path}: first frames do not decode ({e})") from None
        if not head:
            raise VideoError("no_frames", f"{path}: the video stream has no decodable frame")
        first = head[0]
        pts = [fr.pts for fr in head if fr.pts is not None]
        rot = _display_rotation(first)
        w, h = first.width, first.height
        if rot in (90, 270):
            w, h = h, w
        if not w or not h:
            raise VideoError("no_frame_size", f"{path}: the video stream has no frame size")
        return ProbeInfo(fps=fps, n_frames=n, width=w, height=h, codec=s.codec_context.name,
                         rotation=rot, duration=duration or n / fps, start_pts=min(pts) if pts else 0)


def _rotate(img: np.ndarray, rotation: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, k=-(rotation // 90))) if rotation else img


def iter_frames(path: str, *, rotation: int = 0, width: int | None = None, height: int | None = None,
                fmt: str = "rgb24", fileobj=None):
    """Yield every decoded frame in order (resized to width×height when given) with PyAV."""
    with av.open(fileobj if fileobj is not None else path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for frame in c.decode(s):
            if width and height:
                w, h = (height, width) if rotation in (90, 270) else (width, height)
                arr = frame.to_ndarray(format=fmt, width=w, height=h)
            else:
                arr = frame.to_ndarray(format=fmt)
            yield _rotate(arr, rotation)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the long side at most ``max_side``, both sides even (yuv420p needs it)."""
    s = min(1.0, max_side / max(width, height)) if max_side else 1.0
    return max(2, int(round(width * s / 2)) * 2), max(2, int(round(height * s / 2)) * 2)


def read_frames_pyav(path: str, indices: np.ndarray, *, rotation: int, size: tuple[int, int],
                     start_pts: int = 0, fileobj=None) -> np.ndarray:
    """Frames at sorted ``indices`` (decode order), resized to ``size`` (w, h), uint8 T×H×W×3.

    Seeks to the keyframe before the first index, then decodes forward; frame numbers are counted
    from presentation timestamps so a seek lands on the right frame.
    """
    indices = np.asarray(indices)
    want = set(int(i) for i in indices)
    out: dict[int, np.ndarray] = {}
    w, h = size
    dw, dh = (h, w) if rotation in (90, 270) else (w, h)
    with av.open(fileobj if fileobj is not None else path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        rate = s.average_rate or s.guessed_rate
        tb = s.time_base
        first = int(indices[0])
        if first > 0 and tb is not None:
            target = start_pts + int(Fraction(first, 1) / Fraction(rate) / tb)
            c.seek(max(target, start_pts), stream=s, backward=True, any_frame=False)
        seq = None
        for frame in c.decode(s):
            if frame.pts is not None and tb is not None:
                idx = int(round(float((frame.pts - start_pts) * tb * rate)))
            else:
                seq = 0 if seq is None else seq + 1
                idx = seq
            if idx in want and idx not in out:
                out[idx] = _rotate(frame.to_ndarray(format="rgb24", width=dw, height=dh), rotation)
                if len(out) == len(want):
                    break
            if idx > indices[-1] + 8:  # past the last wanted frame by more than any reordering
                break
    missing = [i for i in indices if int(i) not in out]
    if missing:
        raise VideoError("truncated", f"{path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                         f"could not be decoded ({len(missing)} of {len(indices)})")
    return np.stack([out[int(i)] for i in indices])


def read_frames_decord(path: str, indices: np.ndarray, *, rotation: int, size: tuple[int, int],
                       start_pts: int = 0, fileobj=None) -> np.ndarray:
    """Same contract as :func:`read_frames_pyav`, with decord's batched reader."""
    import decord

    w, h = size
    dw, dh = (h, w) if rotation in (90, 270) else (w, h)
    src = fileobj if fileobj is not None else path
    vr = decord.VideoReader(src, ctx=decord.cpu(0), width=dw, height=dh, num_threads=1)
    frames = vr.get_batch(list(int(i) for i in indices)).asnumpy()
    return np.stack([_rotate(f, rotation) for f in frames]) if rotation else frames


def read_frames(path: str, indices: np.ndarray, *, rotation: int, size: tuple[int, int],
                backend: str = "auto", start_pts: int = 0, fileobj=None) -> np.ndarray:
    """Read sorted frame indices with the chosen backend (``auto`` = PyAV, see the module doc)."""
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    reader = read_frames_decord if backend == "decord" else read_frames_pyav
    return reader(path, indices, rotation=rotation, size=size, start_pts=start_pts, fileobj=fileobj)


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 20, preset: str = "veryfast", threads: int = 0) -> bytes:
    """Encode uint8 T×H×W×3 RGB frames as an H.264 (yuv420p) MP4 in memory; the same frames always
    give the same bytes on one machine, and with ``threads=1`` on every x86 machine with AVX (measured
    the same through x264's AVX, AVX2 and AVX-512 paths).

    MB-tree rate control is off: together with B-frames, x264's AVX-512 code (x264 core 165, the one in
    PyAV's wheels) makes the output depend on what the process's memory held before, also with one
    thread (the first encode in a fresh process is always the same file, later ones are not). Measured
    on an AVX-512 CPU (crf 16, medium): 2-6 different files from 6 encodes of the same frames for 11 of
    15 96-160 px sample clips, decoded pixels up to 39 levels apart; always one file with ``mbtree=0``,
    ``bframes=0`` or ``asm=avx2``, and ``mbtree=0`` costs the least (veryfast, 384 px samples and
    Megamind.avi: ~10% more bytes at equal PSNR; at equal crf +50% bytes, +0.7 dB). Frame threads
    (``threads``; 0: x264's choice from the core count) change the bytes, not their determinism.
    """
    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": str(crf), "preset": preset, "threads": str(threads), "x264-params": "mbtree=0"}
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, indices=None) -> np.ndarray:
    """Decode an in-memory MP4 (as written by :func:`encode_mp4`) to uint8 T×H×W×3; with ``indices``,
    only those frames (decoding stops after the last one)."""
    stop = None if indices is None else int(np.max(indices)) + 1 if len(indices) else 0
    frames = []
    for i, f in enumerate(iter_frames("<bytes>", fileobj=io.BytesIO(data))):
        if stop is not None and i >= stop:
            break
        frames.append(f)
    arr = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return arr if indices is None else arr[np.asarray(indices)]
