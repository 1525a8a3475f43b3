"""Sharded checkpoints that an interruption can never corrupt, and the resume from them on any number of ranks:
the :class:`Checkpointer` owns both (the trainer only says which states it has).

Layout of ``<stage dir>/checkpoints``::

    latest                    tag of the newest complete checkpoint (DeepSpeed's name; moved only after COMPLETE)
    step_00000400/
        *model_states.pt, *optim_states.pt    DeepSpeed: module, ZeRO optimizer partitions, LR scheduler, steps
        trainer/rank_00000.pt ...             per rank: RNG states (python, numpy, torch, CUDA), EMA shard, guard
        trainer/state.pt                      data cursor of every rank, step (rank 0)
        config.yaml                           the resolved config of the run, secrets redacted
        COMPLETE                              JSON written last by rank 0: step, world size, ZeRO stage, ..., every
                                              file's size and sha256, signed (train/manifest.py)
        universal/                            DeepSpeed universal checkpoint, made when the world size changes
    _quarantine/step_00000300/                a checkpoint that failed verification, moved aside (never deleted)

States (each with ``state_dict`` / ``load_state_dict``, registered with :meth:`Checkpointer.track`): the
DeepSpeed engine; *per-rank* states (RNG, guard counters), restored from the rank's own file; *sharded*
states (the EMA), restored from the rank's own shard or, after a world-size change, reassembled from every
old shard; *shared* states (the data cursor), the same on every rank and written once by rank 0.

Commit protocol: every rank writes its files (each through a temporary name + fsync + rename), a barrier
proves they all did, every rank records the size and sha256 of its own files, rank 0 gathers them into
``COMPLETE`` (signed with the run's checkpoint key) and only then moves ``latest``. ``resume=auto`` takes the
newest checkpoint that has ``COMPLETE`` *and verifies against it*: a save cut short by ``kill -9``, a node loss
or a full disk has no ``COMPLETE`` and is ignored (and deleted by the next complete save); a complete one with
a file missing, truncated or changed since is moved to ``_quarantine/`` (with the reason) and the previous one
is taken. A checkpoint whose ``COMPLETE`` this run's key did not sign is never loaded: DeepSpeed's files are
pickles (train/manifest.py). The directory must be shared by all nodes.

Our own states are tensors and plain data (numbers, strings, lists, dicts) and load with
``torch.load(weights_only=True)``: no code runs when a trainer file is read, whoever wrote it.

World-size change: rank 0 converts the checkpoint with DeepSpeed's ``ds_to_universal`` (into
``universal/``, once) and every rank loads it with ``checkpoint.load_universal``; the EMA is reassembled
from every old shard (train/ema.py) and the data loader continues the epoch from the merged cursor.
DeepSpeed must know before ``deepspeed.initialize`` that it loads a universal checkpoint, so the resume is
two calls: :meth:`Checkpointer.prepare` before the engine exists (the checks that need no model, the
conversion while the host holds no model), then :meth:`Checkpointer.load` once every state exists.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml

from models.redact import redacted

from . import manifest
from .distributed import Dist, all_gather, barrier, from_main
from .manifest import COMPLETE, Problem

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
QUARANTINE_DIR = "_quarantine"
REASON_SUFFIX = ".reason.json"  # _quarantine/step_X.reason.json: why step_X is there (beside it, not in it)
TRAINER_DIR = "trainer"
SHARED_FILE = "state.pt"
# The trainer's states by their names in the rank files and in state.pt (the layout above).
RNG, GUARD, EMA, DATA = "rng", "guard", "ema", "data"
# What a checkpoint must share with the run that resumes it (keys of the COMPLETE record).
COMPATIBLE = ("stage", "model", "zero_stage", "frozen_signature")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed: incomplete, unreadable, or made by another kind of run."""


class Stateful(Protocol):
    """What a checkpoint saves and restores."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def tag_of(step: int) -> str:
    """Checkpoint tag of an optimizer step."""
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    """The trainer file of ``rank`` in a checkpoint (its per-rank and sharded states)."""
    return Path(tag_dir) / TRAINER_DIR / f"rank_{rank:05d}.pt"


def rank_files(tag_dir: Path) -> list[Path]:
    """Every rank's trainer file of a checkpoint, by rank."""
    return sorted((Path(tag_dir) / TRAINER_DIR).glob("rank_*.pt"))


def _legacy_numpy_globals() -> list:
    """What the RNG state of a trainer file written before holds besides tensors: numpy's key array (rebuilt
    by numpy's array constructor, which runs no other code)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_state(path: Path, mmap: bool = False) -> dict:
    """A trainer file of a checkpoint, loaded with ``weights_only=True`` (no code in it can run); a missing or
    unreadable one is a :class:`CheckpointError`. With ``mmap`` its tensors stay in the file until read."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, refused pickle, missing file: all mean a broken checkpoint
        raise CheckpointError(f"{path} is missing or unreadable ({type(e).__name__}: {e}): the checkpoint "
                              f"{path.parent.parent} is broken; resume another one (train.resume=<checkpoint dir>), "
                              "or delete it and let train.resume=auto take the previous one") from e


def rank_entries(tag_dir: Path, name: str, mmap: bool = False) -> Iterator[Any]:
    """State ``name`` of every rank's trainer file, by rank, one file in memory at a time (with ``mmap``, none:
    their tensors are read from the files when used)."""
    files = rank_files(tag_dir)
    if not files:
        raise CheckpointError(f"{Path(tag_dir) / TRAINER_DIR} holds no rank files: the checkpoint is broken")
    for f in files:
        yield read_state(f, mmap)[name]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary name, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(tag_dir: Path) -> dict | None:
    """The COMPLETE record of a checkpoint, or None when the checkpoint is incomplete."""
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = TAG_RE.match(d.name)
            if m and d.is_dir() and read_meta(d) is not None:
                out.append((int(m.group(1)), d))
    return sorted(out)


def incomplete_checkpoints(root: Path) -> list[str]:
    """Tags under ``root`` without a readable COMPLETE (saves cut short)."""
    return sorted(d.name for d in root.iterdir() if TAG_RE.match(d.name) and d.is_dir() and read_meta(d) is None) \
        if root.is_dir() else []


def find_resume(root: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` is only a hint: it may lag a crash); not yet
    verified (:meth:`Checkpointer.find` does that)."""
    done = complete_checkpoints(root)
    incomplete = incomplete_checkpoints(root)
    if incomplete and warn:
        log.warning("ignoring incomplete checkpoints (interrupted saves) in %s: %s", root, ", ".join(incomplete))
    if not done:
        return None
    latest = root / "latest"
    if warn and latest.is_file() and latest.read_text().strip() != done[-1][1].name:
        log.warning("%s says %s but the newest complete checkpoint is %s: using the latter", latest,
                    latest.read_text().strip(), done[-1][1].name)
    return done[-1][1]


def quarantine(tag_dir: Path, problems: list[Problem]) -> Path:
    """Move a damaged checkpoint to ``<checkpoints>/_quarantine/<tag>`` (a rename: nothing is deleted), with
    ``<tag>.reason.json`` beside it naming the bad files; returns where it went."""
    tag_dir = Path(tag_dir)
    qdir = tag_dir.parent / QUARANTINE_DIR
    qdir.mkdir(exist_ok=True)
    dest, n = qdir / tag_dir.name, 1
    while dest.exists():
        dest, n = qdir / f"{tag_dir.name}.{n}", n + 1
    os.replace(tag_dir, dest)
    _fsync_dir(tag_dir.parent)
    reason = {"checkpoint": tag_dir.name, "from": str(tag_dir), "time": time.time(), "host": socket.gethostname(),
              "problems": [{"file": p.path, "why": p.why} for p in problems]}
    atomic_write_bytes(dest.with_name(dest.name + REASON_SUFFIX), json.dumps(reason, indent=1).encode())
    return dest


def quarantined(root: Path) -> list[str]:
    """The checkpoints moved to quarantine under ``root``."""
    q = Path(root) / QUARANTINE_DIR
    return sorted(d.name for d in q.iterdir() if d.is_dir()) if q.is_dir() else []


class Checkpointer:
    """Saves and resumes the checkpoints of one stage (see the module docstring).

    ``meta``: this run's record, written into every ``COMPLETE``; a checkpoint is resumed only when the keys of
    :data:`COMPATIBLE` that the record holds match. ``config``: the resolved config, saved (secrets redacted) as
    ``config.yaml``. ``key``: the checkpoint key that signs and checks ``COMPLETE`` (rank 0's; other ranks may
    pass None) and ``key_from`` where it came from (for messages); ``verify``: ``size`` or ``sha256`` (how a
    checkpoint is checked before a resume); ``trust_unsigned``: resume checkpoints this key did not sign."""

    def __init__(self, root: Path, dist: Dist, keep: int, meta: dict | None = None, config: dict | None = None, *,
                 key: bytes | None = None, key_from: str = "", verify: str = "sha256", trust_unsigned: bool = False):
        if verify not in manifest.LEVELS:
            raise ValueError(f"verify={verify!r}: use one of {manifest.LEVELS}")
        self.root = Path(root)
        self.dist = dist
        self.keep = keep
        self.meta = dict(meta or {})
        self.config = redacted(config or {})
        self.key, self.key_from = key, key_from or manifest.KEY_ENV
        self.verify_level, self.trust_unsigned = verify, trust_unsigned
        self.engine = None
        self.per_rank: dict[str, Stateful] = {}
        self.sharded: dict[str, Stateful] = {}
        self.shared: dict[str, Stateful] = {}
        self._verified: set[Path] = set()  # checkpoints that verified (checked once per run)
        self._universal_ready: set[Path] = set()  # checkpoints whose universal conversion exists and verified

    def track(self, engine, *, per_rank: dict[str, Stateful] | None = None, sharded: dict[str, Stateful] | None = None,
              shared: dict[str, Stateful] | None = None, meta: dict | None = None) -> None:
        """Register what :meth:`save` writes and :meth:`load` restores besides the DeepSpeed ``engine``:
        ``per_rank`` states (this rank's own), ``sharded`` ones (whose ``load_state_dict`` takes an iterable of
        saved shards, so that it can reassemble its part from any number of old ranks) and ``shared`` ones
        (the same on every rank; ``state_dict`` may be collective); ``meta``: more of the run's record (what is
        known once the model exists)."""
        self.engine = engine
        self.per_rank.update(per_rank or {})
        self.sharded.update(sharded or {})
        self.shared.update(shared or {})
        self.meta.update(meta or {})

    # ------------------------------------------------------------------ save

    def save(self, step: int) -> Path:
        """Collective: write checkpoint ``step`` of every tracked state and commit it."""
        t0 = time.perf_counter()
        tag = tag_of(step)
        tag_dir = self.root / tag
        shared = {name: s.state_dict() for name, s in self.shared.items()}  # collective (the data cursor)
        shared["step"] = step
        own = {name: s.state_dict() for name, s in {**self.per_rank, **self.sharded}.items()}
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a save of this step that never completed (killed earlier): start clean
                log.warning("removing incomplete checkpoint %s before saving it again", tag_dir)
                shutil.rmtree(tag_dir)
        barrier()
        self.engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer_step": step}, save_latest=False)
        atomic_torch_save(own, rank_file(tag_dir, self.dist.rank))
        if self.dist.is_main:
            atomic_torch_save(shared, tag_dir / TRAINER_DIR / SHARED_FILE)
            atomic_write_bytes(tag_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=False).encode())
        barrier()  # every rank's files are on disk
        t_hash = time.perf_counter()
        world, rank = self.dist.world_size, self.dist.rank
        files = all_gather(manifest.describe(tag_dir, manifest.owned(tag_dir, rank, world)))  # each its own files
        if self.dist.is_main:
            meta = dict(self.meta, step=step, world_size=self.dist.world_size, time=time.time(),
                        save_seconds=round(time.perf_counter() - t0, 3),
                        checksum_seconds=round(time.perf_counter() - t_hash, 3),
                        format=manifest.FORMAT, files=dict(sorted(kv for part in files for kv in part.items())))
            atomic_write_bytes(tag_dir / COMPLETE, json.dumps(manifest.sign(meta, self.key), indent=1).encode())
            atomic_write_bytes(self.root / "latest", tag.encode())  # DeepSpeed's pointer, moved last
            self._retain()
        barrier()
        log.info("checkpoint %s saved in %.2f s", tag_dir, time.perf_counter() - t0)
        return tag_dir

    def _retain(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and every incomplete leftover
        (saves cut short earlier; no other save can be in flight while rank 0 runs this). Quarantined
        checkpoints are left alone."""
        done = complete_checkpoints(self.root)
        for _, d in done[:-self.keep]:
            shutil.rmtree(d, ignore_errors=True)
        for name in incomplete_checkpoints(self.root):
            log.warning("deleting incomplete checkpoint %s", self.root / name)
            shutil.rmtree(self.root / name, ignore_errors=True)

    # ------------------------------------------------------------------ resume

    def find(self, resume: str) -> Path | None:
        """Collective: the checkpoint to continue from, following ``train.resume`` (auto | none | a checkpoint
        directory), verified (:meth:`verify`); every rank gets the same answer."""
        if resume == "none":
            if complete_checkpoints(self.root):
                raise RuntimeError(f"train.resume=none but {self.root} holds checkpoints of this stage: pass "
                                   "train.resume=auto to continue, or a new train.out_dir to start over")
            return None
        if resume == "auto":
            return self._newest_verified()
        tag_dir = Path(resume).expanduser()
        self._checked_meta(tag_dir)
        self._require_verified(tag_dir)
        return tag_dir

    def _newest_verified(self) -> Path | None:
        """The newest complete checkpoint that verifies. Damaged newer ones are quarantined (rank 0 decides and
        moves them; every rank sees the same verdicts); one this run's key did not sign stops the run."""
        tags = from_main([d.name for _, d in complete_checkpoints(self.root)] if self.dist.is_main else None)
        if self.dist.is_main:
            find_resume(self.root, warn=True)  # the warnings: interrupted saves, a stale latest
        bad: list[str] = []
        for tag in reversed(tags):
            tag_dir = self.root / tag
            problems = self.verify(tag_dir)
            if not problems:
                self._verified.add(tag_dir)
                if self.dist.is_main and bad:
                    log.warning("resuming from %s: the newest checkpoint that verifies (quarantined: %s)", tag,
                                ", ".join(bad))
                    atomic_write_bytes(self.root / "latest", tag.encode())
                barrier()
                return tag_dir
            if not all(p.damaged for p in problems):
                raise CheckpointError(self._untrusted(tag_dir, problems))
            if self.dist.is_main:
                where = quarantine(tag_dir, problems)
                log.warning("checkpoint %s is damaged: %s; moved to %s (kept, not deleted); falling back to the "
                            "previous checkpoint", tag, "; ".join(map(str, problems)), where)
            barrier()
            bad.append(tag)
        held = from_main(quarantined(self.root) if self.dist.is_main else None)
        if held:
            raise CheckpointError(f"no checkpoint in {self.root} verifies (quarantined in "
                                  f"{self.root / QUARANTINE_DIR}: {', '.join(held)}; each with its "
                                  f"<tag>{REASON_SUFFIX}): this run does not start the stage over by itself. Resume "
                                  "one you repaired (train.resume=<checkpoint dir>), or start over in a new "
                                  "train.out_dir")
        if self.dist.is_main:
            log.info("no complete checkpoint in %s: stage %s starts at step 0", self.root, self.meta.get("stage"))
        return None

    def verify(self, tag_dir: Path) -> list[Problem]:
        """Collective: every problem of checkpoint ``tag_dir`` against its COMPLETE (train/manifest.py), the same
        list on every rank. Rank 0 checks the signature and looks for files the save did not write; the listed
        files are checked by the rank that wrote them (in parallel)."""
        tag_dir = Path(tag_dir)
        t0 = time.perf_counter()
        record = read_meta(tag_dir) or {}
        files = record.get("files") or {}
        world, rank = self.dist.world_size, self.dist.rank
        mine = manifest.file_problems(tag_dir, {r: f for r, f in files.items() if manifest.owner(r, world) == rank},
                                      self.verify_level)
        if self.dist.is_main:
            mine += manifest.trust_problems(tag_dir, record, self.key, self.key_from, self.trust_unsigned)
            mine += manifest.extra_problems(tag_dir, files) if files else []
        problems = sorted(p for part in all_gather(mine) for p in part)
        if self.dist.is_main and not problems and files:
            log.info("%s verified: %d files, %.1f MB (%s) in %.2f s", tag_dir, len(files),
                     manifest.total_bytes(record) / 2**20, self.verify_level, time.perf_counter() - t0)
        return problems

    def _require_verified(self, tag_dir: Path) -> None:
        """Collective: refuse (a :class:`CheckpointError` naming the bad file) a checkpoint that does not verify."""
        if tag_dir in self._verified:
            return
        problems = self.verify(tag_dir)
        if any(not p.damaged for p in problems):
            raise CheckpointError(self._untrusted(tag_dir, problems))
        if problems:
            raise CheckpointError(f"{tag_dir} fails verification: {'; '.join(map(str, problems))}. Nothing was "
                                  "loaded; resume another checkpoint (train.resume=auto takes the newest one that "
                                  "verifies and quarantines damaged ones), or restore the file")
        self._verified.add(tag_dir)

    def _untrusted(self, tag_dir: Path, problems: list[Problem]) -> str:
        """The refusal of a checkpoint that this run's key did not sign."""
        why = "; ".join(str(p) for p in problems if not p.damaged)
        return (f"{why}. Nothing of {tag_dir} was loaded: DeepSpeed's files are pickles, and unpickling a file "
                "from an untrusted source runs its code. If the checkpoint is yours, give the key that signed it "
                f"(${manifest.KEY_ENV} or train.checkpoint.key_file); if you trust where it comes from (written "
                "before checkpoints were signed, copied from a machine you control), pass "
                "train.checkpoint.trust_unsigned=true")

    def newest(self) -> Path | None:
        """The newest complete checkpoint of this stage (quietly: for the export)."""
        return find_resume(self.root, warn=False)

    def prepare(self, tag_dir: Path | None) -> bool:
        """Collective, before the engine exists: verify ``tag_dir`` (:meth:`verify`; once), check it against what
        :attr:`meta` already holds and, when it was saved by another number of ranks, have rank 0 convert it to a
        DeepSpeed universal checkpoint (``tag_dir/universal``, once; its own files verified on reuse). Returns
        whether the engine must load the universal format."""
        if tag_dir is None:
            return False
        tag_dir = Path(tag_dir)
        meta = self._checked_meta(tag_dir)
        self._require_verified(tag_dir)
        universal = meta["world_size"] != self.dist.world_size
        if universal and tag_dir not in self._universal_ready:
            if self.dist.is_main and not self._universal_usable(tag_dir):
                try:
                    to_universal(tag_dir, self.key)
                except RuntimeError as e:
                    raise CheckpointError(f"{e}\nResume it on {meta['world_size']} ranks, or resume another "
                                          "checkpoint (train.resume=<checkpoint dir>)") from e
            barrier()
            self._universal_ready.add(tag_dir)
        return universal

    def _universal_usable(self, tag_dir: Path) -> bool:
        """Whether ``tag_dir/universal`` is a complete conversion that verifies (else it is made again)."""
        out = tag_dir / "universal"
        record = read_meta(out)
        if record is None:
            return False
        problems = manifest.verify(out, record, self.key, self.key_from, self.verify_level, self.trust_unsigned)
        if problems:
            log.warning("converting %s again: its universal checkpoint does not verify (%s)", tag_dir,
                        "; ".join(map(str, problems)))
        return not problems

    def load(self, tag_dir: Path) -> int:
        """Collective: restore every tracked state from checkpoint ``tag_dir``; returns its step.

        Checks (stage, model, ZeRO stage, frozen weights, step) and the universal conversion come first; the
        engine must have been built with ``load_universal`` as :meth:`prepare` said. Anything missing,
        unreadable or made by another kind of run is a :class:`CheckpointError` naming the checkpoint."""
        tag_dir = Path(tag_dir)
        universal = self.prepare(tag_dir)
        meta = read_meta(tag_dir)
        if universal and not self.engine.load_universal_checkpoint():
            raise CheckpointError(f"{tag_dir} was saved by {meta['world_size']} ranks, this run has "
                                  f"{self.dist.world_size}: build the engine with load_universal=True "
                                  "(Checkpointer.prepare says so before deepspeed.initialize)")
        self._load_engine(tag_dir, universal)
        step = int(self.engine.global_steps)
        if meta["step"] != step:
            raise CheckpointError(f"{tag_dir} is step {meta['step']} but DeepSpeed restored step {step}: the "
                                  "checkpoint is inconsistent; resume another one (train.resume=<checkpoint dir>)")
        own_file = rank_file(tag_dir, self.dist.rank)
        own = read_state(own_file) if own_file.is_file() or not universal else None
        for name, state in self.per_rank.items():
            if own is None or name not in own:  # a rank the checkpoint did not have, or an older file
                log.info("rank %d: %s holds no %s state: it starts fresh", self.dist.rank, own_file, name)
                continue
            self._restore(state, own[name], name, own_file)
        for name, state in self.sharded.items():
            shards = rank_entries(tag_dir, name) if universal else [self._entry(own, name, own_file)]
            self._restore(state, shards, name, own_file.parent)
        shared_file = tag_dir / TRAINER_DIR / SHARED_FILE
        shared = read_state(shared_file)
        for name, state in self.shared.items():
            self._restore(state, self._entry(shared, name, shared_file), name, shared_file)
        log.info("rank %d resumed from %s at step %d%s", self.dist.rank, tag_dir, step,
                 f" (universal checkpoint: {meta['world_size']} -> {self.dist.world_size} ranks)" if universal else "")
        return step

    def _checked_meta(self, tag_dir: Path) -> dict:
        """The COMPLETE record of ``tag_dir``, refused unless complete and compatible with :attr:`meta`."""
        meta = read_meta(tag_dir)
        if meta is None:
            raise CheckpointError(f"{tag_dir} is not a complete checkpoint (no readable {COMPLETE}: its save was cut "
                                  "short, or it is no checkpoint): pass train.resume=auto to take the newest complete "
                                  "one, or another checkpoint directory")
        bad = {k: (meta.get(k), self.meta[k]) for k in COMPATIBLE if k in self.meta and meta.get(k) != self.meta[k]}
        if bad:
            why = "; ".join(f"{k}: checkpoint {c!r}, this run {r!r}" for k, (c, r) in bad.items())
            if "frozen_signature" in bad:
                why += (" (the frozen parameters of this stage differ from those the checkpoint was trained with: "
                        "stage.init or the model preset changed)")
            raise CheckpointError(f"{tag_dir} does not match this run: {why}. Resume a checkpoint of this stage, "
                                  "model and ZeRO stage (train.resume=<checkpoint dir>), or start the stage over in a "
                                  "new train.out_dir")
        return meta

    def _load_engine(self, tag_dir: Path, universal: bool) -> None:
        """Module, optimizer, scheduler and step counters through DeepSpeed."""
        load_dir, tag = (tag_dir, "universal") if universal else (tag_dir.parent, tag_dir.name)
        # DeepSpeed takes the clipping threshold from the checkpoint; this run's configuration decides it
        clip = getattr(getattr(self.engine, "optimizer", None), "clip_grad", None)
        try:
            path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
        except Exception as e:  # whatever DeepSpeed raises, the checkpoint is what failed
            if isinstance(e, ValueError) and "compute_grad_norm=false" in str(e):
                raise CheckpointError(f"{load_dir / tag} was saved with DeepSpeed clipping the gradients, which this "
                                      "run leaves to the update guard: resume it with train.guard.owns_clipping=false "
                                      "(the same clipping, DeepSpeed's slower norm)") from e
            raise CheckpointError(f"DeepSpeed could not load {load_dir / tag} ({type(e).__name__}: {e}): "
                                  "the checkpoint is broken or of another model; resume another one "
                                  "(train.resume=<checkpoint dir>)") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {load_dir / tag} (its model-states files are missing): "
                                  "resume another checkpoint (train.resume=<checkpoint dir>)")
        if clip is not None:
            self.engine.optimizer.clip_grad = clip
        if universal:  # the universal format restores optimizer-owned parameters only: buffers come from here
            restore_buffers(self.engine.module, tag_dir)

    @staticmethod
    def _entry(saved: dict | None, name: str, path: Path):
        """State ``name`` of a trainer file, which must hold it."""
        if saved is None or name not in saved:
            raise CheckpointError(f"{path} holds no {name} state: the checkpoint is broken; resume another one "
                                  "(train.resume=<checkpoint dir>)")
        return saved[name]

    @staticmethod
    def _restore(state: Stateful, saved, name: str, path: Path) -> None:
        """``state.load_state_dict(saved)``; a refusal names the checkpoint file and the state."""
        try:
            state.load_state_dict(saved)
        except CheckpointError:
            raise
        except Exception as e:  # any refusal of a state is a checkpoint that cannot be resumed here
            raise CheckpointError(f"{path}: cannot restore the {name} state ({type(e).__name__}: {e}); resume another "
                                  "checkpoint (train.resume=<checkpoint dir>), or start the stage over in a new "
                                  "train.out_dir") from e


def to_universal(tag_dir: Path, key: bytes | None = None) -> Path:
    """Convert a (verified) DeepSpeed ZeRO checkpoint to the universal format in ``tag_dir/universal``
    (atomically), its COMPLETE listing and signing its files like a save's."""
    out = tag_dir / "universal"
    tmp = tag_dir / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log.info("world size changed: converting %s to a DeepSpeed universal checkpoint", tag_dir)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(max(1, workers // 2))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # written by the converter, names the tmp dir
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    record = manifest.sealed(out, {"source": tag_dir.name, "seconds": round(time.perf_counter() - t0, 2)}, key)
    atomic_write_bytes(out / COMPLETE, json.dumps(record, indent=1).encode())
    log.info("universal checkpoint %s written in %.1f s", out, time.perf_counter() - t0)
    return out


def model_state_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's model-states files of a checkpoint (one for ZeRO-2, one per rank for ZeRO-3)."""
    return sorted(p for p in tag_dir.glob("*model_states.pt"))


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, tag_dir: Path) -> None:
    """Copy the persistent buffers (e.g. the face encoder's BatchNorm statistics) saved in ``tag_dir``."""
    sd = torch.load(model_state_files(tag_dir)[0], map_location="cpu", weights_only=True)  # tensors, names, ints
    buffers = dict(module.named_buffers())
    for name in sd["buffer_names"]:
        buffers[name].copy_(sd["module"][name].to(buffers[name]))
