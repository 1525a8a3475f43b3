"""A video's audio for the shards: decoded once per video, resampled to ``schema.AUDIO_RATE`` mono, cut per clip.

The planning pass (``plan.plan_video``, inside the isolated decoder) already demuxes the whole file for shot
detection; :func:`video.scan` hands every packet of the first audio stream to an :class:`AudioTrack`, so the file is
read once. The track keeps the resampled audio as int16 PCM (32 kB per second: ~115 MB for an hour) with the time of
its first sample on the container's clock, the clock the video frames' timestamps are on too; a clip is then cut by
its own time span (:meth:`AudioTrack.cut`), which keeps audio and frames aligned whatever the two streams' start
times, frame rates or time bases, and stored as FLAC (:func:`encode_flac`: lossless, ~16 kB per second).

What is not audio is said so, never stored as silence: a video without an audio stream, a stream that does not
decode, a clip the track does not cover, or one that overlaps a damaged stretch (packets that failed to decode, or a
jump of the timestamps) longer than ``MAX_FILL_S`` get no ``audio`` member and a reason in meta.json
``audio_status`` (``schema.AUDIO_STATES``). Shorter holes (one lost packet, the few ms a track starts late or ends
early) are filled with zeros.
"""
from __future__ import annotations

import io
import logging
import math
from array import array
from dataclasses import dataclass, field

import numpy as np

try:
    import av

    HAVE_AV = True
except ImportError as _e:  # a training-only machine: the loader reads the shards' FLAC with soundfile (decode_flac)
    _AV_MISSING = _e

    class _NoAV:
        def __getattr__(self, name):
            raise ImportError(f"PyAV is needed to read, resample or write audio ({_AV_MISSING}): pip install av")

    av = _NoAV()
    HAVE_AV = False

from .schema import AUDIO_OK, AUDIO_RATE

log = logging.getLogger(__name__)

MAX_FILL_S = 0.1  # holes up to this long (a lost packet, a track that starts a frame late) are filled with zeros
_JUMP_S = 0.002  # a frame whose timestamp is off the running sample count by more than this starts a new segment


@dataclass
class AudioTrack:
    """A video's audio, resampled to ``AUDIO_RATE`` mono int16, as the decode of the file hands it over.

    Feed it the packets of ``stream`` (:meth:`add`), then :meth:`finish`; :meth:`cut` gives a clip's samples.
    Frames are placed by their timestamps: a frame whose time does not follow on from the samples so far (a jump, or
    the first frame after packets that failed to decode) starts a new segment at its own time, the hole between is
    recorded in ``holes`` and filled with zeros."""

    stream: object = None  # the av audio stream, None: the video has none
    problem: str = ""  # "" or the schema.AUDIO_STATES reason why the whole track is unusable
    message: str = ""  # what went wrong, in words (holes, undecodable packets)
    start_s: float | None = None  # container time of sample 0 (None: no frame decoded)
    holes: list[tuple[float, float]] = field(default_factory=list)  # container times without decoded audio
    samples: np.ndarray | None = None  # int16, after finish()
    _pcm: array = field(default_factory=lambda: array("h"))  # the samples so far (grows in place: no copy at the end)
    _next_s: float | None = None  # where the next frame is expected (container time)
    _broken: bool = False  # packets failed to decode since the last good frame
    _errors: int = 0
    _first_error: str = ""
    _resampler: object = None

    @classmethod
    def of(cls, container) -> AudioTrack:
        """The track of ``container``'s first audio stream (one with ``problem`` set when there is none or it has
        no decoder)."""
        if not container.streams.audio:
            return cls(problem="no_audio_stream")  # not a problem of the source: nothing to report
        s = container.streams.audio[0]
        try:
            ctx = s.codec_context
        except Exception as e:  # noqa: BLE001 - PyAV raises several types for an unknown codec
            ctx, why = None, f"{type(e).__name__}: {e}"
        else:
            why = "no decoder for its codec"
        if ctx is None:
            return cls(problem="undecodable", message=f"the audio stream cannot be decoded: {why}")
        return cls(stream=s)

    # ---------------------------------------------------------------- decoding
    def add(self, packet) -> None:
        """Decode one packet of the stream (the empty one at the end flushes the decoder)."""
        if self.stream is None or self.problem:
            return
        try:
            frames = packet.decode()
        except av.error.FFmpegError as e:
            self._broken = True
            self._errors += 1
            if not self._first_error:
                from .video import ffmpeg_words  # (video imports this module)

                t = packet.pts * packet.time_base if packet.pts is not None and packet.time_base else None
                self._first_error = f"{'' if t is None else f'at {float(t):.3f} s: '}{ffmpeg_words(e)}"
            return
        for frame in frames:
            self._frame(frame)

    def _frame(self, frame) -> None:
        t = frame.time
        if t is None:  # no timestamps: the frames follow each other
            t = self._next_s if self._next_s is not None else 0.0
        if self.start_s is None:
            self.start_s = float(t)
            self._resampler = _resampler()
        elif self._broken or abs(t - self._next_s) > _JUMP_S:
            self._jump(float(t))
        self._broken = False
        try:
            out = self._resampler.resample(frame)
        except (ValueError, av.error.FFmpegError):  # the frame's rate or layout changed: a new resampler
            self._drain()
            self._resampler = _resampler()
            out = self._resampler.resample(frame)
        self._append(out)
        self._next_s = float(t) + frame.samples / frame.sample_rate

    def _jump(self, t: float) -> None:
        """Start a new segment at container time ``t``: the samples before it are drained, the hole filled with
        zeros (an overlap, timestamps going back, is cut off)."""
        self._drain()
        self._resampler = _resampler()
        self.holes.append((min(self._next_s, t), max(self._next_s, t)))
        at = max(int(round((t - self.start_s) * AUDIO_RATE)), 0)
        if at > len(self._pcm):
            self._pcm.frombytes(bytes(2 * (at - len(self._pcm))))
        else:
            del self._pcm[at:]

    def _drain(self) -> None:
        if self._resampler is not None:
            self._append(self._resampler.resample(None))
            self._resampler = None

    def _append(self, frames) -> None:
        for o in frames:
            self._pcm.frombytes(o.to_ndarray().astype(np.int16, copy=False).tobytes())

    def finish(self) -> AudioTrack:
        """Flush the resampler; record a trailing damaged stretch; set ``samples``, ``problem`` and ``message``."""
        if self.stream is not None and not self.problem:
            self._drain()
            if self.start_s is None:
                self.problem = "undecodable"
                self.message = f"no audio frame decoded ({self._errors} packets failed" + \
                    (f"; the first {self._first_error})" if self._first_error else ")")
            else:
                if self._broken:  # packets after the last good frame failed
                    self.holes.append((self._next_s, math.inf))
                self.samples = np.frombuffer(self._pcm, np.int16) if len(self._pcm) else np.zeros(0, np.int16)
                parts = [f"{self._errors} audio packets did not decode (the first {self._first_error})"] \
                    if self._errors else []
                if self.holes:
                    parts.append(f"holes in the track (lost packets or timestamp jumps): {_holes_text(self.holes)}")
                if parts:
                    self.message = "; ".join([*parts, f"the track starts at {self.start_s:.3f} s"])
        self._resampler = None
        self.stream = None  # its container closes; the finished track keeps nothing of it
        if self.message:
            log.warning("audio: %s", self.message)
        return self

    # ---------------------------------------------------------------- cutting
    def cut(self, t0: float, t1: float) -> tuple[np.ndarray | None, str]:
        """(int16 samples of container times [t0, t1), ``AUDIO_OK``) or (None, the reason there are none).

        ``round((t1 - t0) * AUDIO_RATE)`` samples; sample k stands for time t0 + k / AUDIO_RATE. Holes up to
        ``MAX_FILL_S`` inside or at the edges of the span are zeros."""
        if self.problem:
            return None, self.problem
        if self.samples is None or self.start_s is None:
            return None, "undecodable"
        for a, b in self.holes:
            if a < t1 and b > t0 and min(b, t1) - max(a, t0) > MAX_FILL_S:
                return None, "damaged"
        n = int(round((t1 - t0) * AUDIO_RATE))
        i0 = int(round((t0 - self.start_s) * AUDIO_RATE))
        before, after = max(0, -i0), max(0, i0 + n - len(self.samples))
        if max(before, after) > MAX_FILL_S * AUDIO_RATE:
            return None, "not_covered"
        out = np.zeros(n, np.int16)
        lo, hi = max(i0, 0), min(i0 + n, len(self.samples))
        if hi > lo:
            out[lo - i0:hi - i0] = self.samples[lo:hi]
        return out, AUDIO_OK


def _resampler():
    return av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)


def _holes_text(holes: list[tuple[float, float]], most: int = 5) -> str:
    text = ", ".join(f"{a:.3f}-{'end' if math.isinf(b) else f'{b:.3f}'} s" for a, b in holes[:most])
    return text + (f" and {len(holes) - most} more" if len(holes) > most else "")


def read_audio(path: str, fileobj=None) -> AudioTrack:
    """The audio track of a media file (a video's or an audio file's), decoded and resampled as preprocessing does:
    ``samples`` int16 at ``AUDIO_RATE`` starting at container time ``start_s``; ``problem`` says why there is none.
    Inference can drive a clip with it (``train.data.sample.audio_window``)."""
    with av.open(fileobj if fileobj is not None else path) as c:
        track = AudioTrack.of(c)
        if track.stream is not None:
            for packet in c.demux(track.stream):
                track.add(packet)
    return track.finish()


def resample(wave: np.ndarray, rate: int) -> np.ndarray:
    """A mono float waveform at ``rate`` as float32 at ``AUDIO_RATE``, with the resampler preprocessing uses (FFmpeg's
    swresample): sample k of the result stands for the time of input sample k * rate / AUDIO_RATE."""
    x = np.ascontiguousarray(np.asarray(wave, dtype=np.float32).reshape(1, -1))
    if int(rate) == AUDIO_RATE or not x.size:
        return x[0].copy()
    frame = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
    frame.sample_rate, frame.pts = int(rate), 0
    r = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    out = [o.to_ndarray().reshape(-1) for o in [*r.resample(frame), *r.resample(None)]]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def encode_flac(samples: np.ndarray) -> bytes:
    """int16 mono samples at ``AUDIO_RATE`` as an in-memory FLAC stream (a clip's ``audio`` member): lossless, about
    half the bytes of the PCM (measured: 0.49 on espeak-ng speech, 0.53 on Megamind.avi's soundtrack)."""
    x = np.ascontiguousarray(np.asarray(samples, dtype=np.int16).reshape(1, -1))
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as c:
        s = c.add_stream("flac", rate=AUDIO_RATE)
        s.layout, s.format = "mono", "s16"
        if x.size:
            frame = av.AudioFrame.from_ndarray(x, format="s16", layout="mono")
            frame.sample_rate, frame.pts = AUDIO_RATE, 0
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return buf.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    """The int16 samples of a FLAC stream written by :func:`encode_flac` (PyAV, or libsndfile through soundfile where
    PyAV is not installed, e.g. a GPU machine that only trains)."""
    if not HAVE_AV:
        import soundfile

        x, _ = soundfile.read(io.BytesIO(data), dtype="int16")  # mono, as encode_flac writes it
        return x.reshape(-1)
    with av.open(io.BytesIO(data), format="flac") as c:
        out = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
    return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)
