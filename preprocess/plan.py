"""Per-video planning: content key, shot boundaries and clip windows.

Shot boundaries: every frame is decoded at ``analysis_width`` and converted to HSV; a cut is placed
where the mean absolute HSV change from the previous frame exceeds ``shot_threshold`` (the content
detector of PySceneDetect, on 0–255 channels), at least ``min_shot_frames`` after the previous cut.
Clips: each shot is sampled at the target fps by presentation time (the frame shown at each target
instant; never upsampled), so variable-frame-rate video gives evenly timed clips; a shot shorter than
``min_frames`` is dropped with reason ``shot_too_short``; a longer one is split into
``ceil(L / max_frames)`` equal contiguous windows, so every window has between ``min_frames`` and
``max_frames`` frames. A stretch that did not decode (corrupt packets) ends a shot: no clip spans damage,
and the damaged stretches are recorded (``VideoPlan.damaged``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import av
import cv2
import numpy as np

from .audio import encode_flac
from .schema import AUDIO_RATE, audio_length
from .video import ProbeInfo, Scan, VideoError, ffmpeg_words, probe, scan


@dataclass
class ClipPlan:
    clip_index: int
    shot_index: int
    frame_index: np.ndarray  # source frames (presentation order among the decodable frames), sorted
    timestamps: np.ndarray | None = None  # seconds from the first frame: the instant each clip frame stands for
    pts: np.ndarray | None = None  # stream timestamps of the frames (None: the stream has none)
    audio: bytes | None = None  # FLAC of the clip's span at schema.AUDIO_RATE (None: see audio_status)
    audio_status: str = ""  # schema.AUDIO_STATES


@dataclass
class VideoPlan:
    info: ProbeInfo
    n_frames: int  # frames actually decoded
    shots: list[tuple[int, int]]  # [start, end) source frames
    fps: float  # fps of the planned clips
    clips: list[ClipPlan] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> shots
    duration_s: float = 0.0  # presentation time from the first to past the last decoded frame
    # (last good, next good frame) seconds around each stretch that did not decode or that the container lost
    damaged: list[tuple[float, float]] = field(default_factory=list)
    audio_problem: str = ""  # what went wrong with the audio track, in words ("" when nothing did)


def content_key(size: int, head: bytes, tail: bytes) -> str:
    """16-hex content key from the file size and its first and last bytes (renames keep it)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(size).encode())
    h.update(head)
    h.update(tail)
    return h.hexdigest()


def shot_scan(path: str, rotation: int, analysis_width: int, fps: float, fileobj=None, src_size=None,
              audio: bool = False) -> Scan:
    """The decode of the whole video: per displayable frame its timestamp and the mean |ΔHSV| from the
    previous frame (``values``; first = 0); with ``audio``, the audio track too (one pass over the file)."""
    w, h = src_size if src_size else (analysis_width, analysis_width)
    aw = analysis_width
    ah = max(2, int(round(h * aw / w / 2)) * 2)
    hsv = [None]

    def score(rgb: np.ndarray) -> float:
        cur = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.int16)
        prev, hsv[0] = hsv[0], cur
        return 0.0 if prev is None else float(np.abs(cur - prev).mean())

    return scan(path, score, rotation=rotation, size=(aw, ah), fps=fps, fileobj=fileobj, audio=audio)


def find_shots(scores: np.ndarray, threshold: float, min_shot_frames: int) -> list[tuple[int, int]]:
    """Shots [start, end) from per-frame change scores."""
    n = len(scores)
    cuts = [0]
    for i in range(1, n):
        if scores[i] > threshold and i - cuts[-1] >= min_shot_frames:
            cuts.append(i)
    cuts.append(n)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def plan_windows(shots, src_fps: float, target_fps: float | None, min_frames: int, max_frames: int,
                 times: np.ndarray | None = None):
    """Clip windows for the shots; returns (fps of the clips, clips, dropped-shot counts).

    ``times``: each source frame's presentation time in seconds (default: a constant ``src_fps``, the mean
    rate). With a target rate, clip frames are the frames on display at the instants of a grid of
    ``min(target_fps, src_fps)`` per second started at the shot's first frame: evenly timed clips from
    variable-rate video (a frame shown longer than a grid step repeats), every frame of a constant-rate
    source at or below the target (never upsampled). Without one, every frame at the mean rate."""
    n = shots[-1][1] if shots else 0
    if times is None:
        times = np.arange(n, dtype=np.float64) / src_fps
    rate = min(float(target_fps), src_fps) if target_fps else None
    fps = rate if rate else src_fps
    clips: list[ClipPlan] = []
    dropped: dict[str, int] = {}
    for si, (a, b) in enumerate(shots):
        if rate:
            steps = int(math.floor((times[b - 1] - times[a]) * rate + 1e-6)) + 1
            grid = times[a] + np.arange(steps) / rate
            # the last frame shown by a quarter step after each instant: timing jitter and a mean rate a
            # hair off the true one never repeat or skip frames of a constant-rate source
            idx = np.searchsorted(times[a:b], grid + 0.25 / rate, side="right") - 1 + a
        else:
            idx = np.arange(a, b, dtype=np.int64)
            grid = times[idx]
        if len(idx) < min_frames:
            dropped["shot_too_short"] = dropped.get("shot_too_short", 0) + 1
            continue
        for win in np.array_split(np.arange(len(idx)), math.ceil(len(idx) / max_frames)):
            clips.append(ClipPlan(len(clips), si, idx[win].astype(np.int32), grid[win]))
    return fps, clips, dropped


def find_gaps(times: np.ndarray, factor: float = 4.0, min_gap_s: float = 0.25) -> list[tuple[float, float]]:
    """(before, after) times of frame intervals longer than ``factor`` x the median interval and
    ``min_gap_s``: frames the container lost (a damaged stretch the demuxer skipped), not the slower
    stretches of variable-rate video."""
    if len(times) < 3:
        return []
    d = np.diff(times)
    limit = max(factor * float(np.median(d)), min_gap_s)
    return [(float(times[i]), float(times[i + 1])) for i in np.flatnonzero(d > limit)]


def split_at_damage(shots: list[tuple[int, int]], times: np.ndarray, damaged: list[tuple[float, float]]
                    ) -> list[tuple[int, int]]:
    """Shots cut at the first good frame after each damaged stretch (no clip spans damage)."""
    cuts = {int(np.searchsorted(times, after, side="left")) for _, after in damaged}
    out = []
    for a, b in shots:
        inner = sorted(c for c in cuts if a < c < b)
        out += list(zip([a, *inner], [*inner, b]))
    return out


def plan_video(path: str, *, analysis_width: int, threshold: float, min_shot_frames: int,
               target_fps: float | None, min_frames: int, max_frames: int, min_seconds: float,
               open_fn=None, audio: bool = True) -> VideoPlan:
    """Probe, detect shots and plan clips, and cut each clip's audio (``audio``; runs in the isolated decoder
    process)."""
    fileobj = open_fn() if open_fn else None
    info = probe(path, fileobj=fileobj)
    if info.duration < min_seconds:
        raise VideoError("too_short", f"{path}: {info.duration:.2f} s is shorter than probe.min_seconds={min_seconds}")
    if fileobj is not None:
        fileobj.seek(0)
    try:
        sc = shot_scan(path, info.rotation, analysis_width, info.fps, fileobj=fileobj,
                       src_size=(info.width, info.height), audio=audio)
    except av.error.FFmpegError as e:
        raise VideoError("undecodable", f"{path}: decoding failed: {ffmpeg_words(e)}") from None
    scores = np.asarray(sc.values, dtype=np.float64)
    if len(scores) < min_frames:
        why = f" ({_damage_text(sc.damaged)} did not decode)" if sc.damaged else ""
        raise VideoError("too_short", f"{path}: {len(scores)} decodable frames, "
                                      f"fewer than plan.min_frames={min_frames}{why}")
    damaged = sorted(sc.damaged + find_gaps(sc.times))
    shots = split_at_damage(find_shots(scores, threshold, min_shot_frames), sc.times, damaged)
    src_fps = sc.mean_fps or info.fps
    fps, clips, dropped = plan_windows(shots, src_fps, target_fps, min_frames, max_frames, times=sc.times)
    if sc.pts is not None:
        for c in clips:
            c.pts = sc.pts[c.frame_index]
    for c in clips:  # the clip's span on the container clock: its first frame's time to its last frame's end
        if sc.audio is not None:
            t0 = sc.start_s + float(c.timestamps[0])
            samples, c.audio_status = sc.audio.cut(t0, t0 + audio_length(c.timestamps, fps) / AUDIO_RATE)
            c.audio = None if samples is None else encode_flac(samples)
    if sc.skipped:
        dropped["frames_with_repeated_timestamps"] = sc.skipped
    duration = float(sc.times[-1]) + 1.0 / src_fps
    return VideoPlan(info=info, n_frames=len(scores), shots=shots, fps=fps, clips=clips, dropped=dropped,
                     duration_s=duration, damaged=damaged, audio_problem=sc.audio.message if sc.audio else "")


def _damage_text(damaged: list[tuple[float, float]]) -> str:
    """``after 1.20 s until 1.96 s, ...`` (the edges: ``before the first frame``, ``to the end``)."""
    def one(a: float, b: float) -> str:
        start = "before the first decoded frame" if math.isinf(a) else f"after {a:.2f} s"
        return f"{start} {'to the end' if math.isinf(b) else f'until {b:.2f} s'}"

    return ", ".join(one(a, b) for a, b in damaged)
