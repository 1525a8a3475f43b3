"""The preprocessing pipeline on Ray Data (streaming):

    list inputs → probe + plan (isolated decoder) → decode (+ encode the stored clip)
      → [annotator clip stages] → sink → shard writers (+ per-video stages) → index, report

The driver lists inputs and drops videos an earlier run committed (by source, size and mtime:
no byte is read); ``probe + plan`` computes the content key and skips keys already committed
under another name. Every row carries a status: a failure is recorded and passed along, never
raised. The driver only sees small events (video finished, part committed) for progress.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict

import numpy as np

from . import schema
from .config import ConfigError, PreprocessConfig
from .isolate import DecoderCrashed, DecoderTimeout, Isolated
from .plan import content_key, plan_video
from .stage import (FAILED, OK, SKIPPED, ClipStageActor, fail, load_stage, new_row, pack,
                    unpack)
from .shards import DATASET_FILE, FAILURES_FILE, INDEX_FILE, SHARD_DIR, SUMMARY_FILE
from .state import build_failures, build_index, load_committed, read_json, write_json, write_table
from .storage import InputFile, Storage, open_input, read_ends
from .video import VideoError, encode_mp4, read_frames, scaled_size
from .writer import ShardWriter

log = logging.getLogger("preprocess")

EXIT_OK, EXIT_FAILURES = 0, 3


# ---------------------------------------------------------------- probe + plan (per video)
def _plan_in_child(uri: str, kwargs: dict):
    """Runs in the isolated process: open the input and plan it."""
    local = "://" not in uri
    return plan_video(uri if local else "<stream>", open_fn=None if local else (lambda: open_input(uri)), **kwargs)


def probe_plan_rows(video: dict, cfg: PreprocessConfig, finished_keys: frozenset, isolated: Isolated) -> list[dict]:
    """One input → its clip rows, or one ``kind=video`` row saying why it yields none."""
    t0 = time.perf_counter()
    uri = video["source"]
    base = dict(source=uri, source_size=video["source_size"], source_mtime=video["source_mtime"])
    vrow = new_row(kind="video", video_key="", **base)
    if video["source_size"] < 0:
        return [fail(vrow, "probe", f"{uri}: file not found", "missing_file")]
    if video["source_size"] == 0:
        return [fail(vrow, "probe", f"{uri}: zero-byte file", "empty_file")]
    try:
        size, head, tail = read_ends(uri, cfg.probe.key_bytes)
    except OSError as e:
        return [fail(vrow, "probe", f"{uri}: {e}", "unreadable")]
    vk = content_key(size, head, tail)
    vrow["video_key"] = vk
    if vk in finished_keys:
        vrow["status"] = SKIPPED
        return [vrow]
    p, pl = cfg.probe, cfg.plan
    kwargs = dict(analysis_width=pl.analysis_width, threshold=pl.shot_threshold,
                  min_shot_frames=pl.min_shot_frames, target_fps=pl.target_fps,
                  min_frames=pl.min_frames, max_frames=pl.max_frames, min_seconds=p.min_seconds)
    try:
        plan = isolated.call(_plan_in_child, uri, kwargs, timeout=p.timeout_s)
    except VideoError as e:
        return [fail(vrow, "probe", e, e.reason)]
    except (DecoderCrashed, DecoderTimeout) as e:
        return [fail(vrow, "probe", f"{uri}: {e}", type(e).__name__)]
    except Exception as e:
        return [fail(vrow, "probe", f"{uri}: {type(e).__name__}: {e}", "probe_error")]
    info = plan.info
    vrow.update(source_seconds=plan.n_frames / info.fps, dropped=plan.dropped)
    if not plan.clips:
        return [fail(vrow, "plan", f"{uri}: no shot has {pl.min_frames} frames at "
                     f"{plan.fps:.3g} fps ({len(plan.shots)} shots, longest "
                     f"{max(b - a for a, b in plan.shots)} source frames)", "too_short")]
    seconds = time.perf_counter() - t0
    rows = []
    for c in plan.clips:
        rows.append(new_row(
            key=schema.clip_key(vk, c.clip_index), video_key=vk, kind="clip", **base,
            source_seconds=plan.n_frames / info.fps, dropped=plan.dropped, n_clips=len(plan.clips),
            clip_index=c.clip_index, shot_index=c.shot_index, frame_index=c.frame_index,
            timestamps=c.frame_index.astype(np.float64) / info.fps, fps=plan.fps,
            start_frame=int(c.frame_index[0]), end_frame=int(c.frame_index[-1]), n_frames=len(c.frame_index),
            src_fps=info.fps, src_width=info.width, src_height=info.height, src_codec=info.codec,
            src_rotation=info.rotation, src_start_pts=info.start_pts,
            timings={"plan": seconds} if c.clip_index == 0 else {},
            stage_frames={"plan": plan.n_frames} if c.clip_index == 0 else {}))
    return rows


class ProbePlanActor:
    """Probe + plan stage: each actor keeps one isolated decoder process for its whole life."""

    def __init__(self, cfg: PreprocessConfig, finished_keys: frozenset):
        self.cfg, self.finished_keys = cfg, finished_keys
        self.isolated = Isolated()

    def __call__(self, batch: dict) -> dict:
        rows = []
        for v in unpack(batch):
            rows.extend(probe_plan_rows(v, self.cfg, self.finished_keys, self.isolated))
        return pack(rows)


# ---------------------------------------------------------------- decode (per clip)
def decode_row(row: dict, cfg: PreprocessConfig) -> dict:
    """Decode a clip's frames once (shared by every annotator) and encode the stored clip."""
    if row["status"] != OK or row["kind"] != "clip":
        return row
    d = cfg.decode
    try:
        t0 = time.perf_counter()
        size = scaled_size(row["src_width"], row["src_height"], d.max_side)
        fobj = None if "://" not in row["source"] else open_input(row["source"])
        frames = read_frames(row["source"], row["frame_index"], rotation=row["src_rotation"], size=size,
                             backend=d.backend, start_pts=row["src_start_pts"], fileobj=fobj)
        t1 = time.perf_counter()
        row["video"] = encode_mp4(frames, row["fps"], crf=d.crf, preset=d.preset)
        t2 = time.perf_counter()
    except VideoError as e:
        return fail(row, "decode", e, e.reason)
    except Exception as e:
        return fail(row, "decode", e)
    row.update(frames=frames, width=size[0], height=size[1])
    row["timings"].update(decode=t1 - t0, encode=t2 - t1)
    return row


class DecodeActor:
    """The decode stage as its own actor pool. Were planning and decoding tasks, Ray Data would fuse
    them with each other (holding every clip of a long video in one task) and with the first annotator
    (serialising decoding with model inference)."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        return pack([decode_row(r, self.cfg) for r in unpack(batch)])


# ---------------------------------------------------------------- sink → writers
def writer_name(run_id: str, i: int) -> str:
    return f"dreamactor-writer-{run_id}-{i}"


_WRITERS: dict = {}


def route(row: dict, n: int) -> int:
    """The writer of a row: by video key, so all clips of a video meet in one writer."""
    k = row["video_key"] or row["source"]
    return zlib.crc32(k.encode()) % n


def sink_batch(batch: dict, run_id: str, n_writers: int, namespace: str) -> dict:
    """Hand rows to their writers (frames dropped: the clip travels as its MP4); return events."""
    import ray

    rows = unpack(batch)
    by_writer: dict[int, list[dict]] = {}
    events: list[dict] = []
    for r in rows:
        r.pop("frames", None)
        if r["status"] == SKIPPED:
            events.append({"event": "video", "status": "skipped", "video_key": r["video_key"],
                           "source": r["source"], "source_size": r["source_size"]})
            continue
        by_writer.setdefault(route(r, n_writers), []).append(r)
    refs = []
    for i, rs in by_writer.items():
        name = writer_name(run_id, i)
        if name not in _WRITERS:
            _WRITERS[name] = ray.get_actor(name, namespace=namespace)
        refs.append(_WRITERS[name].add.remote(rs))
    for evs in ray.get(refs):
        events.extend(evs)
    return {"event": np.array([json.dumps(e, default=float) for e in events], dtype=object)}


# ---------------------------------------------------------------- driver
class Progress:
    """Videos done/total, source hours done/total (estimated from bytes until all are probed), ETA."""

    def __init__(self, videos: list[InputFile], interval_s: float):
        self.n = len(videos)
        self.total_bytes = sum(max(v.size, 0) for v in videos) or 1
        self.done = self.bytes = 0
        self.seconds = 0.0
        self.failed = 0
        self.clips = 0
        self.t0 = self.last = time.time()
        self.interval = interval_s

    def video(self, ev: dict) -> None:
        self.done += 1
        self.bytes += max(int(ev.get("source_size", 0) or 0), 0)
        self.seconds += float(ev.get("source_seconds", 0.0) or 0.0)
        self.clips += int(ev.get("n_clips", 0) or 0)
        self.failed += ev.get("status") == FAILED

    def line(self) -> str:
        el = time.time() - self.t0
        frac = self.bytes / self.total_bytes
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        hours_total = self.seconds / 3600 / frac if frac > 0 else float("nan")
        return (f"[preprocess] videos {self.done}/{self.n} · source hours {self.seconds / 3600:.3f}/"
                f"{'≈' if self.done < self.n else ''}{hours_total:.3f} · clips {self.clips} · failed {self.failed}"
                f" · elapsed {_hms(el)} · ETA {_hms(eta) if math.isfinite(eta) else '?'}")

    def maybe_print(self, force: bool = False) -> None:
        if force or time.time() - self.last >= self.interval:
            print(self.line(), file=sys.stderr, flush=True)
            self.last = time.time()


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def enabled_stage_groups(cfg: PreprocessConfig) -> list[str]:
    """Schema groups written by the enabled stages (instantiated, not set up: no model loads)."""
    groups: list[str] = []
    for section in (cfg.annotators, cfg.video_stages):
        for name, spec in section.items():
            if not spec.enabled:
                continue
            st = load_stage(name, spec)
            for w in st.writes:
                if w in schema.FIELDS_BY_NAME and schema.FIELDS_BY_NAME[w].group not in groups:
                    groups.append(schema.FIELDS_BY_NAME[w].group)
    return [g for g in schema.GROUPS if g in groups and g != "clip"]


def check_dataset_file(storage: Storage, groups: list[str], cfg: PreprocessConfig) -> dict:
    """The output's dataset.json must agree with this run (same schema version and field groups)."""
    want = {"schema_version": schema.SCHEMA_VERSION, "groups": ["clip", *groups],
            "plan": asdict(cfg.plan), "decode": {"max_side": cfg.decode.max_side}}
    if storage.exists(DATASET_FILE):
        have = read_json(storage, DATASET_FILE)
        for k in ("schema_version", "groups", "plan", "decode"):
            if have.get(k) != want[k]:
                raise ConfigError(
                    f"output={cfg.output!r} holds a dataset written with {k}={have.get(k)!r}, but this run "
                    f"has {k}={want[k]!r}; resuming would mix formats. Use a new output= or delete the old one.")
        return have
    write_json(storage, DATASET_FILE, {**want, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return want


def init_ray(cfg: PreprocessConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(namespace=cfg.ray.namespace, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a fresh Ray of our own, even if `ray start` left a cluster on this machine
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
    return ray


def check_reservations(cfg: PreprocessConfig, cluster_cpus: float) -> float:
    """Warn when the actor pools and writers cannot all be placed at once (a stage would then wait
    for an earlier pool to retire, and the pipeline would run stage after stage instead of streaming)."""
    s = cfg.stages
    need = sum(s[n].num_cpus * s[n].min_actors for n in ("probe", "decode"))
    need += sum(a.resources.num_cpus * a.resources.min_actors for a in cfg.annotators.values() if a.enabled)
    need += cfg.writer.num_cpus * cfg.writer.num_writers + s["sink"].num_cpus
    if need > cluster_cpus + 1e-9:
        log.warning("actor pools reserve %.2f CPUs but the cluster has %.2f: stages will wait for each other. "
                    "Lower stages.*.num_cpus / annotators.*.resources.num_cpus or min_actors.", need, cluster_cpus)
    return need


def unique_inputs(inputs: list[InputFile]) -> tuple[list[InputFile], list[InputFile]]:
    """Inputs with each path once (first occurrence kept), and the repeated entries (a manifest that lists a
    file twice must not write its clips twice; the repeats are recorded as duplicates)."""
    seen: set[str] = set()
    unique, repeated = [], []
    for v in inputs:
        (repeated if v.uri in seen else unique).append(v)
        seen.add(v.uri)
    return unique, repeated


def run(cfg: PreprocessConfig, inputs: list[InputFile]) -> int:
    """Run the whole job; returns the exit code (0: all good, 3: some inputs failed)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    t_start = time.time()
    storage = Storage(cfg.output)
    groups = enabled_stage_groups(cfg)
    check_dataset_file(storage, groups, cfg)
    inputs, listed_twice = unique_inputs(inputs)
    committed = load_committed(storage)
    finished = committed.finished(cfg.retry_failed)
    by_source = {(r["source"], int(r["source_size"]), float(r["source_mtime"])) for r in finished.to_dict("records")}
    todo = [v for v in inputs if (v.uri, v.size, v.mtime) not in by_source]
    n_skipped_listing = len(inputs) - len(todo)
    log.info("%d inputs; %d already committed by earlier runs; %d to do", len(inputs), n_skipped_listing, len(todo))

    events: list[dict] = []
    stream_seconds = 0.0  # from the first input entering the pipeline to the last shard committed
    stage_seconds: Counter = Counter()
    stage_frames: Counter = Counter()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)
    if todo:
        init_ray(cfg)
        check_reservations(cfg, float(ray.cluster_resources().get("CPU", 0.0)))
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = cfg.ray.progress_bars
        ctx.execution_options.preserve_order = False
        writers = [ray.remote(ShardWriter).options(
            name=writer_name(run_id, i), namespace=cfg.ray.namespace, num_cpus=cfg.writer.num_cpus,
            max_concurrency=1).remote(cfg.output, i, run_id, cfg.writer.shard_bytes, groups, cfg.video_stages)
            for i in range(cfg.writer.num_writers)]
        ray.get([w.__ray_ready__.remote() for w in writers])
        finished_keys = frozenset(finished["video_key"]) if len(finished) else frozenset()
        items = sorted(todo, key=lambda v: (-v.size, v.uri))  # long videos first: better packing
        video_rows = [new_row(kind="video", source=v.uri, source_size=v.size, source_mtime=v.mtime) for v in items]
        ds = ray.data.from_items([{c: col[0] for c, col in pack([r]).items()} for r in video_rows],
                                 override_num_blocks=max(1, min(len(items), 200)))
        s = cfg.stages
        ds = ds.map_batches(ProbePlanActor, fn_constructor_args=(cfg, finished_keys),
                            batch_size=s["probe"].batch_size, num_cpus=s["probe"].num_cpus,
                            num_gpus=s["probe"].num_gpus, batch_format="numpy",
                            compute=ActorPoolStrategy(min_size=s["probe"].min_actors, max_size=s["probe"].max_actors))
        ds = ds.map_batches(DecodeActor, fn_constructor_args=(cfg,), batch_size=s["decode"].batch_size,
                            num_cpus=s["decode"].num_cpus, num_gpus=s["decode"].num_gpus, batch_format="numpy",
                            compute=ActorPoolStrategy(min_size=s["decode"].min_actors,
                                                      max_size=s["decode"].max_actors))
        for name, spec in cfg.annotators.items():
            if not spec.enabled:
                continue
            r = spec.resources
            actor_cls = type(name, (ClipStageActor,), {})  # so Ray's plan and progress bars name the stage
            ds = ds.map_batches(actor_cls, fn_constructor_args=(name, spec), batch_size=r.batch_size,
                                num_cpus=r.num_cpus, num_gpus=r.num_gpus, batch_format="numpy",
                                compute=ActorPoolStrategy(min_size=r.min_actors, max_size=r.max_actors))
        ds = ds.map_batches(sink_batch, fn_kwargs=dict(run_id=run_id, n_writers=cfg.writer.num_writers,
                                                       namespace=cfg.ray.namespace),
                            batch_size=s["sink"].batch_size, num_cpus=s["sink"].num_cpus, batch_format="numpy")
        progress = Progress(todo, cfg.progress_interval_s)
        t_stream = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for e in batch["event"]:
                ev = json.loads(e)
                events.append(ev)
                if ev["event"] == "video":
                    progress.video(ev)
            progress.maybe_print()
        for evs in ray.get([w.close.remote() for w in writers]):
            events.extend(evs)
        stream_seconds = time.time() - t_stream
        progress.maybe_print(force=True)
        for w in writers:
            ray.kill(w)
        for ev in events:
            if ev["event"] == "timings":
                stage_seconds.update(ev["stage_seconds"])
                stage_frames.update(ev.get("stage_frames", {}))

    # ---- consolidate: index, failures, summary, report
    if storage.local and os.path.isdir(storage.path("_staging")) and not os.listdir(storage.path("_staging")):
        os.rmdir(storage.path("_staging"))
    committed = load_committed(storage, cleanup=False)
    index = build_index(committed)
    dup_failures = [{"kind": "video", "video_key": e["video_key"], "key": "", "source": e["source"],
                     "stage": "writer", "error_class": "duplicate", "error_message": "same content as another input"}
                    for e in events if e["event"] == "video" and e.get("error_class") == "duplicate"]
    dup_failures += [{"kind": "video", "video_key": "", "key": "", "source": v.uri, "stage": "list",
                      "error_class": "duplicate", "error_message": "listed more than once in the input: processed once"}
                     for v in listed_twice]
    failures = build_failures(committed, dup_failures)
    write_table(storage, INDEX_FILE, index)
    write_table(storage, FAILURES_FILE, failures)
    vids = [e for e in events if e["event"] == "video"]
    run_failed = [e for e in vids if e["status"] == FAILED]
    run_failed += [{"error_class": "duplicate", "source": v.uri} for v in listed_twice]
    summary = {
        "run_id": run_id, "output": storage.uri, "wall_seconds": round(time.time() - t_start, 3),
        "stream_seconds": round(stream_seconds, 3),
        "inputs": len(inputs), "inputs_listed_twice": len(listed_twice), "skipped_already_done": n_skipped_listing + sum(e["status"] == "skipped" for e in vids),
        "videos_done": sum(e["status"] == OK for e in vids), "videos_failed": len(run_failed),
        "failures_by_reason": dict(Counter(e["error_class"] for e in run_failed)),
        "clips_written": sum(int(e.get("n_clips", 0)) for e in vids if e["status"] == OK),
        "hours_in": round(sum(float(e.get("source_seconds", 0) or 0) for e in vids) / 3600, 6),
        "hours_out": round(float(index.loc[index["shard"].str.startswith(run_id), "duration_s"].sum()) / 3600, 6)
        if len(index) else 0.0,
        "dataset_clips": int(len(index)), "dataset_shards": int(index["shard"].nunique()) if len(index) else 0,
        "dataset_bytes": int(sum(e["bytes"] for e in events if e["event"] == "commit")),
        "parts_committed_this_run": sum(e["event"] == "commit" for e in events),
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "stage_frames": dict(stage_frames),
        "stage_frames_per_s": {k: round(stage_frames[k] / v, 2) for k, v in stage_seconds.items() if v > 0},
    }
    shot_drops: Counter = Counter()
    for e in vids:
        shot_drops.update(e.get("dropped") or {})
    summary["shots_dropped_by_reason"] = dict(shot_drops)  # shots too short to make a clip, in videos that made others
    write_json(storage, SUMMARY_FILE, summary)
    report = write_report(storage, index, failures, summary)
    preview = write_preview(storage, index, run_id)
    print(f"[preprocess] shards:   {storage.url(SHARD_DIR)}\n[preprocess] index:    {storage.url(INDEX_FILE)}\n"
          f"[preprocess] failures: {storage.url(FAILURES_FILE)} ({len(run_failed)} this run)\n"
          f"[preprocess] summary:  {storage.url(SUMMARY_FILE)}" + (f"\n[preprocess] report:   {report}" if report else "")
          + (f"\n[preprocess] preview:  {preview}" if preview else ""), flush=True)
    return EXIT_FAILURES if run_failed else EXIT_OK


def write_preview(storage: Storage, index, run_id: str) -> str | None:
    """An overlay video of the first clip this run wrote (annotated datasets); never fails the run."""
    if not storage.local or not len(index):
        return None
    fresh = index[index["shard"].str.startswith(run_id)]
    if not len(fresh):
        return None
    try:
        from .preview import write_preview as _write
        return _write(storage.root, key=str(fresh["key"].iloc[0]))
    except Exception as e:
        log.warning("preview failed: %s: %s", type(e).__name__, e)
        return None


def write_report(storage: Storage, index, failures, summary) -> str | None:
    """The dataset report (plots), when the report module is available; never fails the run."""
    try:
        from .report import write_report as _write
    except ImportError:
        return None
    if not storage.local:
        return None
    try:
        return _write(storage.root, index, failures, summary)
    except Exception as e:  # a plot must never cost the dataset
        log.warning("report failed: %s: %s", type(e).__name__, e)
        return None
