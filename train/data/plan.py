"""The epoch plan: which samples form which batch, decided from shard metadata alone.

Everything here is a pure function of the seed, the window id and the shards' metadata (clip key,
frame count, fps, size, in tar order), so every process computes the same plan without reading a
frame, and a resumed run (any number of ranks or workers) agrees with the original one.

- Window ``g`` (global across epochs): epoch ``g // W``, where ``W`` windows of ``window_shards``
  shards each come from the epoch's permutation of the shard list (seeded by ``(seed, epoch)``).
- Sample order in a window: the window's shards interleaved round-robin in tar order, through a
  shuffle buffer of ``buffer`` samples (seeded by ``(seed, g)``): what a WebDataset shuffle buffer does,
  made reproducible, and bounded in memory when the consumer streams the shards.
- Per sample (seeded by ``(seed, epoch, key)``): the aspect-ratio bucket, the clip length T (1 + k tc),
  the first frame (window sampling; prefix sampling, what a latent cache serves, starts at frame 0), the
  primary reference frame, the order of the extra references, and the two CFG dropout flags (reference;
  motion = pose + face), drawn independently.
- Batches: samples join the pending batch of their (bucket, T); a batch is closed when it holds the
  bucket's batch size from the token budget; at the end of the window the pending batches are closed
  as they are (smaller). The reference count R is drawn per batch.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from preprocess import schema

from .config import DataConfig

log = logging.getLogger(__name__)
_warned_inside: set[int] = set()  # window lengths already warned about (once per process)


@dataclass(frozen=True)
class Geometry:
    """What the model imposes on a batch: VAE compression, patch size, face crop, pose-map channels."""

    temporal_compression: int
    spatial_compression: int
    patch_size: tuple[int, int, int]
    face_crop_size: int
    pose_channels: int

    @classmethod
    def of_model(cls, model_cfg) -> Geometry:
        """From a ``models.config.ModelConfig``."""
        return cls(model_cfg.vae.temporal_compression, model_cfg.vae.spatial_compression,
                   tuple(model_cfg.dit.patch_size), model_cfg.face_encoder.crop_size,
                   model_cfg.pose_encoder.in_channels)

    @property
    def size_multiple(self) -> int:
        """Bucket sides are multiples of this so the latent grid patchifies."""
        return self.spatial_compression * max(self.patch_size[1], self.patch_size[2])

    def tokens(self, frames: int, height: int, width: int, refs: int) -> int:
        """DiT tokens of one sample: video latent frames plus reference frames, times patches per frame."""
        t = 1 + (frames - 1) // self.temporal_compression
        per_frame = (height // (self.spatial_compression * self.patch_size[1])) * \
                    (width // (self.spatial_compression * self.patch_size[2]))
        return (math.ceil(t / self.patch_size[0]) + refs) * per_frame


@dataclass(frozen=True)
class ShardMeta:
    """The samples of one shard in tar order (from its stats file, or a scan of the tar)."""

    url: str
    keys: tuple[str, ...]
    n_frames: np.ndarray  # int
    fps: np.ndarray  # float
    width: np.ndarray  # int
    height: np.ndarray  # int


@dataclass(frozen=True)
class PlannedSample:
    """One sample of a batch and every random choice made for it."""

    key: str
    shard: int  # position of its shard in the window
    epoch: int
    frame_index: tuple[int, ...]  # T frames of the stored clip, increasing
    fps: float  # frame rate of the sampled frames
    primary_frame: int  # stored-clip frame used as the primary reference
    ref_order: tuple[int, ...]  # permutation of schema.REF_ROLES: extra references are tried in this order
    drop_ref: bool
    drop_motion: bool
    shift: tuple[float, float] = (0.0, 0.0)  # (dx, dy) of the driving frames against the references, bucket sides


@dataclass(frozen=True)
class PlannedBatch:
    """A batch: one bucket, one length, one reference count."""

    index: int  # position in the window's batch list
    height: int
    width: int
    frames: int
    refs: int
    samples: tuple[PlannedSample, ...]


@dataclass(frozen=True)
class WindowPlan:
    """The batches of one window and the samples left out while planning (by reason)."""

    window: int
    epoch: int
    shard_urls: tuple[str, ...]
    batches: tuple[PlannedBatch, ...]
    excluded: dict


def _seed_words(*parts) -> list[int]:
    """A SeedSequence entropy list from ints and strings (strings hashed stably)."""
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append(int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little"))
        else:
            out.append(int(p) & 0xFFFFFFFFFFFFFFFF)
    return out


def heldout_fraction(video_key: str, salt: str) -> float:
    """Where a source video falls in [0, 1) for the held-out split (a hash of its key and the salt)."""
    h = hashlib.sha256(f"{salt}:{video_key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def video_key_of(clip_key: str) -> str:
    """The source video's key of a clip key ``{video_key}_{clip_index:04d}`` (preprocess.schema.clip_key)."""
    return clip_key.rsplit("_", 1)[0]


def in_split(clip_key: str, split) -> bool:
    """Whether a clip belongs to the split's ``role`` (``data.split``); every clip when nothing is held out."""
    if split.heldout_percent <= 0:
        return True
    held = heldout_fraction(video_key_of(clip_key), split.salt) < split.heldout_percent / 100.0
    return held if split.role == "heldout" else not held


def rng(*parts) -> np.random.Generator:
    """A generator seeded by a tuple of ints / strings (independent streams for distinct tuples)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(_seed_words(*parts))))


@dataclass(frozen=True)
class Framing:
    """How a stored clip becomes model frames, from the data config and the model geometry alone: its
    aspect-ratio bucket, its frame stride, and for prefix sampling the frames and primary-reference candidates a
    latent cache holds. The loader and the latent-cache pass (``preprocess/latents.py``) both use it, and a cache
    records :meth:`rule`: one definition of what the cached latents were made for."""

    area: int
    aspect_ratios: tuple[float, ...]
    buckets: tuple[tuple[int, int], ...]  # (height, width) of each aspect ratio
    target_fps: float | None
    temporal_compression: int
    spatial_compression: int
    patch_size: tuple[int, int, int]
    primary_candidates: int

    @classmethod
    def of(cls, cfg: DataConfig, geometry: Geometry) -> Framing:
        """Buckets at ``data.buckets.area`` with sides rounded to the geometry's ``size_multiple``."""
        m, b = geometry.size_multiple, cfg.buckets
        buckets = tuple((max(m, int(round(math.sqrt(b.area * r) / m)) * m),
                         max(m, int(round(math.sqrt(b.area / r) / m)) * m)) for r in b.aspect_ratios)
        return cls(b.area, tuple(b.aspect_ratios), buckets, cfg.frames.target_fps, geometry.temporal_compression,
                   geometry.spatial_compression, tuple(geometry.patch_size), cfg.refs.primary_candidates)

    def bucket_of(self, width: int, height: int) -> int:
        """Index of the bucket whose aspect ratio is nearest (in log) to the clip's."""
        log_ratios = np.log([h / w for h, w in self.buckets])
        return int(np.argmin(np.abs(log_ratios - math.log(height / width))))

    def stride(self, fps: float) -> float:
        """Stored-clip frames per sampled frame (>= 1: never upsampled)."""
        return 1.0 if self.target_fps is None or fps <= self.target_fps else fps / self.target_fps

    def available(self, n_frames: int, fps: float) -> int:
        """Frames the clip gives at the stride."""
        return int(math.floor((n_frames - 1) / self.stride(fps) + 1e-9)) + 1

    def prefix(self, length: int, fps: float) -> tuple[int, ...]:
        """The stored-clip frames of the first ``length`` sampled frames."""
        stride = self.stride(fps)
        return tuple(int(round(i * stride)) for i in range(length))

    def cached_frames(self, n_frames: int, fps: float, max_frames: int) -> tuple[int, ...]:
        """The frames a latent cache encodes: the longest 1 + k * temporal_compression prefix at the stride, up to
        ``max_frames``. The VAE is causal, so the latents of every shorter such prefix are the leading latent
        frames of these (tests/train/data/test_latents.py)."""
        tc = self.temporal_compression
        n = min(self.available(n_frames, fps), max_frames)
        return self.prefix(1 + (n - 1) // tc * tc, fps)

    def candidates(self, n_frames: int) -> tuple[int, ...]:
        """Prefix sampling: the frames the primary reference is drawn from, ``primary_candidates`` evenly spaced
        over the clip, the first and the last included (their latents are cached)."""
        k = min(self.primary_candidates, n_frames)
        return tuple(int(x) for x in np.unique(np.round(np.linspace(0, n_frames - 1, k)).astype(np.int64)))

    def rule(self) -> dict:
        """What cached latents depend on besides the VAE (a cache made for another rule is refused)."""
        return {"area": self.area, "aspect_ratios": list(self.aspect_ratios),
                "buckets": [list(b) for b in self.buckets], "target_fps": self.target_fps,
                "temporal_compression": self.temporal_compression, "spatial_compression": self.spatial_compression,
                "patch_size": list(self.patch_size), "primary_candidates": self.primary_candidates, "crop": CROP_RULE}


# how the crop box of prefix sampling (and of a latent cache) is placed; a new placement is a new value
CROP_RULE = "subject union over every frame of the clip, bucket aspect, largest box (train.data.sample.crop_box)"


class Planner:
    """Plans windows for a fixed shard list, configuration, model geometry and seed."""

    def __init__(self, cfg: DataConfig, geometry: Geometry, shard_urls: list[str], seed: int):
        if not shard_urls:
            raise ValueError("no shards to plan over")
        self.cfg, self.geometry, self.seed = cfg, geometry, seed
        self.shard_urls = list(shard_urls)
        self.window_shards = cfg.shuffle.window_shards
        self.windows_per_epoch = math.ceil(len(self.shard_urls) / self.window_shards)
        self.framing = Framing.of(cfg, geometry)
        self.buckets: list[tuple[int, int]] = list(self.framing.buckets)
        self.prefix = cfg.sampling == "prefix"
        f = cfg.frames
        self.lengths = np.arange(f.min, f.max + 1, f.step)

    def settings(self) -> dict:
        """Everything the plan depends on besides the shard list and seed (for the cursor's fingerprint). Window
        sampling's settings are those of the loader before prefix sampling existed, so older cursors still load."""
        c = self.cfg
        refs = asdict(c.refs)
        candidates = refs.pop("primary_candidates")
        out = {"buckets": asdict(c.buckets), "frames": asdict(c.frames), "refs": refs,
               "dropout": asdict(c.dropout), "shuffle": asdict(c.shuffle), "geometry": asdict(self.geometry)}
        if self.prefix:
            out.update(sampling="prefix", primary_candidates=candidates)
        return out

    # ------------------------------------------------------------------ per-sample choices

    def bucket_of(self, width: int, height: int) -> int:
        """Index of the bucket whose aspect ratio is nearest (in log) to the clip's."""
        return self.framing.bucket_of(width, height)

    def batch_size(self, bucket: int, frames: int) -> int:
        """Clips per batch in ``bucket`` at ``frames`` frames: the token budget over one clip's tokens
        (counting the most references a batch may draw)."""
        h, w = self.buckets[bucket]
        per_clip = self.geometry.tokens(frames, h, w, self.cfg.refs.max)
        return int(min(self.cfg.buckets.max_batch_size, max(1, self.cfg.buckets.token_budget // per_clip)))

    def stride(self, fps: float) -> float:
        """Stored-clip frames per sampled frame (>= 1: never upsampled)."""
        return self.framing.stride(fps)

    def plan_sample(self, key: str, shard: int, epoch: int, n_frames: int, fps: float) -> PlannedSample | None:
        """The random choices of one sample; None when the clip is shorter than the shortest length.

        Window sampling: a random window of the clip, the primary reference any frame outside it. Prefix sampling
        (what a latent cache serves): the first frames of the clip, the primary reference one of the framing's
        candidates outside them (any candidate when the window covers them all)."""
        stride = self.stride(fps)
        allowed = self.lengths[self.lengths <= self.framing.available(n_frames, fps)]
        if not len(allowed):
            return None
        g = rng(self.seed, epoch, key)
        t = int(g.choice(allowed))
        if self.prefix:
            idx, frames = self.framing.prefix(t, fps), self.framing.candidates(n_frames)
        else:
            span = int(round((t - 1) * stride))
            start = int(g.integers(0, n_frames - span))
            idx, frames = tuple(start + int(round(i * stride)) for i in range(t)), range(n_frames)
        outside = [i for i in frames if i < idx[0] or i > idx[-1]]
        if self.cfg.refs.primary_outside_window and not outside and t not in _warned_inside:
            _warned_inside.add(t)
            log.warning("data.refs.primary_outside_window: clip %s has %d frames and a %d-frame window covers it, so "
                        "its primary reference is one of the frames to generate (a copy of it scores as if animated); "
                        "clips longer than the window avoid this", key, n_frames, t)
        pool = outside if (self.cfg.refs.primary_outside_window and outside) else list(frames)
        primary = int(pool[int(g.integers(0, len(pool)))])
        order = tuple(int(x) for x in g.permutation(len(schema.REF_ROLES)))
        drop_ref = bool(g.random() < self.cfg.dropout.ref)
        drop_motion = bool(g.random() < self.cfg.dropout.motion)
        a = self.cfg.augment.shift  # drawn last and only when on: every other choice stays what it was without it
        shift = (float(g.uniform(-a, a)), float(g.uniform(-a, a))) if a else (0.0, 0.0)
        return PlannedSample(key, shard, epoch, idx, float(fps) / stride, primary, order, drop_ref, drop_motion, shift)

    # ------------------------------------------------------------------ windows

    def epoch_shards(self, epoch: int) -> np.ndarray:
        """The epoch's shard order (indices into the shard list)."""
        return rng(self.seed, "shards", epoch).permutation(len(self.shard_urls))

    def window_shard_urls(self, window: int) -> tuple[int, list[str]]:
        """(epoch, shard URLs) of global window ``window``."""
        epoch, w = divmod(window, self.windows_per_epoch)
        order = self.epoch_shards(epoch)[w * self.window_shards:(w + 1) * self.window_shards]
        return epoch, [self.shard_urls[i] for i in order]

    def sample_order(self, window: int, metas: list[ShardMeta | None]) -> list[tuple[int, int]]:
        """(shard position, row) of every sample in the window's shuffled order (see the module doc)."""
        queues = [list(range(len(m.keys))) if m is not None else [] for m in metas]
        stream = []
        for i in range(max((len(q) for q in queues), default=0)):
            stream.extend((s, q[i]) for s, q in enumerate(queues) if i < len(q))
        g = rng(self.seed, "buffer", window)
        size = self.cfg.shuffle.buffer
        buf: list[tuple[int, int]] = []
        out = []
        for item in stream:
            if len(buf) < size:
                buf.append(item)
                continue
            j = int(g.integers(0, size))
            out.append(buf[j])
            buf[j] = item
        out.extend(buf[j] for j in g.permutation(len(buf)))
        return out

    def plan_window(self, window: int, metas: list[ShardMeta | None]) -> WindowPlan:
        """The batches of window ``window`` given its shards' metadata (None: shard unreadable)."""
        epoch, urls = self.window_shard_urls(window)
        excluded: dict[str, int] = {}
        pending: dict[tuple[int, int], list[PlannedSample]] = {}
        closed: list[tuple[int, int, list[PlannedSample]]] = []  # (bucket, frames, samples) in closing order
        for s, row in self.sample_order(window, metas):
            m = metas[s]
            if not in_split(m.keys[row], self.cfg.split):  # the other side of the held-out split: not a skip
                continue
            ps = self.plan_sample(m.keys[row], s, epoch, int(m.n_frames[row]), float(m.fps[row]))
            if ps is None:
                excluded["samples/too_short"] = excluded.get("samples/too_short", 0) + 1
                continue
            b = self.bucket_of(int(m.width[row]), int(m.height[row]))
            k = (b, len(ps.frame_index))
            pending.setdefault(k, []).append(ps)
            if len(pending[k]) >= self.batch_size(*k):
                closed.append((*k, pending.pop(k)))
        closed.extend((*k, v) for k, v in pending.items())  # dict order = order of first member
        g = rng(self.seed, "refs", window)
        batches = []
        for i, (b, t, samples) in enumerate(closed):
            h, w = self.buckets[b]
            refs = int(g.integers(self.cfg.refs.min, self.cfg.refs.max + 1))
            batches.append(PlannedBatch(i, h, w, t, refs, tuple(samples)))
        return WindowPlan(window, epoch, tuple(urls), tuple(batches), excluded)
