"""The stage contract (after NeMo Curator's ``ProcessingStage``): every step of the pipeline is a Stage.

A pipeline is a list of stages: the engine's own (``engine.py``: probe + plan, decode, sink) and the
annotators (``annotators/``). Each stage declares the row columns it reads and writes (names from
``schema.py``; the pipeline refuses at build time a stage that reads a column no earlier stage writes, or
writes one the schema does not define), gets its resources (CPUs, GPU fraction, batch size, actor pool size)
from the config, loads its models once per worker in ``setup()`` and turns a batch of rows into rows in
``process_batch()``. ``adapter.map_stage`` is the one place a stage becomes a Ray Data operator. Two kinds
serve the annotators:

* ``ClipStage``: runs on every decoded clip (``row["frames"]`` is the clip, uint8 T×H×W×3, shared by every
  annotator: the video is decoded once) and returns the clip's new fields.
* ``VideoStage``: runs inside the shard writer once all clips of a video have arrived (yaw-sorted
  references need every frame of the video).

Every row carries the bookkeeping of ``new_row`` (key, status, error, timings); a failed row is passed
along untouched by later stages and recorded by the writer, never raised.
"""
from __future__ import annotations

import dataclasses
import importlib
import time
import traceback
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, ClassVar

from . import schema
from .config import ConfigError, Resources, StageSpec

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


def new_row(**values) -> dict[str, Any]:
    """A row with the bookkeeping every row carries (``kind``: clip, or video for an input that made no clip;
    ``timings`` / ``stage_frames``: seconds and frames per stage, summed by the writer)."""
    row = {"key": "", "video_key": "", "kind": "clip", "status": OK, "error_stage": "",
           "error_class": "", "error_message": "", "timings": {}, "stage_frames": {}}
    row.update(values)
    return row


# Columns every row has from the start: no stage declares them.
BOOKKEEPING = tuple(new_row())


def fail(row: dict, stage: str, error: BaseException | str, error_class: str | None = None) -> dict:
    """Mark a row failed by ``stage``; later stages pass it through untouched."""
    row["status"] = FAILED
    row["error_stage"] = stage
    if isinstance(error, BaseException):
        row["error_class"] = error_class or type(error).__name__
        row["error_message"] = str(error)[:2000] or repr(error)
    else:
        row["error_class"] = error_class or "Error"
        row["error_message"] = error
    return row


class Stage:
    """One step of the pipeline. Subclasses set ``name``, ``reads``, ``writes`` and, for their own settings,
    a ``Params`` dataclass; the resources come from the config (``load_stage`` or the pipeline's builder)."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()  # row columns an earlier stage wrote (bookkeeping needs no mention)
    writes: ClassVar[tuple[str, ...]] = ()  # row columns the schema defines (schema.is_column)
    Params: ClassVar[type] = type("Params", (), {})  # a dataclass of the stage's own settings
    # True: a pool of long-lived actors (models, child processes); False: Ray tasks, for a light stage whose
    # setup is cheap (it still runs once per worker process, see adapter.py)
    actor: ClassVar[bool] = True
    resources: Resources | None = None  # what one worker asks the scheduler for
    last_frames: bool = False  # set by the pipeline on the last stage that reads the decoded frames: they go after it

    def __init__(self, params: dict | None = None):
        params = dict(params or {})
        if dataclasses.is_dataclass(self.Params):
            names = {f.name for f in dataclasses.fields(self.Params)}
            unknown = set(params) - names
            if unknown:
                raise ConfigError(f"stage {self.name!r}: unknown params {sorted(unknown)}; known: {sorted(names)}")
            try:
                self.params = self.Params(**params)
            except TypeError as e:
                raise ConfigError(f"stage {self.name!r}: {e}") from None
        else:
            self.params = params

    def using(self, resources: Resources) -> Stage:
        """This stage, with the resources one of its workers asks for."""
        self.resources = resources
        return self

    def setup(self) -> None:
        """Load models; called once per worker before the first batch."""

    def dims(self) -> dict[str, int]:
        """Named sizes of the fields this stage writes that its config fixes (``schema.DEFAULT_DIMS``), known before
        ``setup``: recorded in dataset.json ``dims``."""
        return {}

    def process_batch(self, rows: list[dict]) -> list[dict]:
        """The rows that follow from ``rows`` (the same rows updated, or more or fewer); never raises for bad
        input: a row that cannot be processed is marked with ``fail`` and handed on. A stage with many outputs per
        input may instead yield them as lists of rows, each streamed on as it comes (``adapter.pack_output``)."""
        raise NotImplementedError


class ClipStage(Stage):
    """Annotates one decoded clip."""

    def process(self, row: dict) -> dict:
        """Return the new fields of ``row`` (arrays per schema); raise to fail just this clip."""
        raise NotImplementedError

    def process_batch(self, rows: list[dict]) -> list[dict]:
        return [run_clip_stage(self, r) for r in rows]


class FusedStage(Stage):
    """Several stages run one after the other on each batch inside one worker: a clip's decoded frames stay in the
    process instead of travelling through the object store between actor pools, each worker holds every stage's
    models, and Ray Data schedules one operator instead of several. Failures and timings stay per member stage
    (``run_clip_stage``), so the failures table and the report read as without fusion. Built by the pipeline from
    ``fuse`` (``conf/preprocess.yaml``): the clip annotators, then the sink."""

    def __init__(self, members: list[Stage]):
        if not members:
            raise ConfigError("fuse: no stage to fuse")
        super().__init__()
        self.members = list(members)
        self.name = "+".join(st.name for st in members)
        written: set[str] = set()
        reads: list[str] = []
        for st in members:  # what the group needs from before it: each member's reads not written in the group
            reads += [c for c in st.reads if c not in written and c not in reads]
            written.update(st.writes)
        self.reads = tuple(reads)
        self.writes = tuple(dict.fromkeys(c for st in members for c in st.writes))
        self.actor = any(st.actor for st in members)

    def setup(self) -> None:
        for st in self.members:
            st.setup()

    def dims(self) -> dict[str, int]:
        return {k: v for st in self.members for k, v in st.dims().items()}

    def process_batch(self, rows: list[dict]) -> list[dict]:
        for st in self.members:
            rows = drop_frames(st, st.process_batch(rows))
        return rows


def drop_frames(stage: Stage, out):
    """``out`` without the decoded frames when ``stage`` is the last one that reads them (``Stage.last_frames``):
    the clip travels on as its MP4, and its raw frames (~0.4 MB each at 384 px) do not cross the object store to
    the sink only to be dropped there. ``out``: rows, or a generator of lists of rows (``adapter.pack_output``)."""
    if not stage.last_frames:
        return out
    return _without_frames(out) if isinstance(out, list) else (_without_frames(rows) for rows in out)


def _without_frames(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.pop("frames", None)
    return rows


class VideoStage(Stage):
    """Sees every clip row of one video (in clip order) before they are written; runs in the shard writer.

    A row is a mutable mapping whose heavy values (MP4s, images, per-frame arrays) the writer keeps on disk
    (``spill.SpilledRow``): each read of one is a file read, and nothing keeps it. A stage reads what it needs of a
    clip once and keeps compact summaries, so that it holds one clip at a time, however long the video."""

    def process_video(self, rows: list[MutableMapping]) -> None:
        """Update the rows in place (e.g. add reference images); raise to fail the whole video."""
        raise NotImplementedError


def load_stage(name: str, spec: StageSpec, kind: type[Stage] = Stage) -> Stage:
    """Instantiate the ``kind`` stage class named by ``spec.target``, with the spec's resources (no model loaded)."""
    module, _, cls_name = spec.target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"stage {name!r}: cannot import {spec.target!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise ConfigError(f"stage {name!r}: {spec.target!r} is not a {kind.__name__} subclass")
    r = spec.resources
    if r is not None and not cls.actor and (r.min_actors is not None or r.max_actors is not None):
        raise ConfigError(f"stage {name!r}: {cls.__name__} runs as Ray tasks, not an actor pool: remove "
                          "resources.min_actors/max_actors")
    return cls(spec.params).using(r)


def run_clip_stage(stage: ClipStage, row: dict, step: Callable[[dict], dict] | None = None) -> dict:
    """Run one clip through a stage (``step``: one step of it, default ``stage.process``), turning an exception
    into a recorded failure; the time adds to the stage's (a stage that works on a batch in steps calls this once
    per step)."""
    if row["status"] != OK or row["kind"] != "clip":
        return row
    t0 = time.perf_counter()
    try:
        row.update((step or stage.process)(row))
    except Exception as e:  # noqa: BLE001 - one bad clip never stops the run
        fail(row, stage.name, e)
        row["error_message"] += "\n" + traceback.format_exc(limit=3)[-1500:]
    row["timings"][stage.name] = row["timings"].get(stage.name, 0.0) + time.perf_counter() - t0
    return row


def check_stages(stages: list[Stage], given: Iterable[str] = ()) -> None:
    """Refuse a pipeline in which a stage reads a column that no earlier stage writes (``given``: the columns
    of the input rows) or writes a column the schema does not define; the error names the stage and the column."""
    written = {*BOOKKEEPING, *given}
    for i, st in enumerate(stages):
        unknown = [c for c in st.writes if not schema.is_column(c)]
        if unknown:
            raise ConfigError(
                f"stage {st.name!r} ({type(st).__module__}.{type(st).__name__}) writes {unknown[0]!r}, which is "
                "not a column of preprocess/schema.py: add it there (a shard field, a meta key, m_<name> for an "
                "annotator's meta key, or a work column), or fix the stage's writes")
        missing = [c for c in st.reads if c not in written]
        if missing:
            before = ", ".join(s.name for s in stages[:i]) or "none"
            raise ConfigError(
                f"stage {st.name!r} ({type(st).__module__}.{type(st).__name__}) reads {missing[0]!r}, which no "
                f"earlier stage writes (stages before it: {before}): enable or reorder the stage that writes it")
        written.update(st.writes)


def written_groups(stages: list[Stage]) -> list[str]:
    """Schema groups the stages write, in schema order, the engine's ``clip`` group left out."""
    groups = {schema.FIELDS_BY_NAME[c].group for st in stages for c in st.writes if c in schema.FIELDS_BY_NAME}
    return [g for g in schema.GROUPS if g in groups and g != "clip"]
