"""Write an animation: H.264 MP4 through a temporary name, with the audio of another file (the driving video's, or
the driving audio's) muxed in: copied as it is when MP4 takes its codec (AAC, MP3), else re-encoded to AAC (a WAV's
PCM, FLAC, Vorbis, ...)."""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


COPIED_CODECS = ("aac", "mp3")  # audio that MP4 carries as it is


def write_video(path: Path, frames: np.ndarray, fps: float, *, audio_from: str | None = None, crf: int = 18) -> Path:
    """``frames`` (T, H, W, 3) uint8 as ``path`` (sides cropped to even); with ``audio_from``, that file's
    first audio stream up to the video's duration: its packets as they are (AAC, MP3), else re-encoded to AAC."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w = frames.shape[0], frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    tmp = path.with_name(f".{path.name}.tmp")
    rate = Fraction(fps).limit_denominator(1001)
    src = av.open(audio_from) if audio_from else None
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            vs = out.add_stream("libx264", rate=rate)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "medium"}
            a_in = src.streams.audio[0] if src is not None and src.streams.audio else None
            copy = a_in is not None and a_in.codec_context.name in COPIED_CODECS
            a_out = out.add_stream_from_template(a_in) if copy else _aac_stream(out, a_in) if a_in else None
            for f in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
                for packet in vs.encode(frame):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
            if a_in is not None and not copy:
                _encode_aac(src, a_in, out, a_out, t / fps)
            if copy:
                limit = t / fps
                for packet in src.demux(a_in):
                    if packet.dts is None:
                        continue
                    if packet.pts is not None and float(packet.pts * a_in.time_base) >= limit:
                        break
                    packet.stream = a_out
                    out.mux(packet)
    finally:
        if src is not None:
            src.close()
    os.replace(tmp, path)
    return path


def _aac_stream(out, a_in):
    """An AAC stream in ``out`` for the audio of ``a_in`` (its rate up to 48 kHz; mono or stereo)."""
    a_out = out.add_stream("aac", rate=min(int(a_in.rate or 48000), 48000))
    a_out.layout = "mono" if (a_in.layout.nb_channels if a_in.layout else 1) == 1 else "stereo"
    return a_out


def _encode_aac(src, a_in, out, a_out, seconds: float) -> None:
    """Decode ``src``'s stream ``a_in`` and encode its first ``seconds`` into the AAC stream ``a_out`` of ``out``."""
    import av

    rate = a_out.rate
    resampler = av.AudioResampler(format="fltp", layout=a_out.layout.name, rate=rate)
    left = int(round(seconds * rate))

    def encode(frames) -> None:
        nonlocal left
        for f in frames:
            if left <= 0:
                return
            if f.samples > left:  # the last one: cut at the video's end
                cut = av.AudioFrame.from_ndarray(np.ascontiguousarray(f.to_ndarray()[:, :left]), format="fltp",
                                                 layout=a_out.layout.name)
                cut.sample_rate, f = rate, cut
            left -= f.samples
            f.pts = None
            for packet in a_out.encode(f):
                out.mux(packet)

    for frame in src.decode(a_in):
        encode(resampler.resample(frame))
        if left <= 0:
            break
    encode(resampler.resample(None))
    for packet in a_out.encode():
        out.mux(packet)
