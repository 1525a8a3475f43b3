"""Write an animation: H.264 MP4 through a temporary name, the driving video's audio track copied in."""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def write_video(path: Path, frames: np.ndarray, fps: float, *, audio_from: str | None = None, crf: int = 18) -> Path:
    """``frames`` (T, H, W, 3) uint8 as ``path`` (sides cropped to even); with ``audio_from``, that file's
    first audio stream is copied (packets as they are, up to the video's duration)."""
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
            a_out = out.add_stream_from_template(a_in) if a_in is not None else None
            for f in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:h, :w]), format="rgb24")
                for packet in vs.encode(frame):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
            if a_in is not None:
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
