"""What an output directory already holds: committed parts, finished videos, and the consolidated
``index.parquet`` / ``failures.parquet`` rebuilt from the parts' stats files.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pandas as pd

from .schema import ANNOTATOR_META_PREFIX
from .shards import SHARD_DIR, STATS_SUFFIX, TAR_SUFFIX, stats_path
from .storage import Storage

INDEX_COLUMNS = ["key", "shard", "video_key", "clip_index", "shot_index", "source", "n_frames", "start_frame",
                 "end_frame", "fps", "width", "height", "duration_s", "bytes"]
FAILURE_COLUMNS = ["kind", "video_key", "key", "source", "stage", "error_class", "error_message"]


@dataclass
class Committed:
    """Everything the committed parts of an output say."""

    parts: list[str] = field(default_factory=list)
    stats: pd.DataFrame = field(default_factory=pd.DataFrame)

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
    frames = []
    for p in sorted(stats_parts):
        df = pd.read_parquet(io.BytesIO(storage.read_bytes(stats_path(p))))
        df["part"] = p
        frames.append(df)
    stats = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Committed(parts=sorted(stats_parts), stats=stats)


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


def build_failures(c: Committed, run_failures: list[dict] | None = None) -> pd.DataFrame:
    """Failed videos and clips of every committed part, plus this run's uncommitted ones."""
    rows = []
    if not c.stats.empty:
        bad = c.stats[c.stats["status"] == "failed"]
        for r in bad.to_dict("records"):
            rows.append({"kind": r["kind"], "video_key": r["video_key"], "key": r.get("key") or "",
                         "source": r["source"], "stage": r.get("error_stage") or "",
                         "error_class": r["error_class"], "error_message": r["error_message"]})
    rows.extend(run_failures or [])
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
