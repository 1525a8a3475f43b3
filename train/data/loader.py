"""The rank-level loader: a torch DataLoader over :class:`train.data.dataset.ShardStream`, plus the cursor.

How the work is split (docs/data-loader.md has the full semantics):

- The epoch's shards are permuted from ``(seed, epoch)`` and cut into *windows* of
  ``shuffle.window_shards`` shards; windows of successive epochs form one global window stream
  ``g = 0, 1, 2, ...``. A window's batches are a pure function of ``(seed, g)`` and the shards'
  metadata (:mod:`train.data.plan`), never of the number of ranks or workers.
- Every rank has ``K = max(1, num_workers)`` workers; consumer ``c = rank * K + k`` reads whole windows
  (each shard once, sequentially) and yields their batches in order. An :class:`Assignment` says which
  windows each consumer gets: first its share of a list of leftover (partly consumed) windows, then
  ``base + c, base + c + C, base + c + 2C, ...`` (``C`` consumers in all). Streams are endless (epochs
  chain), so no rank is ever starved.
- The cursor is, per consumer, ``(p, b)``: the next batch is planned batch ``b`` of the ``p``-th window
  of its sequence. The DataLoader serves workers round-robin, so the rank also records which worker
  comes next. Batches carry the position they leave their consumer at, and the cursor only advances
  when the trainer receives a batch: prefetched batches are never counted.
- Resume, same world size and workers: every consumer continues from ``(p, b)`` and the worker
  rotation is restored, so the batches are exactly those of an uninterrupted run. Different topology:
  the remaining work (the rest of every partly read window, every window some consumer had not reached)
  becomes the new leftover list, shared round-robin by the new consumers before they continue with
  the untouched windows: no sample twice, none left out.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter

import torch

from .config import DataConfig, DataConfigError, check
from .dataset import ShardStream
from .plan import Framing, Geometry, Planner
from .sample import require_decoder
from .source import dataset_audio, latent_cache_url, resolve_source

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Which windows each of ``consumers`` consumers reads, in order (see the module doc)."""

    leftover: tuple[tuple[int, int], ...]  # (window id, first planned batch) shared round-robin first
    base: int  # first window of the regular stream
    consumers: int

    def n_leftover(self, c: int) -> int:
        """Leftover items of consumer ``c``."""
        n = len(self.leftover)
        return 0 if c >= n else (n - c + self.consumers - 1) // self.consumers

    def item(self, c: int, p: int) -> tuple[int, int]:
        """(window id, first planned batch) of the ``p``-th item of consumer ``c``."""
        nl = self.n_leftover(c)
        if p < nl:
            return self.leftover[c + p * self.consumers]
        return self.base + c + (p - nl) * self.consumers, 0

    def remaining(self, positions: list[tuple[int, int]]) -> Assignment:
        """The canonical assignment of everything not yet delivered, for any number of consumers.

        ``positions[c] = (p, b)``: consumer ``c`` delivered everything before planned batch ``b`` of its
        item ``p``. Returns ``leftover`` sorted by window id and ``base`` past every touched window
        (set ``consumers`` with :func:`dataclasses.replace`).
        """
        if len(positions) != self.consumers:
            raise ValueError(f"{len(positions)} positions for {self.consumers} consumers")
        left: list[tuple[int, int]] = []
        next_regular = []
        for c, (p, b) in enumerate(positions):
            g, start = self.item(c, p)
            left.append((g, max(b, start)))
            nl = self.n_leftover(c)
            left.extend(self.item(c, q) for q in range(p + 1, nl))  # leftovers it had not reached
            first_regular = self.base + c + max(0, p + 1 - nl) * self.consumers
            next_regular.append(first_regular)
        new_base = max(next_regular)
        for r in next_regular:
            left.extend((g, 0) for g in range(r, new_base, self.consumers))  # untouched windows below new_base
        return Assignment(tuple(sorted(left)), new_base, self.consumers)


# torch's messages: "DataLoader worker (pid(s) 12, 13) exited unexpectedly" (timeout path), "DataLoader worker
# (pid 12) is killed by signal: Aborted." / "... exited unexpectedly with exit code 1" (SIGCHLD handler)
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (?:exited unexpectedly|is killed by signal)")


def _inflight_keys(directory: str, pid: int) -> list[str]:
    """The sample a worker process was building (written by :meth:`ShardStream.make_batch`)."""
    try:
        with open(os.path.join(directory, str(pid))) as f:
            return [k for k in f.read().split() if k]
    except FileNotFoundError:
        return []


def _identity(x):
    """DataLoader collate for already-batched items (module level: picklable)."""
    return x


def _worker_init(_):
    """One thread per worker: the parallelism is the workers. Workers ignore SIGTERM: torchrun, Slurm and
    Kubernetes signal the whole process group on preemption, and a worker that died with it could leave one
    rank without its next batch while the others already run the step's collectives (a hang or a crash
    instead of the preemption checkpoint). The trainer finishes the step, checkpoints and shuts its workers
    down; workers still exit on their own when the trainer process is gone (DataLoader's parent watchdog)."""
    import signal

    import cv2

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class DreamActorLoader:
    """Endless, resumable stream of :class:`~train.data.batch.DreamActorBatch` for one rank."""

    def __init__(self, cfg: DataConfig, geometry: Geometry, render_cfg, *, rank: int, world_size: int, seed: int,
                 shard_urls: list[str], groups: list[str], latents: str | None = None, audio: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cfg, self.geometry, self.render_cfg = cfg, geometry, render_cfg
        self.latents = latents  # the latent cache the samples' latents come from (None: pixels)
        self.audio = audio  # batches carry the sampled frames' audio (data.audio, resolved against the dataset)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shard_urls, self.groups = list(shard_urls), list(groups)
        self.workers = max(1, cfg.workers.num_workers)
        self.planner = Planner(cfg, geometry, self.shard_urls, seed)
        self.assignment = Assignment((), 0, world_size * self.workers)
        self.positions = [(0, 0)] * self.workers  # this rank's consumers, by worker role
        self.next_role = 0
        self.steps = 0
        self._skips: Counter = Counter()
        self.quarantine: set[str] = set()  # samples that killed a worker

    # ------------------------------------------------------------------ iteration

    def consumer(self, role: int) -> int:
        """Global consumer id of this rank's worker role ``role``."""
        return self.rank * self.workers + role

    def _dataset(self, inflight_dir: str | None) -> ShardStream:
        return ShardStream(self.cfg, self.planner, self.render_cfg, self.groups, self.assignment,
                           [self.consumer(r) for r in range(self.workers)], list(self.positions), self.next_role,
                           quarantine=frozenset(self.quarantine), inflight_dir=inflight_dir, latents=self.latents,
                           audio=self.audio)

    def __iter__(self):
        """Batches from the current cursor on, forever; the cursor advances as each batch is handed out.

        A worker that dies (decord can abort the process on some corrupt streams; or the OOM killer)
        does not end the run: the sample it was building is quarantined (``samples/worker_died``, part
        of the cursor) and the workers restart from the cursor, so nothing is delivered twice or lost.
        """
        import cv2

        w = self.cfg.workers
        if w.num_workers == 0 or w.start_method == "fork":
            # OpenCV's thread pool does not survive a fork (a forked worker hangs in it): keep this process's
            # OpenCV single-threaded before decoding here or forking workers (the trainer does not use it)
            cv2.setNumThreads(1)
        restarts = 0
        while True:
            if w.num_workers == 0:
                yield from self._deliver(iter(self._dataset(None)))
                return
            inflight = tempfile.mkdtemp(prefix="dreamactor-data-")
            try:
                loader = torch.utils.data.DataLoader(
                    self._dataset(inflight), batch_size=None, num_workers=w.num_workers, collate_fn=_identity,
                    pin_memory=w.pin_memory, prefetch_factor=w.prefetch_factor, worker_init_fn=_worker_init,
                    persistent_workers=False,
                    multiprocessing_context=None if w.start_method == "fork" else w.start_method)
                yield from self._deliver(iter(loader))
                return
            except RuntimeError as e:
                m = _WORKER_DIED.search(str(e))
                if not m:
                    raise
                pids = [int(x) for x in m.group(1).replace(" ", "").split(",") if x]
                keys = sorted({k for pid in pids for k in _inflight_keys(inflight, pid)})
                restarts += 1
                if not keys or restarts > w.max_restarts:
                    raise RuntimeError(f"data worker(s) {pids} died "
                                       f"({'building ' + ', '.join(keys) if keys else 'outside a sample'}); "
                                       f"{restarts - 1} restarts so far, "
                                       f"data.workers.max_restarts={w.max_restarts}") from e
                self.quarantine.update(keys)  # counted by the workers each time they skip it
                log.error("data worker(s) %s died while building %s: quarantined, restarting the workers "
                          "from the cursor (%d/%d)", pids, keys, restarts, w.max_restarts)
            finally:
                shutil.rmtree(inflight, ignore_errors=True)

    def _deliver(self, source):
        """Hand batches out, advancing the cursor."""
        for batch in source:
            role, p, b = batch.cursor["role"], batch.cursor["p"], batch.cursor["b"]
            if role != self.next_role:  # the DataLoader serves workers round-robin; anything else is a bug
                raise AssertionError(f"batch from worker role {role}, expected {self.next_role}")
            self.positions[role] = (p, b)
            self.next_role = (role + 1) % self.workers
            self.steps += 1
            self._skips.update(batch.skips)
            yield batch

    def skip_counts(self) -> dict[str, int]:
        """Samples / shards / batches skipped on this rank so far, by reason (cumulative over resumes)."""
        return dict(self._skips)

    # ------------------------------------------------------------------ cursor

    def fingerprint(self) -> dict[str, str]:
        """Hashes of what the plan depends on: the shard list and the planning settings."""
        shards = hashlib.sha256("\n".join(self.shard_urls).encode()).hexdigest()[:16]
        plan = hashlib.sha256(json.dumps(self.planner.settings(), sort_keys=True).encode()).hexdigest()[:16]
        return {"shards": shards, "plan": plan}

    def local_state(self) -> dict:
        """This rank's part of the cursor (no communication)."""
        return {"version": STATE_VERSION, "seed": self.seed, "fingerprint": self.fingerprint(),
                "world_size": self.world_size, "workers": self.workers, "rank": self.rank,
                "assignment": {"leftover": [list(x) for x in self.assignment.leftover], "base": self.assignment.base,
                               "consumers": self.assignment.consumers},
                "positions": {str(self.consumer(r)): list(self.positions[r]) for r in range(self.workers)},
                "next_role": {str(self.rank): self.next_role}, "steps": {str(self.rank): self.steps},
                "skips": {str(self.rank): dict(self._skips)}, "quarantine": sorted(self.quarantine)}

    def state_dict(self) -> dict:
        """The whole cursor, every rank's part merged. Collective when torch.distributed is initialised
        with more than one rank (call it on every rank, like the checkpoint save itself); the result is
        the same on every rank, so any rank's copy (e.g. rank 0's) restores every rank."""
        local = self.local_state()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, local)
            return merge_states(parts)
        return local

    def load_state_dict(self, state: dict | list[dict], strict: bool = True) -> None:
        """Restore a cursor written by :meth:`state_dict` (or a list of per-rank :meth:`local_state`s).

        ``strict``: refuse a cursor made for another shard list or other planning settings (the windows
        would not be the same, so exactness and no-duplicate/no-gap would not hold).
        """
        if isinstance(state, (list, tuple)):
            state = merge_states(list(state))
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"data cursor version {state.get('version')} != {STATE_VERSION}")
        missing = [r for r in range(state["world_size"]) if str(r) not in state["next_role"]]
        if missing:
            raise DataConfigError(f"data cursor lacks ranks {missing} of {state['world_size']}: save it with "
                                  "state_dict() on every rank (collective) or pass every rank's local_state()")
        mine = self.fingerprint()
        diff = ([k for k in mine if state["fingerprint"].get(k) != mine[k]]
                + (["seed"] if state["seed"] != self.seed else []))
        if diff:
            msg = (f"data cursor was written for a different {', '.join(diff)} (shards: the dataset changed; plan: "
                   "buckets/frames/refs/dropout/shuffle settings or the model geometry changed)")
            if strict:
                raise DataConfigError(msg + "; pass strict=False to continue with the new plan anyway")
            log.warning("%s; continuing: windows are re-planned, so exactness is lost", msg)
        a = state["assignment"]
        old = Assignment(tuple(tuple(x) for x in a["leftover"]), int(a["base"]), int(a["consumers"]))
        positions = [tuple(state["positions"][str(c)]) for c in range(old.consumers)]
        self._skips = Counter(state["skips"].get(str(self.rank), {})) if state["world_size"] == self.world_size \
            else Counter()
        if self.rank == 0 and state["world_size"] != self.world_size:
            for part in state["skips"].values():  # counts of vanished ranks live on with rank 0
                self._skips.update(part)
        self.quarantine = set(state.get("quarantine", ()))
        self.steps = max(int(v) for v in state["steps"].values())  # steps are global: every rank takes one batch each
        if state["world_size"] == self.world_size and state["workers"] == self.workers:
            self.assignment = old
            self.positions = [positions[self.consumer(r)] for r in range(self.workers)]
            self.next_role = int(state["next_role"][str(self.rank)])
            return
        rest = old.remaining(positions)
        self.assignment = dataclasses.replace(rest, consumers=self.world_size * self.workers)
        self.positions = [(0, 0)] * self.workers
        self.next_role = 0
        log.info("data cursor from %d ranks x %d workers resumed on %d x %d: %d partly read or skipped windows "
                 "shared first, then windows from %d", state["world_size"], state["workers"], self.world_size,
                 self.workers, len(rest.leftover), rest.base)


def merge_states(parts: list[dict]) -> dict:
    """Merge per-rank :meth:`DreamActorLoader.local_state` dicts into one cursor."""
    if not parts:
        raise ValueError("no data cursor parts to merge")
    out = json.loads(json.dumps(parts[0]))
    out.pop("rank", None)
    for p in parts[1:]:
        for k in ("version", "seed", "fingerprint", "world_size", "workers", "assignment"):
            if p[k] != out[k]:
                raise DataConfigError(f"data cursor parts disagree on {k}: {p[k]!r} vs {out[k]!r}")
        for k in ("positions", "next_role", "steps", "skips"):
            out[k].update(p[k])
        out["quarantine"] = sorted(set(out.get("quarantine", ())) | set(p.get("quarantine", ())))
    return out


def build_loader(cfg: DataConfig, model_cfg, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> DreamActorLoader:
    """The loader of ``rank`` of ``world_size``; ``model_cfg`` (models.config.ModelConfig) supplies the
    VAE compression, patch size, face-crop size and control-signal renderer the batches are made for, and with
    ``data.latents=true`` the VAE the latent cache must have been made by (a random init's: seeded from ``seed``,
    the run's ``train.seed``, as ``train.step.build_vae`` does)."""
    geometry = Geometry.of_model(model_cfg)
    check(cfg, geometry.temporal_compression)
    urls, groups = resolve_source(cfg.source)
    missing = [g for g in cfg.source.require_groups if groups is not None and g not in groups]
    if missing:
        raise DataConfigError(f"the dataset has no {missing} fields (its dataset.json lists {groups}); rerun "
                              "preprocessing with those annotators or drop them from data.source.require_groups")
    have = groups if groups is not None else list(cfg.source.require_groups)
    if cfg.face_crops and "face" not in have:
        raise DataConfigError(f"data.face_crops=true needs face crops, but the dataset's groups are {have} (with shard "
                              "URLs: add face to data.source.require_groups); stage 1 runs with data.face_crops=false")
    if cfg.workers.start_method == "forkserver" and cfg.workers.num_workers:
        import multiprocessing

        multiprocessing.set_forkserver_preload(["train.data"])  # imported once by the server, not per worker
    if not cfg.latents or cfg.face_crops:  # clips or face crops to decode: check the reader once, here, rather
        require_decoder(cfg.workers.decoder)  # than skip every sample as undecodable in every worker
    latents = None
    if cfg.latents:  # the cache must have been made by this model's VAE for this framing (seed: a random VAE's)
        from preprocess.latents import check_cache, manifest

        latents = latent_cache_url(cfg.source)
        want = manifest(Framing.of(cfg, geometry), model_cfg, seed, cfg.frames.max)
        check_cache(latents, cfg.source.storage_options, want, urls)
    return DreamActorLoader(cfg, geometry, model_cfg.render, rank=rank, world_size=world_size, seed=seed,
                            shard_urls=urls, groups=groups or list(cfg.source.require_groups), latents=latents,
                            audio=load_audio(cfg))


def load_audio(cfg: DataConfig) -> bool:
    """Whether batches carry audio: ``data.audio`` against what the dataset holds (``auto``: when some clip has audio,
    or when that is unknown, shard URLs; ``true``: refuses a dataset with none)."""
    if cfg.audio is False:
        return False
    n, why = dataset_audio(cfg.source)
    if n == 0 and cfg.audio is True:
        raise DataConfigError(f"data.audio=true, but the dataset {cfg.source.dataset} has no audio: {why}. Rerun "
                              "preprocessing (it keeps each clip's audio since schema 3) on sources with sound, or set "
                              "data.audio=auto or false")
    return n != 0
