"""Per-video planning: content key, shot boundaries and clip windows.

Shot boundaries: every frame is decoded at ``analysis_width`` and converted to HSV; a cut is placed
where the mean absolute HSV change from the previous frame exceeds ``shot_threshold`` (the content
detector of PySceneDetect, on 0–255 channels), at least ``min_shot_frames`` after the previous cut.
Clips: each shot is sampled at the target fps (never upsampled); a shot shorter than ``min_frames``
is dropped with reason ``shot_too_short``; a longer one is split into ``ceil(L / max_frames)`` equal
contiguous windows, so every window has between ``min_frames`` and ``max_frames`` frames.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .video import ProbeInfo, VideoError, iter_frames, probe


@dataclass
class ClipPlan:
    clip_index: int
    shot_index: int
    frame_index: np.ndarray  # source frames, sorted


@dataclass
class VideoPlan:
    info: ProbeInfo
    n_frames: int  # frames actually decoded
    shots: list[tuple[int, int]]  # [start, end) source frames
    fps: float  # fps of the planned clips
    clips: list[ClipPlan] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> shots


def content_key(size: int, head: bytes, tail: bytes) -> str:
    """16-hex content key from the file size and its first and last bytes (renames keep it)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(size).encode())
    h.update(head)
    h.update(tail)
    return h.hexdigest()


def shot_scores(path: str, rotation: int, analysis_width: int, fileobj=None, src_size=None) -> np.ndarray:
    """Mean |ΔHSV| between each frame and the previous one (score[0] = 0)."""
    w, h = src_size if src_size else (analysis_width, analysis_width)
    aw = analysis_width
    ah = max(2, int(round(h * aw / w / 2)) * 2)
    scores, prev = [], None
    for rgb in iter_frames(path, rotation=rotation, width=aw, height=ah, fileobj=fileobj):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int16)
        scores.append(0.0 if prev is None else float(np.abs(hsv - prev).mean()))
        prev = hsv
    return np.asarray(scores, dtype=np.float64)


def find_shots(scores: np.ndarray, threshold: float, min_shot_frames: int) -> list[tuple[int, int]]:
    """Shots [start, end) from per-frame change scores."""
    n = len(scores)
    cuts = [0]
    for i in range(1, n):
        if scores[i] > threshold and i - cuts[-1] >= min_shot_frames:
            cuts.append(i)
    cuts.append(n)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def plan_windows(shots, src_fps: float, target_fps: float | None, min_frames: int, max_frames: int):
    """Clip windows for the shots; returns (fps of the clips, clips, dropped-shot counts)."""
    stride = max(1.0, src_fps / target_fps) if target_fps else 1.0
    fps = src_fps / stride
    clips: list[ClipPlan] = []
    dropped: dict[str, int] = {}
    for si, (a, b) in enumerate(shots):
        idx = np.unique(np.floor(a + np.arange(0, math.ceil((b - a) / stride)) * stride + 1e-6).astype(np.int64))
        idx = idx[idx < b]
        if len(idx) < min_frames:
            dropped["shot_too_short"] = dropped.get("shot_too_short", 0) + 1
            continue
        for win in np.array_split(idx, math.ceil(len(idx) / max_frames)):
            clips.append(ClipPlan(len(clips), si, win.astype(np.int32)))
    return fps, clips, dropped


def plan_video(path: str, *, analysis_width: int, threshold: float, min_shot_frames: int,
               target_fps: float | None, min_frames: int, max_frames: int, min_seconds: float,
               open_fn=None) -> VideoPlan:
    """Probe, detect shots and plan clips (runs in the isolated decoder process)."""
    fileobj = open_fn() if open_fn else None
    info = probe(path, fileobj=fileobj)
    if info.duration < min_seconds:
        raise VideoError("too_short", f"{path}: {info.duration:.2f} s is shorter than probe.min_seconds={min_seconds}")
    if fileobj is not None:
        fileobj.seek(0)
    try:
        scores = shot_scores(path, info.rotation, analysis_width, fileobj=fileobj, src_size=(info.width, info.height))
    except Exception as e:  # PyAV raises on corrupt packets past the first frame
        raise VideoError("truncated", f"{path}: decoding stopped with {type(e).__name__}: {e}") from None
    if len(scores) < min_frames:
        raise VideoError("too_short", f"{path}: {len(scores)} decodable frames, fewer than plan.min_frames={min_frames}")
    shots = find_shots(scores, threshold, min_shot_frames)
    fps, clips, dropped = plan_windows(shots, info.fps, target_fps, min_frames, max_frames)
    return VideoPlan(info=info, n_frames=len(scores), shots=shots, fps=fps, clips=clips, dropped=dropped)
