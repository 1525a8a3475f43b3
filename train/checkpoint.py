"""Sharded checkpoints that an interruption can never corrupt, and resume from them on any number of ranks.

Layout of ``<stage dir>/checkpoints``::

    latest                    tag of the newest complete checkpoint (DeepSpeed's name; moved only after COMPLETE)
    step_00000400/
        *model_states.pt, *optim_states.pt    DeepSpeed: module, ZeRO optimizer partitions, LR scheduler, steps
        trainer/rank_00000.pt ...             per rank: RNG states (python, numpy, torch, CUDA), EMA shard
        trainer/state.pt                      data cursor of every rank, counters (rank 0)
        config.yaml                           the resolved config of the run
        COMPLETE                              JSON written last by rank 0: step, world size, ZeRO stage, ...
        universal/                            DeepSpeed universal checkpoint, made when the world size changes

Commit protocol: every rank writes its files (each through a temporary name + fsync + rename), a barrier
proves they all did, then rank 0 writes ``COMPLETE`` and only then moves ``latest``. ``resume=auto`` picks
the newest checkpoint that has ``COMPLETE``, so a save cut short by ``kill -9``, a node loss or a full disk
is ignored (and deleted by the next complete save). The directory must be shared by all nodes.

World-size change: rank 0 converts the checkpoint with DeepSpeed's ``ds_to_universal`` (into
``universal/``, once) and every rank loads it with ``checkpoint.load_universal``; the EMA is reassembled
from every old shard (train/ema.py) and the data loader continues the epoch from the merged cursor.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from .distributed import Dist, barrier

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"


def tag_of(step: int) -> str:
    """Checkpoint tag of an optimizer step."""
    return f"step_{step:08d}"


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


def find_resume(root: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` is only a hint: it may lag a crash)."""
    done = complete_checkpoints(root)
    incomplete = [d.name for d in root.iterdir() if TAG_RE.match(d.name) and read_meta(d) is None] if root.is_dir() else []
    if incomplete and warn:
        log.warning("ignoring incomplete checkpoints (interrupted saves) in %s: %s", root, ", ".join(sorted(incomplete)))
    if not done:
        return None
    latest = root / "latest"
    if warn and latest.is_file() and latest.read_text().strip() != done[-1][1].name:
        log.warning("%s says %s but the newest complete checkpoint is %s: using the latter", latest,
                    latest.read_text().strip(), done[-1][1].name)
    return done[-1][1]


class Checkpointer:
    """Saves and loads the checkpoints of one stage (see the module docstring)."""

    def __init__(self, root: Path, dist: Dist, keep: int):
        self.root = Path(root)
        self.dist = dist
        self.keep = keep

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, rank_state: dict, shared_state: dict, resolved_config: dict,
             meta: dict) -> Path:
        """Collective: write checkpoint ``step`` and commit it. ``rank_state`` is this rank's (RNG, EMA
        shard); ``shared_state`` is the same on every rank (data cursor, counters) and written by rank 0."""
        t0 = time.perf_counter()
        tag = tag_of(step)
        tag_dir = self.root / tag
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a save of this step that never completed (killed earlier): start clean
                log.warning("removing incomplete checkpoint %s before saving it again", tag_dir)
                shutil.rmtree(tag_dir)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"trainer_step": step}, save_latest=False)
        atomic_torch_save(rank_state, tag_dir / "trainer" / f"rank_{self.dist.rank:05d}.pt")
        if self.dist.is_main:
            atomic_torch_save(shared_state, tag_dir / "trainer" / "state.pt")
            atomic_write_bytes(tag_dir / "config.yaml", yaml.safe_dump(resolved_config, sort_keys=False).encode())
        barrier()  # every rank's files are on disk
        if self.dist.is_main:
            meta = dict(meta, step=step, world_size=self.dist.world_size, time=time.time(),
                        save_seconds=round(time.perf_counter() - t0, 3))
            atomic_write_bytes(tag_dir / COMPLETE, json.dumps(meta, indent=1).encode())
            atomic_write_bytes(self.root / "latest", tag.encode())  # DeepSpeed's pointer, moved last
            self._retain()
        barrier()
        seconds = time.perf_counter() - t0
        log.info("checkpoint %s saved in %.2f s", tag_dir, seconds)
        return tag_dir

    def _retain(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones and every incomplete leftover
        (saves cut short earlier; no other save can be in flight while rank 0 runs this)."""
        done = complete_checkpoints(self.root)
        for _, d in done[:-self.keep]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.iterdir():
            if TAG_RE.match(d.name) and d.is_dir() and read_meta(d) is None:
                log.warning("deleting incomplete checkpoint %s", d)
                shutil.rmtree(d, ignore_errors=True)

    # ------------------------------------------------------------------ load

    def prepare(self, tag_dir: Path) -> bool:
        """Collective, before the engine exists: True when ``tag_dir`` was saved by another number of ranks;
        then rank 0 has converted it to a DeepSpeed universal checkpoint (``tag_dir/universal``)."""
        meta = read_meta(tag_dir)
        if meta is None:
            raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no {COMPLETE})")
        universal = meta["world_size"] != self.dist.world_size
        if universal and self.dist.is_main and read_meta(tag_dir / "universal") is None:
            to_universal(tag_dir)
        barrier()
        return universal

    def load(self, engine, tag_dir: Path, universal: bool) -> None:
        """Collective: module, optimizer, scheduler and step counters through DeepSpeed."""
        if universal:
            load_dir, tag = tag_dir, "universal"
        else:
            load_dir, tag = tag_dir.parent, tag_dir.name
        path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir / tag}")
        if universal:  # the universal format restores optimizer-owned parameters only: buffers come from here
            restore_buffers(engine.module, tag_dir)

    def rank_state_files(self, tag_dir: Path) -> list[Path]:
        """Every rank's trainer file of a checkpoint, by rank."""
        return sorted((tag_dir / "trainer").glob("rank_*.pt"))

    def load_rank_state(self, tag_dir: Path) -> dict | None:
        """This rank's own trainer file, or None when the checkpoint had fewer ranks."""
        f = tag_dir / "trainer" / f"rank_{self.dist.rank:05d}.pt"
        return torch.load(f, map_location="cpu", weights_only=False) if f.is_file() else None

    @staticmethod
    def load_shared_state(tag_dir: Path) -> dict:
        """The state every rank shares (data cursor, counters)."""
        return torch.load(tag_dir / "trainer" / "state.pt", map_location="cpu", weights_only=False)


def to_universal(tag_dir: Path) -> Path:
    """Convert a DeepSpeed ZeRO checkpoint to the universal format in ``tag_dir/universal`` (atomically)."""
    out = tag_dir / "universal"
    tmp = tag_dir / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    log.info("world size changed: converting %s to a DeepSpeed universal checkpoint", tag_dir)
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {tag_dir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # written by the converter, names the tmp dir
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    atomic_write_bytes(out / COMPLETE, json.dumps({"source": tag_dir.name,
                                                  "seconds": round(time.perf_counter() - t0, 2)}).encode())
    log.info("universal checkpoint %s written in %.1f s", out, time.perf_counter() - t0)
    return out


def model_state_files(tag_dir: Path) -> list[Path]:
    """DeepSpeed's model-states files of a checkpoint (one for ZeRO-2, one per rank for ZeRO-3)."""
    return sorted(p for p in tag_dir.glob("*model_states.pt"))


@torch.no_grad()
def restore_buffers(module: torch.nn.Module, tag_dir: Path) -> None:
    """Copy the persistent buffers (e.g. the face encoder's BatchNorm statistics) saved in ``tag_dir``."""
    sd = torch.load(model_state_files(tag_dir)[0], map_location="cpu", weights_only=False)
    buffers = dict(module.named_buffers())
    for name in sd["buffer_names"]:
        buffers[name].copy_(sd["module"][name].to(buffers[name]))
