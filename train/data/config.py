"""Typed configuration of the training data loader. The values live in ``conf/data/*.yaml`` (the only
source of defaults); these dataclasses give them types, and :func:`to_config` checks them.

With Hydra: ``to_config(cfg.data)``. The model side (VAE compression, patch size, renderer settings,
face-crop size) is not repeated here: :func:`train.data.build_loader` takes the ``ModelConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from models.typed_config import Choice, ConfigError, from_node

DataConfigError = ConfigError  # the one configuration error (models.typed_config); the old name stays


Decoder = Choice("Decoder", {"DECORD": "decord", "PYAV": "pyav"})
StartMethod = Choice("StartMethod", {"FORK": "fork", "FORKSERVER": "forkserver", "SPAWN": "spawn"})
Sampling = Choice("Sampling", {"AUTO": "auto", "WINDOW": "window", "PREFIX": "prefix"})
Auto = Choice("Auto", {"AUTO": "auto"})


@dataclass
class SourceConfig:
    """Where the shards are: a dataset written by ``preprocess/run.py`` or a list of shard URLs."""

    dataset: str | None  # dir or URL with index.parquet + shards/ (preferred)
    shards: list[str] | None  # shard URLs or brace patterns ("s3://b/shards/{0000..0099}.tar"); local globs
    storage_options: dict[str, Any]  # fsspec options (endpoint, credentials profile)
    require_groups: list[str]  # schema groups a sample must carry
    read_retries: int  # retries of a failed shard open/read before the shard counts as unreadable
    latents: str | None  # the latent cache (preprocess/latents.py cache=); None: <dataset>/latents


@dataclass
class BucketConfig:
    """Aspect-ratio buckets at a fixed pixel area (paper 4.1: area 960x640, aspect kept)."""

    area: int  # pixels per frame (960 * 640)
    aspect_ratios: list[float]  # height / width of each bucket
    token_budget: int  # DiT tokens per micro-batch (video + references); sets the batch size per bucket
    max_batch_size: int


@dataclass
class FramesConfig:
    """Clip length drawn per sample from {min, min + step, ..., max} (paper 4.1: 25-121 frames)."""

    min: int
    max: int
    step: int  # multiple of the VAE's temporal compression so every length is 1 + k * tc
    target_fps: float | None  # null: the clip's fps; else frames are resampled (never upsampled)


@dataclass
class RefsConfig:
    """Reference images per sample (paper 3.3): the primary (a frame of the clip) plus yaw-sorted ones."""

    min: int  # references per batch, drawn per batch in [min, max]
    max: int
    primary_outside_window: bool  # take the primary reference from clip frames outside the window if any
    primary_candidates: int  # prefix sampling: the primary is one of this many evenly spaced frames (cached)


@dataclass
class AugmentConfig:
    """Random changes of a training sample that keep it true (the controls move with the frames)."""

    shift: float  # driving frames + their control maps translated against the references by up to this fraction
    #               of the bucket side per axis (uniform per sample; 0: off). The references keep their framing, so
    #               where the person is in a reference no longer says where they are in the clip: only the pose does


@dataclass
class DropoutConfig:
    """Classifier-free-guidance condition dropout, drawn per sample and independently (dual CFG)."""

    ref: float
    motion: float  # pose maps + face motion together


@dataclass
class ShuffleConfig:
    """Deterministic shuffling: epoch-seeded shard order, then a sample buffer over windows of shards."""

    window_shards: int  # shards read together (interleaved) by one consumer; the buffer mixes them
    buffer: int  # samples in the shuffle buffer of a window


@dataclass
class WorkersConfig:
    """torch DataLoader workers of one rank."""

    num_workers: int
    prefetch_factor: int
    pin_memory: bool
    decoder: Decoder  # the reader of the stored clips (both from the tar bytes in memory)
    decode_threads: int  # decoder threads per worker (1: the parallelism is the workers)
    start_method: StartMethod  # how worker processes start (see docs/data-loader.md)
    max_restarts: int  # worker deaths survived per iterator (the sample being built is quarantined each time)


Role = Choice("Role", {"TRAIN": "train", "HELDOUT": "heldout"})


@dataclass
class SplitConfig:
    """A held-out split by source video: a video is held out when the hash of its key (with ``salt``) falls
    in the first ``heldout_percent`` percent. A pure function of the key, so training (``role=train``) and the
    evaluation (``role=heldout``) agree without a list to ship; the evaluation writes the list it used."""

    heldout_percent: float  # 0: nothing held out
    role: Role  # train: the other videos | heldout: only the held-out ones
    salt: str


@dataclass
class DataConfig:
    """Everything the loader needs besides the model config."""

    source: SourceConfig
    buckets: BucketConfig
    frames: FramesConfig
    refs: RefsConfig
    dropout: DropoutConfig
    augment: AugmentConfig
    shuffle: ShuffleConfig
    workers: WorkersConfig
    face_crops: bool  # decode face.mp4 (stage 1 trains without face motion tokens: false saves CPU)
    latents: bool  # read VAE latents from the latent cache (preprocess/latents.py) instead of decoding pixels
    sampling: Sampling  # window | prefix (what a latent cache serves) | auto: prefix exactly when latents
    audio: bool | Auto  # the sampled frames' audio in each batch: true | false | auto (when the dataset has audio)
    log_skips: int  # skips logged at WARNING per reason and worker; the rest at DEBUG
    split: SplitConfig


def to_config(cfg) -> DataConfig:
    """The composed ``data`` node (DictConfig or dict) as a checked :class:`DataConfig`."""
    try:
        out: DataConfig = from_node(DataConfig, cfg, "data")
    except ConfigError as e:
        raise ConfigError(f"bad data config: {e}") from None
    check(out)
    return out


def check(c: DataConfig, temporal_compression: int | None = None) -> None:
    """Reject values that cannot work, naming the key."""
    from preprocess import schema

    if (c.source.dataset is None) == (not c.source.shards):
        raise ConfigError("set exactly one of data.source.dataset (a preprocess output) or data.source.shards")
    unknown = set(c.source.require_groups) - set(schema.GROUPS)
    if unknown:
        raise ConfigError(f"data.source.require_groups: unknown groups {sorted(unknown)}; known {list(schema.GROUPS)}")
    if c.sampling == "auto":  # resolved here, once: the typed config says which sampling runs
        c.sampling = "prefix" if c.latents else "window"
    if c.latents and c.sampling != "prefix":
        raise ConfigError("data.latents=true draws every clip as a prefix of its cached latents: data.sampling must "
                          "be prefix or auto, not window")
    if not 0.0 <= c.augment.shift < 0.5:
        raise ConfigError(f"data.augment.shift={c.augment.shift} must be in [0, 0.5) (a fraction of the bucket side)")
    if c.augment.shift and c.latents:
        raise ConfigError("data.augment.shift translates decoded frames; a latent cache (data.latents=true) holds them "
                          "encoded unshifted: set data.augment.shift=0 or data.latents=false")
    if c.refs.primary_candidates < 1:
        raise ConfigError(f"data.refs.primary_candidates={c.refs.primary_candidates} must be >= 1")
    f = c.frames
    if not 1 <= f.min <= f.max or f.step < 1:
        raise ConfigError(f"data.frames: need 1 <= min <= max and step >= 1, got {f.min}/{f.max}/{f.step}")
    if temporal_compression:
        tc = temporal_compression
        if (f.min - 1) % tc or f.step % tc:
            raise ConfigError(f"data.frames.min={f.min} / step={f.step}: lengths must be 1 + k*{tc} "
                                  f"(the VAE's temporal compression): min-1 and step multiples of {tc}")
    if f.target_fps is not None and f.target_fps <= 0:
        raise ConfigError(f"data.frames.target_fps={f.target_fps} must be > 0 or null")
    b = c.buckets
    if b.area <= 0 or not b.aspect_ratios or any(a <= 0 for a in b.aspect_ratios):
        raise ConfigError("data.buckets: area > 0 and a non-empty list of positive aspect_ratios (height/width)")
    if b.token_budget <= 0 or b.max_batch_size < 1:
        raise ConfigError("data.buckets.token_budget must be > 0 and max_batch_size >= 1")
    if not 1 <= c.refs.min <= c.refs.max:
        raise ConfigError(f"data.refs: need 1 <= min <= max, got {c.refs.min}/{c.refs.max}")
    for k in ("ref", "motion"):
        p = getattr(c.dropout, k)
        if not (0.0 <= p <= 1.0 and math.isfinite(p)):
            raise ConfigError(f"data.dropout.{k}={p} must be a probability")
    if not 0.0 <= c.split.heldout_percent <= 100.0:
        raise ConfigError(f"data.split.heldout_percent={c.split.heldout_percent} is out of range: use [0, 100]")
    if c.split.role == "heldout" and c.split.heldout_percent <= 0:
        raise ConfigError("data.split.role=heldout needs data.split.heldout_percent > 0")
    if c.shuffle.window_shards < 1 or c.shuffle.buffer < 1:
        raise ConfigError("data.shuffle.window_shards and data.shuffle.buffer must be >= 1")
    if c.workers.num_workers < 0 or c.workers.prefetch_factor < 1:
        raise ConfigError("data.workers.num_workers >= 0 and prefetch_factor >= 1")
