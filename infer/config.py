"""Typed configuration of the animation job (``conf/infer.yaml``); built with :mod:`models.typed_config`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.typed_config import Choice, ConfigError, from_node

Weights = Choice("Weights", {"EMA": "ema", "MODEL": "model"})
Device = Choice("Device", {"AUTO": "auto", "CPU": "cpu", "CUDA": "cuda"})
DType = Choice("DType", {"AUTO": "auto", "FLOAT32": "float32", "BFLOAT16": "bfloat16"})
Placement = Choice("Placement", {"REFERENCE": "reference", "DRIVING": "driving"})


@dataclass
class SamplingConfig:
    segment_frames: int | None
    steps: int | None
    guidance_ref: float | None
    guidance_motion: float | None
    use_face: bool


@dataclass
class VideoConfig:
    height: int | None
    width: int | None
    fps: float | None
    max_frames: int | None
    max_side: int


@dataclass
class HeadSwayConfig:
    """The still head's natural motion when speech drives the face without a driving video (infer/talking.py)."""

    yaw_deg: float
    pitch_deg: float


@dataclass
class PseudoRefsConfig:
    enabled: bool
    frames: int
    max_yaw_deg: float


Delegate = Choice("Delegate", {"CPU": "cpu", "GPU": "gpu", "AUTO": "auto"})


@dataclass
class AnnotateConfig:
    chunk_frames: int
    delegate: Delegate | None  # MediaPipe delegate of every annotator (None: the annotators config's own)


@dataclass
class SamplesConfig:
    dir: str | None
    size: int
    n_frames: int
    fps: float


@dataclass
class InferConfig:
    reference: Any  # a path, a list of paths, or None
    driving: str | None
    driving_audio: str | None  # speech drives the face (the audio encoder); the output lasts as long as it
    checkpoint: str
    weights: Weights
    preset: str | None
    output: str
    device: Device
    dtype: DType
    seed: int
    sampling: SamplingConfig
    video: VideoConfig
    bone_adjust: bool
    placement: Placement
    side_by_side: bool
    copy_audio: bool
    pseudo_refs: PseudoRefsConfig
    head_sway: HeadSwayConfig
    annotate: AnnotateConfig
    samples: SamplesConfig
    annotators: dict[str, Any]
    video_stages: dict[str, Any] | None = None  # the annotators group's per-video stages: not used here


def to_config(node) -> InferConfig:
    """The typed config of a composed ``conf/infer.yaml``; values that cannot work are a ConfigError."""
    c = from_node(InferConfig, node, "infer")
    s, v, p = c.sampling, c.video, c.pseudo_refs
    if s.segment_frames is not None and (s.segment_frames < 5 or (s.segment_frames - 1) % 4):
        raise ConfigError(f"sampling.segment_frames={s.segment_frames}: use 1 + 4k frames, at least 5 (the VAE's "
                          "causal layout; the paper uses 73)")
    if s.steps is not None and s.steps < 1:
        raise ConfigError(f"sampling.steps={s.steps} is out of range: use a value >= 1")
    for k in ("guidance_ref", "guidance_motion"):
        g = getattr(s, k)
        if g is not None and g < 0:
            raise ConfigError(f"sampling.{k}={g} is out of range: use a value >= 0 (1 = no guidance)")
    if (v.height is None) != (v.width is None):
        raise ConfigError("video.height and video.width: give both or neither")
    if v.height is not None and (v.height < 16 or v.width < 16):
        raise ConfigError(f"video.height/width={v.height}x{v.width}: use at least 16 px each")
    if v.fps is not None and v.fps <= 0:
        raise ConfigError(f"video.fps={v.fps} is out of range: use a value > 0")
    if v.max_frames is not None and v.max_frames < 1:
        raise ConfigError(f"video.max_frames={v.max_frames} is out of range: use a value >= 1")
    if p.frames < 5 or (p.frames - 1) % 4:
        raise ConfigError(f"pseudo_refs.frames={p.frames}: use 1 + 4k frames, at least 5")
    if not 0 < p.max_yaw_deg <= 90:
        raise ConfigError(f"pseudo_refs.max_yaw_deg={p.max_yaw_deg} is out of range: use a value in (0, 90]")
    if c.driving_audio is not None and not s.use_face:
        raise ConfigError("driving_audio drives the face motion tokens: sampling.use_face must be true")
    if c.head_sway.yaw_deg < 0 or c.head_sway.pitch_deg < 0 or max(c.head_sway.yaw_deg, c.head_sway.pitch_deg) > 30:
        raise ConfigError(f"head_sway: yaw_deg and pitch_deg must be in [0, 30], got {c.head_sway.yaw_deg}, "
                          f"{c.head_sway.pitch_deg}")
    if c.annotate.chunk_frames < 1:
        raise ConfigError(f"annotate.chunk_frames={c.annotate.chunk_frames} is out of range: use a value >= 1")
    return c
