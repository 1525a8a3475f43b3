"""What an output directory already holds: committed parts, finished videos, and the consolidated
``index.parquet`` / ``failures.parquet`` rebuilt from the parts' stats files; which committed parts are
damaged (a tar truncated, changed or deleted after its commit), and their retirement.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field

import pandas as pd

from .schema import ANNOTATOR_META_PREFIX
from .shards import (
    INDEX_FILE,
    RETIRED_DIR,
    SHARD_DIR,
    STATS_SUFFIX,
    TAR_ERRORS,
    TAR_SUFFIX,
    decode_stats,
    digest,
    iter_members,
    run_of,
    stats_path,
    tar_path,
)
from .storage import Storage

log = logging.getLogger("preprocess")

INDEX_COLUMNS = ["key", "shard", "video_key", "clip_index", "shot_index", "source", "n_frames", "start_frame",
                 "end_frame", "fps", "width", "height", "duration_s", "bytes", "audio_status"]
FAILURE_COLUMNS = ["kind", "video_key", "key", "source", "stage", "error_class", "error_message", "run_id", "latest"]


@dataclass
class Committed:
    """Everything the committed parts of an output say."""

    parts: list[str] = field(default_factory=list)
    stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    info: dict[str, dict] = field(default_factory=dict)  # part -> its tar's recorded size and sha256 ({}: not recorded)

    def without(self, parts) -> Committed:
        """The same output less some parts (retired ones)."""
        drop = set(parts)
        keep = [p for p in self.parts if p not in drop]
        stats = self.stats[~self.stats["part"].isin(drop)].reset_index(drop=True) if len(self.stats) else self.stats
        return Committed(keep, stats, {p: self.info[p] for p in keep if p in self.info})

    def clip_keys(self) -> dict[str, set[str]]:
        """{part: keys of the clips it committed}."""
        if self.stats.empty:
            return {}
        ok = self.stats[(self.stats["kind"] == "clip") & (self.stats["status"] == "ok")]
        return {p: set(keys) for p, keys in ok.groupby("part")["key"]}

    def videos(self) -> pd.DataFrame:
        if self.stats.empty:
            return pd.DataFrame(columns=["video_key", "source", "source_size", "source_mtime", "status"])
        return self.stats[self.stats["kind"] == "video"]

    def finished(self, retry_failed: bool) -> pd.DataFrame:
        """Videos a rerun must not redo: done, and failed ones unless ``retry_failed``."""
        v = self.videos()
        return v if not retry_failed else v[v["status"] == "ok"]


def load_committed(storage: Storage, cleanup: bool = True) -> Committed:
    """Read every committed stats file; with ``cleanup``, delete debris of killed runs (tars without
    a stats file, temporary files)."""
    names = storage.list(SHARD_DIR)
    stats_parts = {n[:-len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
    if cleanup:
        for n in names:
            if n.endswith(".tmp") or (n.endswith(TAR_SUFFIX) and n[:-len(TAR_SUFFIX)] not in stats_parts):
                storage.delete(f"{SHARD_DIR}/{n}")
        if storage.local:  # half-built shards of a killed run
            import glob
            import os
            for p in glob.glob(storage.path("_staging/*.tmp")):
                os.unlink(p)
    frames, info = [], {}
    for p in sorted(stats_parts):
        df, info[p] = decode_stats(storage.read_bytes(stats_path(p)))
        df["part"] = p
        frames.append(df)
    stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Committed(parts=sorted(stats_parts), stats=stats, info=info)


def check_part(storage: Storage, part: str, info: dict, size: int | None, keys: set[str], deep: bool) -> str | None:
    """Why a committed part is damaged (None when it is whole): its tar is missing or has another size than
    committed; with ``deep``, its sha256 differs. A part written before parts recorded their size (``info`` {})
    is checked for a missing tar, and with ``deep`` read to its end and compared with the keys it committed."""
    name = f"{SHARD_DIR}/{part}{TAR_SUFFIX}"
    if info:
        if not info.get("tar_bytes"):
            return None  # a part of failures only: no tar
        if size is None:
            return f"{name} is missing"
        if size != info["tar_bytes"]:
            return f"{name} has {size} bytes but {info['tar_bytes']} were committed (truncated or overwritten)"
        if deep:
            with storage.fs.open_input_stream(storage.path(tar_path(part))) as f:
                if digest(f) != info["tar_sha256"]:
                    return f"{name} has another sha256 than the one committed (its bytes changed)"
        return None
    if not keys:
        return None
    if size is None:
        return f"{name} is missing"
    if deep:
        try:
            with storage.fs.open_input_stream(storage.path(tar_path(part))) as f:
                found = {m.key for m in iter_members(f, select=lambda k, m: False)}
        except TAR_ERRORS as e:
            return f"{name} is unreadable or truncated ({type(e).__name__}: {e})"
        if keys - found:
            return f"{name} lacks {len(keys - found)} of the {len(keys)} clips committed"
    return None


def damaged_parts(storage: Storage, c: Committed, deep: bool) -> dict[str, str]:
    """{part: why} of the committed parts whose tar is damaged (see :func:`check_part`); one listing of the shards
    for the sizes, and every tar read through when ``deep``."""
    sizes, keys = storage.sizes(SHARD_DIR), c.clip_keys()
    out = {}
    for part in c.parts:
        why = check_part(storage, part, c.info.get(part, {}), sizes.get(part + TAR_SUFFIX), keys.get(part, set()), deep)
        if why:
            out[part] = why
    return out


def retire_damaged(storage: Storage, committed: Committed, deep: bool, run_id: str) -> tuple[Committed, dict[str, str]]:
    """What a run does first: committed parts whose tar is missing, of another size than committed or (``deep``)
    of another sha256 are retired. The index is rewritten without them first (it never lists a damaged part), then
    they are uncommitted, so that this run redoes their videos. Returns (the parts left, {retired part: why})."""
    damaged = damaged_parts(storage, committed, deep)
    if damaged:
        for part, why in damaged.items():
            log.warning("%s: committed part %s is damaged: it is retired and its videos are redone", why, part)
        committed = committed.without(damaged)
        write_table(storage, INDEX_FILE, build_index(committed))
        retire_parts(storage, damaged, run_id)
    return committed, damaged


def retire_parts(storage: Storage, damaged: dict[str, str], run_id: str) -> None:
    """Uncommit damaged parts so that their videos are redone: the stats file is kept under ``_retired/`` with
    the reason, then deleted from ``shards/`` (one atomic delete: from then on the part is not committed), then
    its tar is deleted. A run killed in between leaves a tar without a stats file: debris the next run deletes."""
    for part, why in damaged.items():
        storage.write_bytes(f"{RETIRED_DIR}/{part}{STATS_SUFFIX}", storage.read_bytes(stats_path(part)))
        write_json(storage, f"{RETIRED_DIR}/{part}.json", {"part": part, "reason": why, "retired_by": run_id,
                                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        storage.delete(stats_path(part))
        storage.delete(tar_path(part))


def build_index(c: Committed) -> pd.DataFrame:
    """One row per committed clip: the engine's columns then every annotator scalar (``m_*``)."""
    if c.stats.empty:
        return pd.DataFrame(columns=INDEX_COLUMNS)
    clips = c.stats[(c.stats["kind"] == "clip") & (c.stats["status"] == "ok")]
    if clips.empty:  # every video failed (its stats rows carry no clip columns): an empty index, not a crash
        return pd.DataFrame(columns=INDEX_COLUMNS)
    extra = sorted(col for col in clips.columns if col.startswith(ANNOTATOR_META_PREFIX))
    cols = INDEX_COLUMNS + ["timings"] + extra
    out = clips[[col for col in cols if col in clips.columns]].sort_values("key").reset_index(drop=True)
    for col in ("clip_index", "shot_index", "n_frames", "start_frame", "end_frame", "width", "height", "bytes"):
        out[col] = out[col].astype("int64")
    return out


def build_failures(c: Committed, run_failures: list[dict] | None = None, run_id: str = "") -> pd.DataFrame:
    """Failed videos and clips of every committed part, plus this run's uncommitted ones (``run_id``).

    ``run_id`` says which run recorded a row; ``latest`` is True for the rows of an input's latest attempt (by
    source): after ``retry_failed=true`` an earlier failure stays on record with ``latest`` False, beside the
    retry's clips or its own, newer failure row."""
    rows = []
    if not c.stats.empty:
        attempts = c.stats[c.stats["kind"] == "video"].groupby("source")["part"].max()  # parts sort by run time
        bad = c.stats[c.stats["status"] == "failed"]
        for r in bad.to_dict("records"):
            rows.append({"kind": r["kind"], "video_key": r["video_key"], "key": r.get("key") or "",
                         "source": r["source"], "stage": r.get("error_stage") or "",
                         "error_class": r["error_class"], "error_message": r["error_message"],
                         "run_id": run_of(r["part"]), "latest": r["part"] >= attempts.get(r["source"], r["part"])})
    rows.extend({**f, "run_id": run_id, "latest": True} for f in run_failures or [])
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def write_table(storage: Storage, rel: str, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    storage.write_bytes(rel, buf.getvalue())


def read_table(storage: Storage, rel: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(storage.read_bytes(rel)))


def read_json(storage: Storage, rel: str) -> dict:
    return json.loads(storage.read_bytes(rel))


def write_json(storage: Storage, rel: str, obj: dict) -> None:
    storage.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
