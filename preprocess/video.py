"""Video I/O: probing, frame readers (PyAV and decord behind one interface) and the H.264 encoder.

Measured on the dev CPU (bench/decode.py, docs/performance.md): PyAV decodes contiguous frame
ranges faster than decord, and frame numbers are taken from presentation timestamps, which is exact
on files where decord's index drifts (Megamind.avi: packed B-frames in AVI put decord's frames off
by up to a few positions). ``auto`` is therefore PyAV in preprocessing; decord remains selectable and
is the reader of the training loader, which reads our own re-encoded MP4 clips.

Presentation time throughout: the planning pass (:func:`scan`) records every displayable frame's
timestamp, clips are resampled by those timestamps, and :func:`read_frames_pyav` finds frames by their
timestamps. So variable-frame-rate video (most phone recordings) and containers whose headers lie about
the frame count or rate read exactly. Corrupt packets cost the frames they carry, not the video: the scan
decodes packet by packet, skips what does not decode and records the damaged stretches.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import math
from array import array
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .audio import AudioTrack


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


def _starts_like_mp4(path: str, fileobj=None) -> bool:
    """Whether the file begins with an ISO-BMFF ``ftyp`` box (MP4, MOV, M4V, 3GP)."""
    try:
        if fileobj is not None:
            fileobj.seek(0)
            head = fileobj.read(12)
            fileobj.seek(0)
        else:
            with open(path, "rb") as f:
                head = f.read(12)
    except OSError:
        return False
    return len(head) >= 12 and head[4:8] == b"ftyp"


def _display_rotation(frame) -> int:
    """Degrees clockwise a decoded frame must be turned for display (from its display matrix)."""
    rot = int(round(getattr(frame, "rotation", 0) or 0))
    return (-rot) % 360


def probe(path: str, fileobj=None) -> ProbeInfo:
    """Container metadata of a video; raises VideoError for anything that is not a decodable video."""
    try:
        container = av.open(fileobj if fileobj is not None else path, metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        if _starts_like_mp4(path, fileobj):
            raise VideoError("truncated", f"{path}: an MP4/MOV whose index (moov box) is missing: the file was cut "
                             f"short (an interrupted download or copy); fetch it again ({ffmpeg_words(e)})") from None
        raise VideoError("not_a_video", f"{path}: not a readable media file ({ffmpeg_words(e)})") from None
    except av.error.FFmpegError as e:
        raise VideoError("unreadable", f"{path}: {ffmpeg_words(e)}") from None
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
            raise VideoError("undecodable", f"{path}: first frames do not decode ({ffmpeg_words(e)})") from None
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


@dataclass
class Scan:
    """What one decode of a whole video saw: per displayable frame, its presentation time and a number
    computed from the frame (e.g. a shot-change score), plus the stretches that did not decode. Compact arrays:
    an hour at 25 fps is ~2 MB."""

    values: np.ndarray  # float64 per frame, in presentation order
    pts: np.ndarray | None  # int64 stream pts per frame; None when the stream has no timestamps
    times: np.ndarray  # seconds from the first frame
    damaged: list[tuple[float, float]]  # (last good, next good frame) seconds around undecodable stretches
    skipped: int  # frames dropped for a timestamp not after the previous one (not displayable)
    start_s: float = 0.0  # container time of the first frame: ``times`` + start_s is on the audio's clock
    audio: AudioTrack | None = None  # the first audio stream, decoded in the same pass (``scan(audio=True)``)

    @property
    def mean_fps(self) -> float:
        """Frames per second over the scanned span (the average rate of a variable-rate video)."""
        span = float(self.times[-1] - self.times[0]) if len(self.times) > 1 else 0.0
        return (len(self.times) - 1) / span if span > 0 else 0.0


def ffmpeg_words(e: Exception) -> str:
    """An FFmpeg error as words (PyAV's message without the errno prefix)."""
    msg = getattr(e, "strerror", None) or str(e)
    return msg.split("] ", 1)[-1].strip()


def scan(path: str, fn, *, rotation: int = 0, size: tuple[int, int] | None = None, fps: float,
         fileobj=None, audio: bool = False) -> Scan:
    """Decode every packet of the first video stream in order and apply ``fn(rgb) -> float`` to each displayable
    frame (resized to ``size`` (w, h), rotated for display). A packet that fails to decode is skipped and
    its stretch (until the next frame that decodes) recorded as damaged; frames whose timestamp is not
    after the previous one are dropped (counted in ``skipped``). ``fps`` numbers frames of a stream
    without timestamps. ``audio``: the first audio stream is decoded in the same pass (``Scan.audio``)."""
    values, keys, broken_after, skipped = array("d"), array("q"), [], 0
    broken = False
    last = None
    track = None
    with av.open(fileobj if fileobj is not None else path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        tb = s.time_base
        has_pts = True
        seq = 0
        streams = [s]
        if audio:
            track = AudioTrack.of(c)
            streams += [track.stream] if track.stream is not None else []
        for packet in c.demux(*streams):
            if packet.stream.type == "audio":
                track.add(packet)
                continue
            try:
                got = packet.decode()
            except av.error.FFmpegError:
                broken = True  # this packet's frames are lost: a stretch after the last good frame
                continue
            for frame in got:
                if frame.pts is None:
                    has_pts = False
                key = frame.pts if (has_pts and frame.pts is not None) else seq
                seq += 1
                if last is not None and key <= last:
                    skipped += 1
                    continue
                last = key
                if broken:
                    broken_after.append(len(values) - 1)  # -1: before the first frame
                    broken = False
                if size:
                    w, h = (size[1], size[0]) if rotation in (90, 270) else size
                    arr = frame.to_ndarray(format="rgb24", width=w, height=h)
                else:
                    arr = frame.to_ndarray(format="rgb24")
                values.append(fn(_rotate(arr, rotation)))
                keys.append(key)
        if broken:
            broken_after.append(len(values) - 1)
    values = np.frombuffer(values, np.float64) if values else np.zeros(0)
    start_s = 0.0
    if has_pts and tb is not None and keys:
        pts = np.frombuffer(keys, np.int64)
        times = (pts - pts[0]).astype(np.float64) * float(tb)
        start_s = float(pts[0] * tb)
    else:
        pts = None
        times = np.arange(len(values), dtype=np.float64) / fps
    # a stretch that did not decode, as (last good frame, next good frame) times; open ends at the edges
    damaged = [(float(times[i]) if i >= 0 else -math.inf, float(times[i + 1]) if i + 1 < len(times) else math.inf)
               for i in broken_after]
    return Scan(values, pts, times, damaged, skipped, start_s, track.finish() if track else None)


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the long side at most ``max_side``, both sides even (yuv420p needs it)."""
    s = min(1.0, max_side / max(width, height)) if max_side else 1.0
    return max(2, int(round(width * s / 2)) * 2), max(2, int(round(height * s / 2)) * 2)


def read_frames_pyav(path: str, indices: np.ndarray, *, rotation: int, size: tuple[int, int],
                     start_pts: int = 0, pts: np.ndarray | None = None, fileobj=None) -> np.ndarray:
    """Frames at sorted ``indices`` (presentation order), resized to ``size`` (w, h), uint8 T×H×W×3.

    With ``pts`` (the stream timestamps of those frames, from :func:`scan`): seeks to the keyframe before
    the first one, decodes forward and takes the frames whose timestamps match, which is exact on
    variable-frame-rate streams; if the container's index sends the seek too far, it decodes from the
    start. Without: frame numbers come from timestamps at the stream's nominal rate (constant-rate
    streams; ``start_pts`` is frame 0's timestamp).
    """
    indices = np.asarray(indices)
    if pts is not None:
        pts = np.asarray(pts, dtype=np.int64)
        if len(pts) != len(indices):
            raise ValueError(f"{len(pts)} timestamps for {len(indices)} frames")
        got = _read_by_pts(path, pts, rotation=rotation, size=size, fileobj=fileobj, seek=True)
        if len(got) < len(pts):
            if fileobj is not None:
                fileobj.seek(0)
            got = _read_by_pts(path, pts, rotation=rotation, size=size, fileobj=fileobj, seek=False)
        missing = [int(i) for i, t in zip(indices, pts) if int(t) not in got]
        if missing:
            raise VideoError("frames_missing", f"{path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                             f"({len(missing)} of {len(indices)}) were decoded when planning but not when "
                             "reading the clip")
        return np.stack([got[int(t)] for t in pts])
    want = set(int(i) for i in indices)
    out: dict[int, np.ndarray] = {}
    dw, dh = _decode_size(size, rotation)
    with _opened(path, fileobj) as (c, s):
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
    missing = [int(i) for i in indices if int(i) not in out]
    if missing:
        raise VideoError("truncated", f"{path}: frames {missing[:5]}{'...' if len(missing) > 5 else ''} "
                         f"could not be decoded ({len(missing)} of {len(indices)})")
    return np.stack([out[int(i)] for i in indices])


def _decode_size(size: tuple[int, int], rotation: int) -> tuple[int, int]:
    """(w, h) to decode at so that turning the frame for display gives ``size`` (w, h)."""
    w, h = size
    return (h, w) if rotation in (90, 270) else (w, h)


@contextlib.contextmanager
def _opened(path: str, fileobj=None):
    """(container, its first video stream) with frame threading on."""
    with av.open(fileobj if fileobj is not None else path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        yield c, s


def _read_by_pts(path: str, pts: np.ndarray, *, rotation: int, size: tuple[int, int], fileobj, seek: bool
                 ) -> dict[int, np.ndarray]:
    """{pts: frame} of the wanted timestamps that decode; packets that fail to decode are skipped."""
    want = set(int(t) for t in pts)
    last = int(pts.max())
    out: dict[int, np.ndarray] = {}
    dw, dh = _decode_size(size, rotation)
    with _opened(path, fileobj) as (c, s):
        if seek and int(pts.min()) > 0:
            c.seek(int(pts.min()), stream=s, backward=True, any_frame=False)
        for packet in c.demux(s):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                continue
            past = False
            for frame in frames:
                t = frame.pts
                if t is None:
                    continue
                if t in want and t not in out:
                    out[t] = _rotate(frame.to_ndarray(format="rgb24", width=dw, height=dh), rotation)
                past = past or t > last  # the decoder hands frames out in presentation order
            if past or len(out) == len(want):
                break
    return out


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
                backend: str = "auto", start_pts: int = 0, pts: np.ndarray | None = None, fileobj=None) -> np.ndarray:
    """Read sorted frame indices with the chosen backend (``auto`` = PyAV, see the module doc); ``pts``:
    the frames' stream timestamps from :func:`scan` (PyAV finds frames by them; decord by index)."""
    order = np.argsort(np.asarray(indices, dtype=np.int64), kind="stable")
    indices = np.asarray(indices, dtype=np.int64)[order]
    if backend == "decord":
        return read_frames_decord(path, indices, rotation=rotation, size=size, fileobj=fileobj)
    pts = None if pts is None else np.asarray(pts, dtype=np.int64)[order]
    return read_frames_pyav(path, indices, rotation=rotation, size=size, start_pts=start_pts, pts=pts, fileobj=fileobj)


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
    buf = io.BytesIO()
    write_mp4(buf, np.asarray(frames), fps, crf=crf, preset=preset, threads=threads)
    return buf.getvalue()


def write_mp4(dst, frames, fps: float, *, crf: int = 20, preset: str = "veryfast", threads: int = 0,
              audio: np.ndarray | None = None, audio_rate: int = 0, audio_start_s: float = 0.0) -> None:
    """:func:`encode_mp4` into ``dst`` (a path or a binary file) from any iterable of H×W×3 RGB frames, one at a
    time: a long video is written without ever being in memory whole.

    ``audio``: a mono waveform in [-1, 1] at ``audio_rate`` to mux as an AAC track whose first sample is at
    ``audio_start_s`` (sample media and tests with sound; the stored clips have none)."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("no frame to encode")
    h, w, _ = np.shape(first)
    if h % 2 or w % 2:
        raise ValueError(f"frame size {w}x{h} must be even for yuv420p")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(dst, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": str(crf), "preset": preset, "threads": str(threads), "x264-params": "mbtree=0"}
        sound = _AacTrack(c, audio, audio_rate, audio_start_s) if audio is not None else None
        for i, f in enumerate(itertools.chain([first], frames)):
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(packet)
            if sound is not None:  # interleaved: the audio up to the end of this frame
                sound.write_until((i + 1) / float(rate))
        for packet in s.encode():
            c.mux(packet)
        if sound is not None:
            sound.write_until(None)


class _AacTrack:
    """An AAC audio stream of a container being written, fed from a waveform in encoder-sized frames."""

    def __init__(self, container, wave: np.ndarray, rate: int, start_s: float):
        if rate <= 0:
            raise ValueError("audio_rate must be > 0 with audio")
        self.c, self.rate = container, int(rate)
        self.wave = np.clip(np.asarray(wave, dtype=np.float32).reshape(-1), -1.0, 1.0)
        self.s = container.add_stream("aac", rate=self.rate)
        self.s.layout, self.s.format = "mono", "fltp"
        self.offset = int(round(start_s * self.rate))  # pts of the first sample, in 1 / rate
        self.done = 0

    def write_until(self, t: float | None) -> None:
        """Encode the samples before time ``t`` (None: all, then flush the encoder)."""
        end = len(self.wave) if t is None else min(len(self.wave), max(0, int(t * self.rate) - self.offset))
        step = 1024  # the AAC frame
        while self.done + step <= end or (t is None and self.done < end):
            chunk = self.wave[self.done:self.done + step]
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.rate, self.offset + self.done, Fraction(1, self.rate)
            for packet in self.s.encode(frame):
                self.c.mux(packet)
            self.done += len(chunk)
        if t is None:
            for packet in self.s.encode():
                self.c.mux(packet)


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
