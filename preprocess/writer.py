"""The shard writer: whole videos into byte-sized WebDataset tars, committed by a stats file.

A writer (a Ray actor; several run side by side, each video routed to one by its key) buffers the
rows of a video until every planned clip has arrived, runs the per-video stages (references) on
them, then appends the video's samples to its open tar, one clip at a time. A video never spans two
tars. While a video waits, its rows' heavy values (MP4s, JPEGs, per-frame arrays) are in staging files
(``spill.py``): a writer's memory is bounded by a clip, not by the length of a video. At the first
video boundary after the tar reaches ``shard_bytes``, or after its oldest video has waited
``commit_every_s`` (checked by a background thread too, so no further video is needed), the tar is
closed under a temporary name, published by rename, and then its stats file ``{part}.parquet`` (one
row per clip and one per video, failures included; the tar's size and sha256 in its metadata) is
written: that file, written last, is the commit. So kill -9 loses the videos in flight and at most
``commit_every_s`` of finished ones. On a rerun, videos listed in a stats file are finished; a tar
with no stats file is debris of a killed run and is deleted, and so are staging files (see ``state.py``).

Before publishing, a writer asks whether its run still owns the output (``lock.driver_gone``: the
driver's process, the lease's owner and heartbeat); once it does not, the writer discards its open
part and commits nothing more: a writer orphaned by a dead driver cannot race the run that follows.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Mapping

import numpy as np
import pandas as pd

from . import schema
from .config import StageSpec
from .lock import DriverCheck, pid_alive
from .shards import SHARD_DIR, TAR_SUFFIX, digest, encode_stats, part_name, stats_path, tar_path
from .spill import SPILL_SUFFIX, SpilledRow
from .stage import FAILED, OK, SKIPPED, VideoStage, fail, load_stage
from .storage import Storage, remove_dead_staging

TICK_S = 1.0  # how often the background thread looks at the open part's age
DRIVER_CHECK_S = 5.0  # and, at most this often, at the driver


class DriverGone(RuntimeError):
    """The run this writer works for no longer owns the output (driver dead, or taken over): nothing more is
    committed."""


def writer_name(run_id: str, i: int) -> str:
    """The Ray actor name of writer ``i`` of a run (the sink stage finds its writers by it)."""
    return f"dreamactor-writer-{run_id}-{i}"


def sample_members(row: Mapping, fields: list[schema.Field]) -> list[tuple[str, bytes]]:
    """The tar members of one clip row, meta first, in schema order (each value read once)."""
    members = []
    for f in fields:
        value = row.get(f.name)
        if value is None:
            if f.optional:
                continue
            raise KeyError(f"field {f.member!r} was not produced for clip {row['key']}")
        members.append((f"{row['key']}.{f.member}", schema.encode(f, value)))
    return members


def clip_meta(row: Mapping) -> dict:
    """meta.json of a clip: the engine's keys plus every ``m_*`` scalar an annotator added."""
    meta = {"schema_version": schema.SCHEMA_VERSION}
    for k in schema.META_KEYS:
        if k in row:
            meta[k] = _plain(row[k])
    n = len(schema.ANNOTATOR_META_PREFIX)
    meta.update({k[n:]: _plain(row[k]) for k in annotator_meta(row)})
    return meta


def annotator_meta(row: Mapping) -> list[str]:
    """The row's ``m_*`` columns, in its order (names only: a value is read when it is used)."""
    return [k for k in row if k.startswith(schema.ANNOTATOR_META_PREFIX)]


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


class ShardWriter:
    """Writes the shards of one writer id; used as a Ray actor (the pipeline starts them, the sink stage feeds them)."""

    def __init__(self, output: str, writer_id: int, run_id: str, shard_bytes: int, groups: list[str],
                 video_stages: dict[str, StageSpec], commit_every_s: float | None = None,
                 driver: DriverCheck | None = None):
        """``commit_every_s`` None: parts close on size only; ``driver`` None: no liveness check (a writer used
        outside a run, e.g. by tests)."""
        self.storage = Storage(output)
        self.storage.makedirs(SHARD_DIR)
        if not self.storage.local:  # what writers killed on this host left (a local output's run deletes its own)
            remove_dead_staging(pid_alive)
        self.staging = self.storage.staging_dir()
        self.writer_id, self.run_id, self.shard_bytes = writer_id, run_id, shard_bytes
        self.fields = schema.fields_of(["clip", *groups])
        self.video_stages: list[VideoStage] = []
        for name, spec in video_stages.items():
            if spec.enabled:
                st = load_stage(name, spec)
                st.setup()
                self.video_stages.append(st)
        self.pending: dict[str, list[SpilledRow]] = {}  # video_key -> rows received so far (heavy values on disk)
        self.n_held = 0  # rows taken so far (names their spill files)
        self.sources: dict[str, str] = {}  # video_key -> first source seen (duplicates dropped)
        self.seq = 0
        self.tar: tarfile.TarFile | None = None
        self.tar_path = ""
        self.tar_bytes = 0
        self.records: list[dict] = []  # stats rows of the open part
        self.open_since: float | None = None  # monotonic time the open part's oldest video finished
        self.stage_seconds: Counter = Counter()
        self.stage_frames: Counter = Counter()
        self.commit_every_s, self.driver = commit_every_s, driver
        self.stopped: str | None = None  # why this writer stopped committing (its run is over)
        self.error: Exception | None = None  # a commit of the background thread that failed: raised by the next call
        self.spilled: list[dict] = []  # events of background commits, returned by the next call
        self._lock = threading.RLock()  # the actor's calls and the background thread
        self._closed = threading.Event()
        if commit_every_s is not None or driver is not None:
            threading.Thread(target=self._watch, name=f"writer-{writer_id}-watch", daemon=True).start()

    # ---- receiving rows -------------------------------------------------------------------
    def add(self, rows: list[dict]) -> list[dict]:
        """Take rows (any order, any video); returns events for finished videos and commits."""
        with self._lock:
            self._raise_if_over()
            events, self.spilled = self.spilled, []
            self._add(rows, events)
            return events

    def _raise_if_over(self) -> None:
        if self.stopped:
            raise DriverGone(f"shard writer {self.writer_id}: {self.stopped}; it commits nothing more")
        if self.error is not None:
            raise self.error

    def _add(self, rows: list[dict], events: list[dict]) -> None:
        for row in rows:
            if row["status"] == SKIPPED:
                continue
            for st, sec in row.get("timings", {}).items():
                self.stage_seconds[st] += sec
                self.stage_frames[st] += row.get("stage_frames", {}).get(st, len(row.get("frame_index", ())))
            vk = row["video_key"] or f"source:{row['source']}"  # failed before its key was known
            first = self.sources.setdefault(vk, row["source"])
            if first != row["source"]:
                events.append(self._record_video(row, FAILED, "duplicate",
                                                 f"same content as {first}", n_clips=0, dup=True))
                continue
            self.pending.setdefault(vk, []).append(self._hold(row))
            if len(self.pending[vk]) >= max(1, int(row.get("n_clips", 1))) or row["kind"] == "video":
                events.extend(self._finish_video(self.pending.pop(vk)))

    def _hold(self, row: dict) -> SpilledRow:
        """A received row as the writer keeps it until its video is complete: heavy values in a staging file."""
        self.n_held += 1
        name = f"{self.run_id}-w{self.writer_id:02d}-{self.n_held:08d}-{row['key'] or 'video'}{SPILL_SUFFIX}"
        return SpilledRow(os.path.join(self.staging, name), row)

    def _record_video(self, row: Mapping, status: str, error_class: str, message: str, n_clips: int,
                      dup: bool = False, error_stage: str | None = None) -> dict:
        """The stats row of a video (``error_stage``: instead of the row's own)."""
        stage = row.get("error_stage", "") if error_stage is None else error_stage
        rec = {"kind": "video", "key": "", "video_key": row["video_key"], "source": row["source"],
               "source_size": int(row.get("source_size", -1)), "source_mtime": float(row.get("source_mtime", 0.0)),
               "source_seconds": float(row.get("source_seconds", 0.0)), "status": status,
               "error_stage": stage if status == FAILED else "",
               "error_class": error_class, "error_message": message, "n_clips": n_clips,
               "clips_dropped": json.dumps(row.get("dropped", {}))}
        if not dup:  # a duplicate input is reported, not committed (its twin is)
            self.records.append(rec)
            if self.open_since is None:
                self.open_since = time.monotonic()
        return {"event": "video", **{k: rec[k] for k in ("video_key", "source", "status", "error_class",
                                                          "source_seconds", "n_clips")},
                "source_size": rec["source_size"], "dropped": row.get("dropped", {})}

    def _finish_video(self, rows: list[SpilledRow]) -> list[dict]:
        try:
            return self._finish_video_rows(rows)
        finally:
            for r in rows:  # also when a store error interrupts the video: its files are not left behind
                r.release()

    def _finish_video_rows(self, rows: list[SpilledRow]) -> list[dict]:
        rows.sort(key=lambda r: int(r.get("clip_index", 0)))
        head = rows[0]
        if head["kind"] == "video":  # failed before clips existed, or planned no clip
            return [self._record_video(head, FAILED, head["error_class"], head["error_message"], 0)]
        ok = [r for r in rows if r["status"] == OK]
        if ok and self.video_stages:
            for st in self.video_stages:
                t0 = time.perf_counter()
                try:
                    st.process_video(ok)
                except Exception as e:
                    for r in ok:
                        fail(r, st.name, e)
                        r["error_message"] += "\n" + traceback.format_exc(limit=3)[-1500:]
                    ok = []
                    break
                finally:
                    self.stage_seconds[st.name] += time.perf_counter() - t0
                    self.stage_frames[st.name] += sum(len(r.get("frame_index", ())) for r in rows)
        for r in rows:  # one clip in memory at a time
            if r["status"] == OK:
                try:
                    self._write_clip(r)
                except Exception as e:
                    fail(r, "writer", e)
            if r["status"] != OK:
                self.records.append(self._clip_record(r, shard=""))
            r.release()
        n_ok = sum(r["status"] == OK for r in rows)
        if n_ok:
            ev = self._record_video(head, OK, "", "", n_ok)
        else:  # every clip failed: the video fails with the most common reason
            reasons = Counter((r["error_stage"], r["error_class"]) for r in rows)
            (stage, cls), _ = reasons.most_common(1)[0]
            msg = next(r["error_message"] for r in rows if r["error_class"] == cls)
            ev = self._record_video(head, FAILED, cls, msg, 0, error_stage=stage)
        events = [ev]
        if self._due():
            events.append(self.commit())
        return events

    def _due(self) -> bool:
        """The open part is committed now: its tar is full, or its oldest video has waited commit_every_s."""
        if self.tar is not None and self.tar_bytes >= self.shard_bytes:
            return True
        return (self.commit_every_s is not None and self.open_since is not None
                and time.monotonic() - self.open_since >= self.commit_every_s)

    def _watch(self) -> None:
        """Background thread: commit a part whose oldest video has waited commit_every_s (also when no other
        video arrives), and stop for good once the run is over (checked every DRIVER_CHECK_S)."""
        checked = time.monotonic()
        while not self._closed.wait(TICK_S):
            with self._lock:
                if self.stopped or self.error is not None or self._closed.is_set():
                    return
                try:
                    if self.driver is not None and time.monotonic() - checked >= DRIVER_CHECK_S:
                        checked = time.monotonic()
                        self._check_driver()
                    if self._due():
                        self.spilled.append(self.commit())
                except DriverGone:
                    return
                except Exception as e:  # noqa: BLE001 - a store error: the next call of the actor raises it
                    self.error = e
                    return

    def _check_driver(self, published: str | None = None) -> None:
        """Raise DriverGone (after discarding the open part and a tar ``published`` just now) once the run is
        over."""
        why = self.driver.gone(self.storage) if self.driver is not None else None
        if why is None:
            return
        if published:
            self.storage.delete(tar_path(published))
        n_videos = sum(r["kind"] == "video" for r in self.records)
        self._discard()
        for rows in self.pending.values():  # this writer takes no more rows: the videos it waits for are dropped
            for r in rows:
                r.release()
        self.pending.clear()
        self.stopped = why
        print(f"[writer {self.writer_id}] {why}: its open part ({n_videos} finished videos) is discarded and "
              "nothing more is committed", file=sys.stderr, flush=True)
        raise DriverGone(f"shard writer {self.writer_id}: {why}")

    def _discard(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        if self.tar_path and os.path.exists(self.tar_path):
            os.unlink(self.tar_path)
        self.records, self.open_since = [], None

    # ---- writing -------------------------------------------------------------------------
    def _open(self) -> None:
        name = part_name(self.run_id, self.writer_id, self.seq)
        self.tar_path = os.path.join(self.staging, name + ".tar.tmp")
        self.tar = tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT)
        self.tar_bytes = 0

    def _write_clip(self, row: SpilledRow) -> None:
        row["meta"] = clip_meta(row)
        members = sample_members(row, self.fields)  # raises before anything is written
        if self.tar is None:
            self._open()
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "", ""
            self.tar.addfile(ti, io.BytesIO(data))
            self.tar_bytes += 512 + (len(data) + 511) // 512 * 512
        row["_bytes"] = sum(len(d) for _, d in members)
        self.records.append(self._clip_record(row, shard=part_name(self.run_id, self.writer_id, self.seq) + TAR_SUFFIX))

    def _clip_record(self, row: Mapping, shard: str) -> dict:
        fi = np.asarray(row.get("frame_index", []))
        rec = {"kind": "clip", "key": row["key"], "video_key": row["video_key"], "shard": shard,
               "source": row["source"], "status": row["status"], "error_stage": row["error_stage"],
               "error_class": row["error_class"], "error_message": row["error_message"],
               "clip_index": int(row.get("clip_index", -1)), "shot_index": int(row.get("shot_index", -1)),
               "n_frames": int(len(fi)), "start_frame": int(fi[0]) if len(fi) else -1,
               "end_frame": int(fi[-1]) if len(fi) else -1, "fps": float(row.get("fps", 0.0)),
               "width": int(row.get("width", 0)), "height": int(row.get("height", 0)),
               "duration_s": float(len(fi) / row["fps"]) if row.get("fps") else 0.0,
               "bytes": int(row.get("_bytes", 0)), "audio_status": str(row.get("audio_status", "")),
               "timings": json.dumps({k: round(v, 4) for k, v in row.get("timings", {}).items()})}
        for k in annotator_meta(row):
            v = row[k]
            if np.ndim(v) == 0:
                rec[k] = _plain(v)
        return rec

    def commit(self) -> dict:
        """Publish the open part: tar renamed into place, then the stats file (the commit) with the tar's size
        and sha256. The driver is asked first, and again just before the stats file."""
        with self._lock:
            name = part_name(self.run_id, self.writer_id, self.seq)
            n_clips = sum(r["kind"] == "clip" and r["status"] == OK for r in self.records)
            info = {"tar_bytes": 0, "tar_sha256": None}  # a part of failures only has no tar
            if self.tar is not None:
                self.tar.close()
                self.tar = None
                with open(self.tar_path, "rb") as f:
                    info = {"tar_bytes": os.path.getsize(self.tar_path), "tar_sha256": digest(f)}
                self._check_driver()
                self.storage.put_file(self.tar_path, tar_path(name))
                self._check_driver(published=name)
            else:
                self._check_driver()
            self.storage.write_bytes(stats_path(name), encode_stats(pd.DataFrame(self.records), info))
            self.records, self.open_since = [], None
            self.seq += 1
            return {"event": "commit", "part": name, "clips": n_clips, "bytes": info["tar_bytes"]}

    def close(self) -> list[dict]:
        """Finish: videos still missing clips fail (their clips were lost with a crashed worker), and
        the last part is committed. Returns events and the writer's stage timings."""
        with self._lock:
            self._closed.set()
            self._raise_if_over()
            events, self.spilled = self.spilled, []
            self._close(events)
            return events

    def _close(self, events: list[dict]) -> None:
        for rows in list(self.pending.values()):
            head = rows[0]
            want = int(head.get("n_clips", len(rows)))
            for r in rows:
                r["status"], r["error_stage"] = FAILED, "writer"
                r.release()
            events.append(self._record_video(head, FAILED, "incomplete",
                                             f"{len(rows)} of {want} clips arrived (a worker was lost); "
                                             "rerun to redo this video", 0, error_stage="writer"))
        self.pending.clear()
        if self.tar is not None or self.records:
            events.append(self.commit())
        events.append({"event": "timings", "stage_seconds": dict(self.stage_seconds),
                       "stage_frames": dict(self.stage_frames)})
