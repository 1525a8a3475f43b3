"""Typed configuration of the preprocessing job.

The values live in ``conf/preprocess.yaml`` (and its groups); this module only declares their
types and checks them, so Hydra stays the one source of defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, open_dict

from models.typed_config import Choice, ConfigError, from_node


class DecodeBackend(Choice):
    AUTO = "auto"  # PyAV (exact on timestamps; docs/performance.md)
    PYAV = "pyav"
    DECORD = "decord"


Verify = Choice("Verify", {"SIZE": "size", "DEEP": "deep"})


class X264Preset(Choice):
    ULTRAFAST = "ultrafast"
    SUPERFAST = "superfast"
    VERYFAST = "veryfast"
    FASTER = "faster"
    FAST = "fast"
    MEDIUM = "medium"
    SLOW = "slow"
    SLOWER = "slower"
    VERYSLOW = "veryslow"


@dataclass
class Resources:
    """What one worker of a stage asks the Ray scheduler for."""

    num_cpus: float
    num_gpus: float
    batch_size: int
    min_actors: int | None = None  # actor stages only (an actor pool of min..max workers; default 1..1)
    max_actors: int | None = None

    @property
    def pool(self) -> tuple[int, int]:
        """(min, max) workers of the actor pool."""
        return self.min_actors or 1, self.max_actors or 1


@dataclass
class StageSpec:
    """One pluggable stage: the class to run, whether it runs, its resources and its own params."""

    target: str
    enabled: bool
    resources: Resources | None = None  # clip stages: required; video stages run inside the shard writers: none
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class RayConfig:
    address: str | None  # None: start a local Ray; "auto" or "ray://host:10001": connect
    num_cpus: int | None  # local Ray only
    namespace: str
    progress_bars: bool
    block_bytes: int  # Ray Data's target block size (a block of one clip: an actor holds one clip at a time)


@dataclass
class SamplesConfig:
    dir: str | None  # where the built-in samples are generated; None: ~/.cache/dreamactor/samples
    size: int  # long side of the photo-made videos
    n_frames: int
    fps: float
    megamind: bool  # include opencv-doc's Megamind.avi when it is installed


@dataclass
class ProbeConfig:
    timeout_s: float  # per video, probe + shot detection, in an isolated process
    min_seconds: float  # shorter inputs are recorded as too_short
    key_bytes: int  # bytes read from each end of the file for the content key
    list_timeout_s: float = 30.0  # a manifest entry whose store does not answer in this time is a recorded failure


@dataclass
class PlanConfig:
    target_fps: float | None  # None: keep the source fps; never upsampled
    min_frames: int
    max_frames: int
    shot_threshold: float  # mean |ΔHSV| (0-255) between consecutive frames that marks a cut
    min_shot_frames: int  # a cut closer than this to the previous one is ignored
    analysis_width: int  # frames are downscaled to this width for shot detection


@dataclass
class DecodeConfig:
    backend: DecodeBackend
    max_side: int  # the stored clip's long side is at most this (0: source size)
    crf: int
    preset: X264Preset


@dataclass
class WriterConfig:
    shard_bytes: int
    num_writers: int
    num_cpus: float
    jpeg_quality: int
    commit_every_s: float  # a part is committed at the first video boundary once its oldest video waited this long


@dataclass
class LockConfig:
    """The output's lock (``preprocess/lock.py``): one run at a time per output."""

    stale_s: float  # a lock whose heartbeat is older is taken over (on its own host: once its process is gone)
    heartbeat_s: float
    settle_s: float  # object stores: the wait before the lease is read back


@dataclass
class PreprocessConfig:
    input: str | None  # dir, glob, manifest (.txt/.csv/.parquet) or URI; None: built-in samples
    output: str
    ray: RayConfig
    samples: SamplesConfig
    probe: ProbeConfig
    plan: PlanConfig
    decode: DecodeConfig
    writer: WriterConfig
    lock: LockConfig
    stages: dict[str, Resources]  # the engine's own stages: probe, decode, sink
    annotators: dict[str, StageSpec]  # clip stages in order (run on the decoded frames)
    video_stages: dict[str, StageSpec]  # per-video stages, run in the writer on a whole video
    fuse: Resources | None  # not None: the clip annotators run one after the other in one actor pool of these
    retry_failed: bool  # rerun videos whose failure was recorded by an earlier run
    verify: Verify  # size | deep (also the checksums): how a run checks the parts earlier runs committed
    progress_interval_s: float
    max_videos: int | None  # process at most this many inputs (smoke runs)


def to_config(cfg: DictConfig) -> PreprocessConfig:
    """Turn the composed Hydra config into typed objects and check the values."""
    cfg = cfg.copy()
    for section in ("annotators", "video_stages"):
        # A cluster profile (conf/cluster/*.yaml) tunes stage resources by stage name; entries for stages
        # that the chosen annotators= does not define have no target and are dropped here.
        specs = cfg.get(section) or {}
        with open_dict(cfg):
            cfg[section] = {k: v for k, v in specs.items() if v is not None and "target" in v}
    out: PreprocessConfig = from_node(PreprocessConfig, cfg, "")
    check(out)
    return out


def check(c: PreprocessConfig) -> None:
    """Reject values that cannot work, naming the key."""
    p = c.plan
    if p.min_frames < 1 or p.max_frames < p.min_frames:
        raise ConfigError(f"plan.min_frames={p.min_frames} / plan.max_frames={p.max_frames}: "
                          "need 1 <= min_frames <= max_frames")
    if p.max_frames < 2 * p.min_frames - 1:
        # A shot just longer than max_frames is split in two windows of >= min_frames each.
        raise ConfigError(f"plan.max_frames={p.max_frames} must be >= 2*plan.min_frames-1 "
                          f"({2 * p.min_frames - 1}) so long shots split into valid windows")
    if p.target_fps is not None and p.target_fps <= 0:
        raise ConfigError(f"plan.target_fps={p.target_fps} must be > 0 or null")
    if c.writer.shard_bytes < 1024:
        raise ConfigError(f"writer.shard_bytes={c.writer.shard_bytes}: shards are sized in bytes; use >= 1024 "
                          "(e.g. 536870912 for 512 MiB)")
    if c.writer.num_writers < 1:
        raise ConfigError("writer.num_writers must be >= 1")
    ranges = {  # key: (value, low, high, what the bounds mean)
        "decode.max_side": (c.decode.max_side, 0, None, "0 keeps the source size"),
        "decode.crf": (c.decode.crf, 0, 51, "x264's constant-rate factor"),
        "writer.jpeg_quality": (c.writer.jpeg_quality, 1, 100, "JPEG quality of stored reference frames"),
        "max_videos": (c.max_videos, 1, None, "null processes every input"),
        "probe.timeout_s": (c.probe.timeout_s, 1e-3, None, "seconds per video"),
        "probe.min_seconds": (c.probe.min_seconds, 0, None, "seconds"),
        "probe.key_bytes": (c.probe.key_bytes, 1, None, "bytes hashed from each end of a file"),
        "probe.list_timeout_s": (c.probe.list_timeout_s, 1e-3, None, "seconds per manifest entry"),
        "writer.commit_every_s": (c.writer.commit_every_s, 0, None, "seconds; 0 commits after every video"),
        "lock.heartbeat_s": (c.lock.heartbeat_s, 1e-2, None, "seconds between heartbeats of the output's lock"),
        "lock.stale_s": (c.lock.stale_s, 3 * c.lock.heartbeat_s, None, "seconds; at least 3 x lock.heartbeat_s"),
        "lock.settle_s": (c.lock.settle_s, 0, None, "seconds"),
        "ray.block_bytes": (c.ray.block_bytes, 1, None, "bytes of a Ray Data block"),
    }
    for key, (value, low, high, meaning) in ranges.items():
        if value is not None and (value < low or (high is not None and value > high)):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ConfigError(f"{key}={value} is out of range: use a value {span} ({meaning})")
    for name in ("probe", "decode", "sink"):
        if name not in c.stages:
            raise ConfigError(f"stages.{name} is missing (resources of the engine's {name} stage)")
    fused = {"": c.fuse} if c.fuse is not None else {}
    for group, specs in (("stages", c.stages), ("annotators", c.annotators), ("video_stages", c.video_stages),
                         ("fuse", fused)):
        for name, spec in specs.items():
            r = spec if isinstance(spec, Resources) else spec.resources
            where = (f"{group}.{name}" if name else group) + ("" if isinstance(spec, Resources) else ".resources")
            if group == "video_stages":
                if r is not None:
                    raise ConfigError(f"{where}: a video stage runs inside the shard writers (writer.num_cpus), "
                                      "it takes no resources of its own: remove the key")
                continue
            if r is None:
                raise ConfigError(f"{where} is missing: num_cpus, num_gpus, batch_size (+ min_actors, max_actors "
                                  "for a stage that runs as an actor pool)")
            if name == "sink" and group == "stages" and (r.min_actors is not None or r.max_actors is not None):
                raise ConfigError(f"{where}: the sink runs as Ray tasks, not an actor pool: remove min_actors/"
                                  "max_actors")
            if r.num_cpus < 0 or r.num_gpus < 0:
                raise ConfigError(f"{where}: num_cpus/num_gpus must be >= 0")
            if r.batch_size < 1:
                raise ConfigError(f"{where}.batch_size must be >= 1")
            if (r.min_actors is None) != (r.max_actors is None):
                raise ConfigError(f"{where}: give both min_actors and max_actors, or neither (1..1)")
            if r.min_actors is not None and not 1 <= r.min_actors <= r.max_actors:
                raise ConfigError(f"{where}: need 1 <= min_actors <= max_actors")
