"""The engine's own stages, around the annotators:

    input rows → ProbePlanStage (per video: content key, probe, shots, clip windows, each clip's audio; in an
                 isolated decoder)
      → DecodeStage (per clip: frames once for every annotator, the stored MP4) → [annotators]
      → SinkStage (rows to the shard writer of their video; events for the driver)

Their resources are ``stages.{probe,decode,sink}`` of the config. Bad input never raises: the row is marked
failed (``stage.fail``) with the reason as ``error_class`` and recorded by the writer.
"""
from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np

from . import schema
from .config import DecodeConfig, PlanConfig, ProbeConfig
from .isolate import DecoderCrashed, DecoderTimeout, Isolated
from .plan import content_key, plan_video
from .stage import OK, SKIPPED, Stage, fail, new_row
from .storage import InputFile, open_input, read_ends
from .video import VideoError, encode_mp4, read_frames, scaled_size
from .writer import writer_name

# The columns of an input row: the listed file, before anything is read.
INPUT_COLUMNS = ("source", "source_size", "source_mtime")


def input_row(v: InputFile) -> dict:
    """The row of one listed input (a ``kind=video`` row until it is planned)."""
    return new_row(kind="video", source=v.uri, source_size=v.size, source_mtime=v.mtime)


# ---------------------------------------------------------------- probe + plan (per video)
def _plan_in_child(uri: str, kwargs: dict):
    """Runs in the isolated process: open the input and plan it."""
    local = "://" not in uri
    return plan_video(uri if local else "<stream>", open_fn=None if local else (lambda: open_input(uri)), **kwargs)


class ProbePlanStage(Stage):
    """One input → its clip rows, or one ``kind=video`` row saying why it yields none. Each actor keeps one
    isolated decoder process for its whole life (a native crash or hang costs one video, not the actor)."""

    name = "probe"
    reads = INPUT_COLUMNS
    writes = ("key", "video_key", "source_seconds", "dropped", "n_clips", "clip_index", "shot_index", "frame_index",
              "timestamps", "fps", "start_frame", "end_frame", "n_frames", "src_fps", "src_width", "src_height",
              "src_codec", "src_rotation", "src_start_pts", "src_pts", "audio", "audio_status")

    @dataclass
    class Params:
        probe: ProbeConfig
        plan: PlanConfig

    # content keys an earlier run committed: such an input is passed on as skipped (set by the driver once it
    # has read the output)
    finished_keys: frozenset = frozenset()

    def setup(self) -> None:
        self.isolated = Isolated()

    def process_batch(self, rows: list[dict]) -> list[dict]:
        return [out for video in rows for out in self.plan_rows(video)]

    def plan_rows(self, video: dict) -> list[dict]:
        """The rows of one input row."""
        t0 = time.perf_counter()
        uri = video["source"]
        base = {"source": uri, "source_size": video["source_size"], "source_mtime": video["source_mtime"]}
        vrow = new_row(kind="video", video_key="", **base)
        if video["source_size"] < 0:
            return [fail(vrow, "probe", f"{uri}: file not found", "missing_file")]
        if video["source_size"] == 0:
            return [fail(vrow, "probe", f"{uri}: zero-byte file", "empty_file")]
        p, pl = self.params.probe, self.params.plan
        try:
            size, head, tail = read_ends(uri, p.key_bytes)
        except OSError as e:
            return [fail(vrow, "probe", f"{uri}: {e}", "unreadable")]
        vk = content_key(size, head, tail)
        vrow["video_key"] = vk
        if vk in self.finished_keys:
            vrow["status"] = SKIPPED
            return [vrow]
        kwargs = {"analysis_width": pl.analysis_width, "threshold": pl.shot_threshold,
                  "min_shot_frames": pl.min_shot_frames, "target_fps": pl.target_fps,
                  "min_frames": pl.min_frames, "max_frames": pl.max_frames, "min_seconds": p.min_seconds}
        try:
            plan = self.isolated.call(_plan_in_child, uri, kwargs, timeout=p.timeout_s)
        except VideoError as e:
            return [fail(vrow, "probe", e, e.reason)]
        except (DecoderCrashed, DecoderTimeout) as e:
            return [fail(vrow, "probe", f"{uri}: {e}", type(e).__name__)]
        except Exception as e:  # noqa: BLE001 - a bad input is a recorded failure, never a crash
            return [fail(vrow, "probe", f"{uri}: {type(e).__name__}: {e}", "probe_error")]
        info = plan.info
        dropped = dict(plan.dropped)
        if plan.damaged:  # (last good, next good frame) s; None: the stream's edge
            dropped["damaged_stretches"] = [[None if math.isinf(a) else round(a, 3),
                                             None if math.isinf(b) else round(b, 3)]
                                            for a, b in plan.damaged]
        if plan.audio_problem:  # the audio track's holes or decode errors, in words (the clips say which it cost)
            dropped["audio"] = plan.audio_problem
        vrow.update(source_seconds=plan.duration_s, dropped=dropped)
        if not plan.clips:
            return [fail(vrow, "plan", f"{uri}: no shot has {pl.min_frames} frames at "
                         f"{plan.fps:.3g} fps ({len(plan.shots)} shots, longest "
                         f"{max(b - a for a, b in plan.shots)} source frames)", "too_short")]
        seconds = time.perf_counter() - t0
        return [new_row(
            key=schema.clip_key(vk, c.clip_index), video_key=vk, kind="clip", **base,
            source_seconds=plan.duration_s, dropped=dropped, n_clips=len(plan.clips),
            clip_index=c.clip_index, shot_index=c.shot_index, frame_index=c.frame_index,
            timestamps=np.asarray(c.timestamps, dtype=np.float64), fps=plan.fps,
            start_frame=int(c.frame_index[0]), end_frame=int(c.frame_index[-1]), n_frames=len(c.frame_index),
            src_fps=info.fps, src_width=info.width, src_height=info.height, src_codec=info.codec,
            src_rotation=info.rotation, src_start_pts=info.start_pts, src_pts=c.pts,
            audio=c.audio, audio_status=c.audio_status,
            timings={"plan": seconds} if c.clip_index == 0 else {},
            stage_frames={"plan": plan.n_frames} if c.clip_index == 0 else {})
            for c in plan.clips]


# ---------------------------------------------------------------- decode (per clip)
class DecodeStage(Stage):
    """Decode a clip's frames once (shared by every annotator) and encode the stored clip. Its own actor pool:
    were planning and decoding tasks, Ray Data would fuse them with each other (holding every clip of a long
    video in one task) and with the first annotator (serialising decoding with model inference)."""

    name = "decode"
    reads = ("source", "frame_index", "fps", "src_width", "src_height", "src_rotation", "src_start_pts", "src_pts")
    writes = ("frames", "video", "width", "height")

    @dataclass
    class Params:
        decode: DecodeConfig

    def process_batch(self, rows: list[dict]) -> list[dict]:
        return [self.decode(r) for r in rows]

    def decode(self, row: dict) -> dict:
        """One clip row with its frames and MP4, or failed with the decoder's reason."""
        if row["status"] != OK or row["kind"] != "clip":
            return row
        d = self.params.decode
        try:
            t0 = time.perf_counter()
            size = scaled_size(row["src_width"], row["src_height"], d.max_side)
            fobj = None if "://" not in row["source"] else open_input(row["source"])
            frames = read_frames(row["source"], row["frame_index"], rotation=row["src_rotation"], size=size,
                                 backend=d.backend, start_pts=row["src_start_pts"], pts=row.get("src_pts"),
                                 fileobj=fobj)
            t1 = time.perf_counter()
            row["video"] = encode_mp4(frames, row["fps"], crf=d.crf, preset=d.preset)
            t2 = time.perf_counter()
        except VideoError as e:
            return fail(row, "decode", e, e.reason)
        except Exception as e:  # noqa: BLE001 - a bad clip is a recorded failure, never a crash
            return fail(row, "decode", e)
        row.update(frames=frames, width=size[0], height=size[1])
        row["timings"].update(decode=t1 - t0, encode=t2 - t1)
        return row


# ---------------------------------------------------------------- sink → writers
def route(row: dict, n: int) -> int:
    """The writer of a row: by video key, so all clips of a video meet in one writer."""
    k = row["video_key"] or row["source"]
    return zlib.crc32(k.encode()) % n


class SinkStage(Stage):
    """Hand rows to their shard writers (frames dropped: the clip travels as its MP4). Its output is one
    ``kind=event`` row per writer event (video finished, part committed), the event as JSON in ``event``.
    Ray tasks: the writer handles are looked up once per worker process."""

    name = "sink"
    reads = ("source", "source_size")
    actor = False

    @dataclass
    class Params:
        run_id: str
        n_writers: int
        namespace: str

    def setup(self) -> None:
        import ray

        p = self.params
        self.writers = [ray.get_actor(writer_name(p.run_id, i), namespace=p.namespace) for i in range(p.n_writers)]

    def process_batch(self, rows: list[dict]) -> list[dict]:
        import ray

        by_writer: dict[int, list[dict]] = {}
        events: list[dict] = []
        for r in rows:
            r.pop("frames", None)
            if r["status"] == SKIPPED:
                events.append({"event": "video", "status": "skipped", "video_key": r["video_key"],
                               "source": r["source"], "source_size": r["source_size"]})
                continue
            by_writer.setdefault(route(r, self.params.n_writers), []).append(r)
        refs = [self.writers[i].add.remote(rs) for i, rs in by_writer.items()]
        for evs in ray.get(refs):
            events.extend(evs)
        return [new_row(kind="event", event=json.dumps(e, default=float)) for e in events]
