"""The worker side: an IterableDataset whose every DataLoader worker is one *consumer* that streams whole
windows of shards and turns their planned batches into :class:`DreamActorBatch` es.

A consumer reads each shard of its window once, front to back, and keeps only the members of samples
still to be delivered; a sample waits in memory from the moment it is read until its batch is complete
(at most about the shuffle buffer plus the open batches). Bad input never stops the stream: a shard that
is missing or breaks off, a sample with a missing or malformed field, a clip that does not decode are
skipped and counted (``skips`` of the next batch, ``"samples/<reason>"``, ``"shards/<reason>"``), and
logged. A batch that loses every sample is counted (``"batches/empty"``) and the next one is served.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import torch

from .batch import DreamActorBatch
from .config import DataConfig
from .plan import PlannedBatch, Planner, WindowPlan
from .sample import AUDIO, PIXEL_MEMBERS, Sample, SampleError, build_sample
from .source import ShardError, iter_samples, load_shard_meta, sidecar_url, with_sidecar

log = logging.getLogger(__name__)


class _Skips:
    """Skip counter of one consumer, with rate-limited logging."""

    def __init__(self, log_first: int):
        self.delta: Counter = Counter()
        self.logged: Counter = Counter()
        self.log_first = log_first

    def add(self, reason: str, n: int, message: str) -> None:
        if n <= 0:
            return
        self.delta[reason] += n
        self.logged[reason] += 1
        level = logging.WARNING if self.logged[reason] <= self.log_first else logging.DEBUG
        log.log(level, "data: skipped %d (%s): %s", n, reason, message)

    def take(self) -> dict:
        out, self.delta = dict(self.delta), Counter()
        return out


class _WindowReader:
    """Members of the samples a window still needs, read from its shards on demand, each shard once (and its latent
    cache sidecar beside it, when ``latents`` names the cache)."""

    def __init__(self, plan: WindowPlan, batches: list[PlannedBatch], cfg: DataConfig, skips: _Skips,
                 latents: str | None = None, audio: bool = True):
        self.cfg, self.skips, self.latents = cfg, skips, latents
        self.unread = frozenset(PIXEL_MEMBERS if latents is not None else ()) | \
            frozenset(() if audio else (AUDIO.member,))  # members no sample of this reader uses
        self.urls = plan.shard_urls
        self.needed: list[set[str]] = [set() for _ in self.urls]
        for b in batches:
            for s in b.samples:
                self.needed[s.shard].add(s.key)
        self.streams: dict[int, object] = {}
        self.have: dict[str, dict] = {}
        self.lost: dict[str, str] = {}  # key -> reason, for samples that will never arrive

    def _stream(self, shard: int):
        if shard not in self.streams:
            keys, unread = self.needed[shard], self.unread
            main = iter_samples(self.urls[shard], self.cfg.source, select=lambda k, m: k in keys and m not in unread)
            if self.latents is None:
                self.streams[shard] = main
            else:  # the pixels are not read: their latents come from the sidecar
                side = iter_samples(sidecar_url(self.latents, self.urls[shard]), self.cfg.source,
                                    select=lambda k, m: k in keys)
                self.streams[shard] = with_sidecar(main, side)
        return self.streams[shard]

    def get(self, shard: int, key: str) -> dict | None:
        """The members of ``key`` (None when the sample cannot be had; the reason is in ``lost``)."""
        while key not in self.have and key not in self.lost:
            stream = self._stream(shard)
            if stream is None:
                self.lost[key] = "shard_unreadable"
                break
            try:
                k, members = next(stream)
            except StopIteration:
                self.streams[shard] = None
                rest = self.needed[shard] - set(self.have) - set(self.lost)
                for r in rest:  # counted per sample when its batch is built
                    self.lost[r] = "not_in_shard"
                continue
            except ShardError as e:
                self.streams[shard] = None
                self.skips.add(f"shards/{e.reason}", 1, str(e))
                for r in self.needed[shard] - set(self.have) - set(self.lost):
                    self.lost[r] = e.reason
                continue
            if k in self.needed[shard]:
                self.have[k] = members
        return self.have.pop(key, None)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches of this rank's consumers; DataLoader worker ``k`` plays role ``(k + first_role) % K``."""

    def __init__(self, cfg: DataConfig, planner: Planner, render_cfg, groups: list[str], assignment,
                 consumers: list[int], positions: list[tuple[int, int]], first_role: int, *,
                 quarantine: frozenset = frozenset(), inflight_dir: str | None = None, latents: str | None = None,
                 audio: bool = False):
        self.cfg, self.planner, self.render_cfg, self.groups = cfg, planner, render_cfg, list(groups)
        self.latents = latents  # the latent cache's URL (data.latents=true), else None
        self.audio = audio  # batches carry the sampled frames' audio
        self.assignment, self.consumers, self.positions = assignment, list(consumers), list(positions)
        self.first_role = first_role
        self.quarantine = quarantine  # samples that killed a worker before: skipped
        self.inflight_dir = inflight_dir  # where a worker notes the sample it builds (see loader.__iter__)

    def _note_inflight(self, key: str) -> None:
        """Record the sample this process is building, so that the loader can quarantine it if we die."""
        if self.inflight_dir is not None:
            with open(os.path.join(self.inflight_dir, str(os.getpid())), "w") as f:
                f.write(key)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k = 0 if info is None else info.id
        n = 1 if info is None else info.num_workers
        if n != len(self.consumers) and info is not None:
            raise RuntimeError(f"{n} DataLoader workers for {len(self.consumers)} consumer roles")
        if info is None and len(self.consumers) > 1:
            raise RuntimeError("in-process iteration serves one consumer; use workers.num_workers >= 1")
        role = (k + self.first_role) % len(self.consumers)
        return self.consume(role)

    # ------------------------------------------------------------------ one consumer

    def window_plan(self, window: int, skips: _Skips | None = None) -> WindowPlan:
        """Plan window ``window``; unreadable shards' metadata is counted in ``skips``."""
        _, urls = self.planner.window_shard_urls(window)
        metas = []
        for u in urls:
            try:
                metas.append(load_shard_meta(u, self.cfg.source))
            except ShardError as e:
                metas.append(None)
                if skips is not None:
                    skips.add(f"shards/{e.reason}", 1, str(e))
        return self.planner.plan_window(window, metas)

    def consume(self, role: int):
        """Batches of consumer ``self.consumers[role]`` from its position on, each tagged with its cursor."""
        c = self.consumers[role]
        p, b = self.positions[role]
        skips = _Skips(self.cfg.log_skips)
        while True:
            window, start = self.assignment.item(c, p)
            b0 = max(b, start)
            plan = self.window_plan(window, skips if b0 == 0 else None)
            if b0 == 0:
                for reason, count in plan.excluded.items():
                    skips.add(reason, count, f"window {window}: {count} clips shorter than data.frames.min")
            todo = list(plan.batches[b0:])
            reader = _WindowReader(plan, todo, self.cfg, skips, self.latents, self.audio)
            for pb in todo:
                batch = self.make_batch(pb, plan, reader, skips)
                if batch is None:
                    skips.add("batches/empty", 1, f"window {window} batch {pb.index}: every sample skipped")
                    continue
                batch.cursor = {"role": role, "p": p, "b": pb.index + 1, "window": window}
                batch.skips = skips.take()
                yield batch
            p, b = p + 1, 0

    def make_batch(self, pb: PlannedBatch, plan: WindowPlan, reader: _WindowReader, skips: _Skips):
        """Read, decode and stack one planned batch; None when no sample survives."""
        samples: list[tuple[object, Sample]] = []
        for ps in pb.samples:
            if ps.key in self.quarantine:
                skips.add("samples/worker_died", 1, f"{ps.key}: quarantined (it killed a worker before)")
                continue
            members = reader.get(ps.shard, ps.key)
            if members is None:
                reason = reader.lost.get(ps.key, "not_in_shard")
                skips.add(f"samples/{reason}", 1, f"{ps.key} ({plan.shard_urls[ps.shard]})")
                continue
            self._note_inflight(ps.key)
            g = self.planner.geometry
            try:
                s = build_sample(members, ps, pb.height, pb.width, self.groups, self.render_cfg,
                                 face_crops=self.cfg.face_crops, face_size=g.face_crop_size,
                                 decode_threads=self.cfg.workers.decode_threads, decoder=self.cfg.workers.decoder,
                                 prefix=self.planner.prefix, latents=self.latents is not None,
                                 compression=(g.temporal_compression, g.spatial_compression), audio=self.audio)
            except SampleError as e:
                skips.add(f"samples/{e.reason}", 1, f"{ps.key} ({plan.shard_urls[ps.shard]}): {e}")
                continue
            finally:
                self._note_inflight("")
            samples.append((ps, s))
        if not samples:
            return None
        return collate(samples, pb.refs)


def collate(samples: list[tuple[object, Sample]], refs: int) -> DreamActorBatch:
    """Stack samples of one bucket/length into a batch with ``refs`` references each (images, or latents for
    samples from the latent cache)."""
    ref_imgs, ref_valid = [], []
    for _, s in samples:
        have = s.refs[:refs]
        ref_valid.append([True] * len(have) + [False] * (refs - len(have)))
        ref_imgs.append(np.stack(have + [s.refs[0]] * (refs - len(have))))

    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x))

    def stack(arrays):  # one sample (the long clips of prod): a view, not a copy of hundreds of MB
        return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)

    ps = [p for p, _ in samples]
    ss = [s for _, s in samples]
    faces = None if ss[0].face_crops is None else t(np.stack([s.face_crops for s in ss])).permute(0, 1, 4, 2, 3)
    cached = ss[0].video is None
    return DreamActorBatch(
        keys=[s.key for s in ss],
        epoch=torch.tensor([p.epoch for p in ps], dtype=torch.int64),
        # (B, T, H, W, C) in memory, viewed as (B, C, T, H, W): torch.channels_last_3d, no transposing copy
        video=None if cached else t(stack([s.video for s in ss])).permute(0, 4, 1, 2, 3),
        ref_images=None if cached else t(np.stack(ref_imgs)).permute(0, 1, 4, 2, 3).contiguous(),
        video_latents=t(np.stack([s.video_latents for s in ss])) if cached else None,
        ref_latents=t(np.stack(ref_imgs)).permute(0, 2, 1, 3, 4).contiguous() if cached else None,  # (B, C, R, h, w)
        ref_valid=torch.tensor(ref_valid, dtype=torch.bool),
        skeleton_maps=t(stack([s.skeleton_maps for s in ss])).permute(0, 4, 1, 2, 3),
        head_sphere_maps=t(stack([s.head_sphere_maps for s in ss])).permute(0, 4, 1, 2, 3),
        face_crops=None if faces is None else faces.contiguous(),
        face_valid=t(np.stack([s.face_valid for s in ss])),
        body_valid=t(np.stack([s.body_valid for s in ss])),
        head_valid=t(np.stack([s.head_valid for s in ss])),
        drop_ref=torch.tensor([p.drop_ref for p in ps], dtype=torch.bool),
        drop_motion=torch.tensor([p.drop_motion for p in ps], dtype=torch.bool),
        frame_index=torch.tensor([p.frame_index for p in ps], dtype=torch.int64),
        fps=torch.tensor([p.fps for p in ps], dtype=torch.float32),
        crop_transform=t(np.stack([s.transform for s in ss]).astype(np.float32)),
        **_audio_rows(ss),
    )


def _audio_rows(ss: list[Sample]) -> dict:
    """``audio`` (B, S) float32, rows zero-padded to the longest, and ``audio_samples`` (B,); nothing when the samples
    carry no audio (the loader does not load it)."""
    if ss[0].audio is None:
        return {}
    rows = np.zeros((len(ss), max(len(s.audio) for s in ss)), np.float32)
    for i, s in enumerate(ss):
        rows[i, :len(s.audio)] = s.audio
    return {"audio": torch.from_numpy(rows),
            "audio_samples": torch.tensor([s.audio_samples for s in ss], dtype=torch.int64)}
