"""The preprocessing driver: builds the pipeline of stages, streams the inputs through it on Ray Data and
consolidates the output:

    list inputs → probe + plan (isolated decoder) → decode (+ encode the stored clip)
      → [annotator clip stages] → sink → shard writers (+ per-video stages) → index, report

Every step is a Stage (``stage.py``; the engine's own in ``engine.py``, the annotators in ``annotators/``),
checked when the pipeline is built and mapped onto Ray Data by ``adapter.map_stage``. The driver holds the output's
lock for the whole run (``lock.py``: a second run is refused), retires committed parts whose tar is damaged (their
videos are redone), lists inputs and drops videos an earlier run committed (by source, size and mtime: no byte is
read); ``probe + plan``
computes the content key and skips keys already committed under another name. Every row carries a status: a
failure is recorded and passed along, never raised. The driver only sees small events (video finished, part
committed) for progress.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import asdict

from models.redact import redact_text, redact_url

from . import schema
from .adapter import from_rows, map_stage, set_data_context, unpack
from .config import ConfigError, PreprocessConfig
from .engine import INPUT_COLUMNS, DecodeStage, ProbePlanStage, SinkStage, input_row
from .lock import OutputLock
from .shards import DATASET_FILE, FAILURES_FILE, INDEX_FILE, SHARD_DIR, SUMMARY_FILE
from .stage import FAILED, OK, ClipStage, FusedStage, Stage, VideoStage, check_stages, load_stage, written_groups
from .state import build_failures, build_index, load_committed, read_json, retire_damaged, write_json, write_table
from .storage import InputFile, Storage
from .writer import ShardWriter, writer_name

log = logging.getLogger("preprocess")

EXIT_OK, EXIT_FAILURES = 0, 3


def build_stages(cfg: PreprocessConfig, run_id: str) -> list[Stage]:
    """Every step in run order: probe + plan, decode, the enabled clip stages, the sink, the enabled video stages
    (run by the writers). Instantiated, not set up (no model loads), and checked: each stage reads only columns
    written before it and writes only columns of the schema."""
    s = cfg.stages
    head = [ProbePlanStage({"probe": cfg.probe, "plan": cfg.plan}).using(s["probe"]),
            DecodeStage({"decode": cfg.decode}).using(s["decode"])]
    annotators = [load_stage(name, spec, ClipStage) for name, spec in cfg.annotators.items() if spec.enabled]
    sink = SinkStage({"run_id": run_id, "n_writers": cfg.writer.num_writers, "namespace": cfg.ray.namespace}) \
        .using(s["sink"])
    video = [load_stage(name, spec, VideoStage) for name, spec in cfg.video_stages.items() if spec.enabled]
    # checked stage by stage, so that an error names the stage, fused or not
    check_stages([*head, *annotators, sink, *video], given=INPUT_COLUMNS)
    if annotators:
        annotators[-1].last_frames = True
    if cfg.fuse is not None and annotators:  # one actor pool runs them all, clip by clip, and hands on to the writers
        return [*head, FusedStage([*annotators, sink]).using(cfg.fuse), *video]
    return [*head, *annotators, sink, *video]


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


def check_dataset_file(storage: Storage, groups: list[str], cfg: PreprocessConfig,
                       dims: dict[str, int] | None = None) -> dict:
    """The output's dataset.json must agree with this run (same schema version, field groups and named sizes, e.g.
    the identity backend's embedding length)."""
    want = {"schema_version": schema.SCHEMA_VERSION, "groups": ["clip", *groups],
            "plan": asdict(cfg.plan), "decode": {"max_side": cfg.decode.max_side}, "dims": dict(dims or {})}
    if storage.exists(DATASET_FILE):
        have = read_json(storage, DATASET_FILE)
        for k in ("schema_version", "groups", "plan", "decode", "dims"):
            if have.get(k) != want[k]:
                raise ConfigError(
                    f"output={cfg.output!r} holds a dataset written with {k}={have.get(k)!r}, but this run "
                    f"has {k}={want[k]!r}; resuming would mix formats. Use a new output= or delete the old one.")
        return have
    write_json(storage, DATASET_FILE, {**want, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return want


def stage_dims(stages: list[Stage]) -> dict[str, int]:
    """The named sizes the stages fix for the dataset (schema.DEFAULT_DIMS names them), e.g. ``identity_dim``."""
    return {k: v for st in stages for k, v in st.dims().items()}


def init_ray(cfg: PreprocessConfig):
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"namespace": cfg.ray.namespace, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a fresh Ray of our own, even if `ray start` left a cluster on this machine; the reaper ends its
        # processes if this one is killed (Ray's fate sharing misses the agents, and workers finish their calls)
        quiet_local_ray()
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, include_dashboard=False, **kwargs)
        from . import reaper
        global _reaper
        _reaper = reaper.start()
    return ray


_reaper = None  # the local Ray's reaper process (see reaper.py)


def quiet_local_ray() -> None:
    """Settings for a local Ray started by this process (read by its raylet at start; the environment wins): no
    idle workers started ahead of need (every stage here is an actor pool or tasks that start their own workers,
    and each prestarted worker costs ~1.5 CPU-s of imports, on a 2-core machine a share of a short run), no
    metrics export (docs/performance.md, "Stages alone vs the whole pipeline")."""
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # no Prometheus metrics (the run's own progress lines, summary and report.html say what happened): their
    # recording costs the driver's scheduling loop and every worker CPU time on each step
    os.environ.setdefault("RAY_enable_metrics_collection", "0")


def check_reservations(cfg: PreprocessConfig, stages: list[Stage], cluster_cpus: float) -> float:
    """Warn when the actor pools and writers cannot all be placed at once (a stage would then wait
    for an earlier pool to retire, and the pipeline would run stage after stage instead of streaming)."""
    need = reserved_cpus(cfg, mapped(stages))
    if need > cluster_cpus + 1e-9:
        log.warning("actor pools reserve %.2f CPUs but the cluster has %.2f: stages will wait for each other. "
                    "Lower stages.*.num_cpus / annotators.*.resources.num_cpus or min_actors.", need, cluster_cpus)
    return need


def check_gpus(cfg: PreprocessConfig, stages: list[Stage], cluster_gpus: float) -> None:
    """Stages that ask for GPUs on a cluster that has none would wait forever without a word: a local Ray (it never
    gains a GPU) is refused with what to change; a remote cluster gets a warning (its autoscaler may still add GPU
    nodes)."""
    wants = sorted({st.name for st in mapped(stages) if st.resources and st.resources.num_gpus > 0})
    if not wants or cluster_gpus > 0:
        return
    what = (f"stages {wants} ask for GPUs (their resources.num_gpus) but the Ray cluster has none")
    fix = ("run on GPU nodes, or give those stages num_gpus=0 (e.g. without +cluster=prod, whose model stages "
           "take GPU fractions and MediaPipe's GPU delegate)")
    if cfg.ray.address == "local":
        raise ConfigError(f"{what}: this local Ray sees no GPU, so they would never start; {fix}")
    log.warning("%s now: they wait until the cluster adds GPU nodes; if it never will, %s", what, fix)


def reserved_cpus(cfg: PreprocessConfig, stages: list[Stage]) -> float:
    """CPUs that ``stages`` (each actor pool at its minimum, a task stage once) and the writers reserve."""
    need = sum(st.resources.num_cpus * (st.resources.pool[0] if st.actor else 1) for st in stages)
    return need + cfg.writer.num_cpus * cfg.writer.num_writers


def fit_fused_pool(cfg: PreprocessConfig, stages: list[Stage], cluster_cpus: float) -> None:
    """Cap the fused stage's pool at the actors the cluster's CPUs hold beside every other pool's minimum and the
    writers: an actor beyond that would load every model and then wait for CPUs the others hold (on a 2-core
    machine a third one cost 2 CPU-seconds of a 75-second run and did no work)."""
    fused = [st for st in mapped(stages) if isinstance(st, FusedStage)]
    if not fused or cluster_cpus <= 0:
        return
    st = fused[0]
    r = st.resources
    others = reserved_cpus(cfg, [o for o in mapped(stages) if o is not st])
    lo, hi = r.pool
    fit = int((cluster_cpus - others) // r.num_cpus + 1e-9) if r.num_cpus > 0 else hi
    new_lo = max(1, min(lo, fit))  # a minimum the cluster cannot place would hold the run up
    new_hi = max(new_lo, min(hi, fit))
    if (new_lo, new_hi) != (lo, hi):
        log.info("fuse: the %s pool holds %d-%d actors on %.2f CPUs (fuse: min_actors=%d, max_actors=%d)", st.name,
                 new_lo, new_hi, cluster_cpus, lo, hi)
        st.resources = dataclasses.replace(r, min_actors=new_lo, max_actors=new_hi)


def mapped(stages: list[Stage]) -> list[Stage]:
    """The stages that run on Ray Data (the video stages run inside the shard writers)."""
    return [st for st in stages if not isinstance(st, VideoStage)]


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
    """Run the whole job under the output's lock; returns the exit code (0: all good, 3: some inputs failed).
    Raises ``OutputBusy`` (a ConfigError: exit 2) when another live run holds the output."""
    t_start = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)
    storage = Storage(cfg.output)
    stages = build_stages(cfg, run_id)
    with OutputLock(storage, run_id, cfg.lock) as lock:
        return run_locked(cfg, inputs, storage, stages, run_id, lock, t_start)


def run_locked(cfg: PreprocessConfig, inputs: list[InputFile], storage: Storage, stages: list[Stage], run_id: str,
               lock: OutputLock, t_start: float) -> int:
    """The run, once it holds the output."""
    import ray

    groups = written_groups(stages)
    check_dataset_file(storage, groups, cfg, stage_dims(stages))
    inputs, listed_twice = unique_inputs(inputs)
    unlisted = [v for v in inputs if v.problem]  # manifest lines that name no readable file: recorded, skipped
    inputs = [v for v in inputs if not v.problem]
    committed, retired = retire_damaged(storage, load_committed(storage), cfg.verify == "deep", run_id)
    finished = committed.finished(cfg.retry_failed)
    by_source = {(r["source"], int(r["source_size"]), float(r["source_mtime"])) for r in finished.to_dict("records")}
    todo = [v for v in inputs if (v.uri, v.size, v.mtime) not in by_source]
    n_skipped_listing = len(inputs) - len(todo)
    log.info("%d inputs; %d already committed by earlier runs; %d to do", len(inputs), n_skipped_listing, len(todo))

    events: list[dict] = []
    stream_seconds = 0.0  # from the first input entering the pipeline to the last shard committed
    stage_seconds: Counter = Counter()
    stage_frames: Counter = Counter()
    if todo:
        init_ray(cfg)
        cluster = ray.cluster_resources()
        cluster_cpus = float(cluster.get("CPU", 0.0))
        fit_fused_pool(cfg, stages, cluster_cpus)
        check_reservations(cfg, stages, cluster_cpus)
        check_gpus(cfg, stages, float(cluster.get("GPU", 0.0)))
        set_data_context(cfg.ray.progress_bars, cfg.ray.block_bytes)
        writers = [ray.remote(ShardWriter).options(
            name=writer_name(run_id, i), namespace=cfg.ray.namespace, num_cpus=cfg.writer.num_cpus,
            max_concurrency=1).remote(cfg.output, i, run_id, cfg.writer.shard_bytes, groups, cfg.video_stages,
                                      cfg.writer.commit_every_s, lock.driver_check())
            for i in range(cfg.writer.num_writers)]
        try:
            ray.get([w.__ray_ready__.remote() for w in writers])
            probe = next(st for st in stages if isinstance(st, ProbePlanStage))
            probe.finished_keys = frozenset(finished["video_key"]) if len(finished) else frozenset()
            items = sorted(todo, key=lambda v: (-v.size, v.uri))  # long videos first: better packing
            ds = from_rows([input_row(v) for v in items], num_blocks=max(1, min(len(items), 200)))
            for st in mapped(stages):
                ds = map_stage(ds, st)
            progress = Progress(todo, cfg.progress_interval_s)
            t_stream = time.time()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                lock.check()
                for row in unpack(batch):
                    ev = json.loads(row["event"])
                    events.append(ev)
                    if ev["event"] == "video":
                        progress.video(ev)
                progress.maybe_print()
            for evs in ray.get([w.close.remote() for w in writers]):
                events.extend(evs)
        except Exception:
            lock.check()  # a writer refused to commit because another run took the output: say that, in one line
            raise
        finally:
            for w in writers:
                ray.kill(w)
        stream_seconds = time.time() - t_stream
        progress.maybe_print(force=True)
        for ev in events:
            if ev["event"] == "timings":
                stage_seconds.update(ev["stage_seconds"])
                stage_frames.update(ev.get("stage_frames", {}))

    # ---- consolidate: index, failures, summary, report
    lock.check()
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
    dup_failures += [{"kind": "video", "video_key": "", "key": "", "source": v.uri, "stage": "list",
                      "error_class": v.problem[0], "error_message": v.problem[1]} for v in unlisted]
    failures = build_failures(committed, dup_failures, run_id)
    # inputs of this run that have no clip and a failure row (this run's or an earlier, unretried one's): the
    # exit code reflects the dataset, not only this run's work
    listed = {v.uri for v in inputs} | {v.uri for v in unlisted} | {v.uri for v in listed_twice}
    with_clips = set(index["source"]) if len(index) else set()
    current = failures[failures["latest"]] if len(failures) else failures
    open_failures = sorted((set(current["source"]) & listed) - with_clips) if len(current) else []
    write_table(storage, INDEX_FILE, index)
    write_table(storage, FAILURES_FILE, failures)
    vids = [e for e in events if e["event"] == "video"]
    run_failed = [e for e in vids if e["status"] == FAILED]
    run_failed += [{"error_class": "duplicate", "source": v.uri} for v in listed_twice]
    run_failed += [{"error_class": v.problem[0], "source": v.uri} for v in unlisted]
    summary = {
        "run_id": run_id, "output": redact_url(storage.uri), "wall_seconds": round(time.time() - t_start, 3),
        "stream_seconds": round(stream_seconds, 3),
        "inputs": len(inputs), "inputs_listed_twice": len(listed_twice), "inputs_unreadable_entries": len(unlisted),
        "inputs_with_open_failures": len(open_failures),
        "skipped_already_done": n_skipped_listing + sum(e["status"] == "skipped" for e in vids),
        "videos_done": sum(e["status"] == OK for e in vids), "videos_failed": len(run_failed),
        "failures_by_reason": dict(Counter(e["error_class"] for e in run_failed)),
        "clips_written": sum(int(e.get("n_clips", 0)) for e in vids if e["status"] == OK),
        "hours_in": round(sum(float(e.get("source_seconds", 0) or 0) for e in vids) / 3600, 6),
        "hours_out": round(float(index.loc[index["shard"].str.startswith(run_id), "duration_s"].sum()) / 3600, 6)
        if len(index) else 0.0,
        "dataset_clips": len(index), "dataset_shards": int(index["shard"].nunique()) if len(index) else 0,
        "dataset_clips_by_audio": index["audio_status"].value_counts().to_dict() if len(index) else {},
        "dataset_bytes": int(sum(e["bytes"] for e in events if e["event"] == "commit")),
        "parts_committed_this_run": sum(e["event"] == "commit" for e in events),
        "parts_retired": retired,  # {part: why}: damaged parts whose videos this run redid
        "lock_taken_over": lock.took_over,  # the stale run whose lock this run took over, if any
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        "stage_frames": dict(stage_frames),
        "stage_frames_per_s": {k: round(stage_frames[k] / v, 2) for k, v in stage_seconds.items() if v > 0},
    }
    shot_drops: Counter = Counter()
    for e in vids:  # counts by reason (damaged_stretches is a list of times, not a count)
        shot_drops.update({k: v for k, v in (e.get("dropped") or {}).items() if isinstance(v, int)})
    summary["shots_dropped_by_reason"] = dict(shot_drops)  # shots too short to make a clip, in videos that made others
    write_json(storage, SUMMARY_FILE, summary)
    report = write_report(storage, index, failures, summary)
    preview = write_preview(storage, index, run_id)
    print(redact_text(f"[preprocess] shards:   {storage.url(SHARD_DIR)}\n[preprocess] index:    "
                      f"{storage.url(INDEX_FILE)}\n[preprocess] failures: {storage.url(FAILURES_FILE)} "
                      f"({len(run_failed)} this run)\n[preprocess] summary:  {storage.url(SUMMARY_FILE)}"
                      + (f"\n[preprocess] report:   {report}" if report else "")
                      + (f"\n[preprocess] preview:  {preview}" if preview else "")), flush=True)
    if open_failures and not run_failed:
        log.warning("%d inputs keep the failure an earlier run recorded (failures.parquet; retry_failed=true retries "
                    "them), e.g. %s", len(open_failures), open_failures[0])
    return EXIT_FAILURES if run_failed or open_failures else EXIT_OK


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
    except Exception as e:  # noqa: BLE001 - a preview must never cost the dataset
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
    except Exception as e:  # noqa: BLE001 - a plot must never cost the dataset
        log.warning("report failed: %s: %s", type(e).__name__, e)
        return None
