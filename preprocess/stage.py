"""The stage contract (after NeMo Curator's video stages) and its mapping onto Ray Data.

A pipeline is a list of stages. Each stage declares the row fields it reads and writes, gets its
resources (CPUs, GPU fraction, batch size, actor pool size) from the config, loads its models once
per worker in ``setup()`` and handles one clip at a time in ``process()``. Two kinds:

* ``ClipStage``: runs in a Ray Data actor pool on every decoded clip (``row["frames"]`` is the clip,
  uint8 T×H×W×3, shared by every annotator: the video is decoded once).
* ``VideoStage``: runs inside the shard writer once all clips of a video have arrived (yaw-sorted
  references need every frame of the video).

Rows travel between stages as a few scalar columns (key, video_key, status, ...) plus one binary
``payload`` column holding the rest of the row (numpy arrays, bytes). Clips differ in T, H and W, and
keeping those in a single pickled column keeps every Arrow block's schema identical.
"""
from __future__ import annotations

import dataclasses
import importlib
import pickle
import time
import traceback
from typing import Any, ClassVar

import numpy as np

from .config import ConfigError, StageSpec

# Scalar columns visible to Ray Data (for stats and routing); everything else is in ``payload``.
SCALAR_COLUMNS = ("key", "video_key", "kind", "status")
OK, FAILED, SKIPPED = "ok", "failed", "skipped"


def new_row(**values) -> dict[str, Any]:
    """A row with the bookkeeping every row carries."""
    row = {"key": "", "video_key": "", "kind": "clip", "status": OK, "error_stage": "",
           "error_class": "", "error_message": "", "timings": {}}
    row.update(values)
    return row


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


def pack(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows → a Ray Data numpy batch."""
    batch = {c: np.array([r[c] for r in rows], dtype=object) for c in SCALAR_COLUMNS}
    batch["payload"] = np.array(
        [pickle.dumps({k: v for k, v in r.items() if k not in SCALAR_COLUMNS}, protocol=5) for r in rows],
        dtype=object)
    return batch


def unpack(batch: dict[str, np.ndarray]) -> list[dict]:
    """A Ray Data numpy batch → rows."""
    rows = []
    for i in range(len(batch["payload"])):
        row = pickle.loads(batch["payload"][i])
        for c in SCALAR_COLUMNS:
            row[c] = str(batch[c][i])
        rows.append(row)
    return rows


class Stage:
    """Common part of both stage kinds."""

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()  # shard fields (preprocess.schema) or row columns
    Params: ClassVar[type] = type("Params", (), {})  # a dataclass of the stage's own settings

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

    def setup(self) -> None:
        """Load models; called once per worker before the first clip."""


class ClipStage(Stage):
    """Annotates one decoded clip."""

    def process(self, row: dict) -> dict:
        """Return the new fields of ``row`` (arrays per schema); raise to fail just this clip."""
        raise NotImplementedError


class VideoStage(Stage):
    """Sees every clip row of one video (in clip order) before they are written."""

    def process_video(self, rows: list[dict]) -> None:
        """Update the rows in place (e.g. add reference images); raise to fail the whole video."""
        raise NotImplementedError


def load_stage(name: str, spec: StageSpec) -> Stage:
    """Instantiate the stage class named by ``spec.target``."""
    module, _, cls_name = spec.target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"stage {name!r}: cannot import {spec.target!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"stage {name!r}: {spec.target!r} is not a Stage subclass")
    return cls(spec.params)


def run_clip_stage(stage: ClipStage, row: dict) -> dict:
    """Run one clip through a stage, turning an exception into a recorded failure."""
    if row["status"] != OK or row["kind"] != "clip":
        return row
    t0 = time.perf_counter()
    try:
        row.update(stage.process(row))
    except Exception as e:  # one bad clip never stops the run
        fail(row, stage.name, e)
        row["error_message"] += "\n" + traceback.format_exc(limit=3)[-1500:]
    row["timings"][stage.name] = time.perf_counter() - t0
    return row


class ClipStageActor:
    """Ray Data actor wrapping one ClipStage: models load once in ``__init__``."""

    def __init__(self, name: str, spec: StageSpec):
        self.stage = load_stage(name, spec)
        if not isinstance(self.stage, ClipStage):
            raise ConfigError(f"annotators.{name}: {spec.target} is not a ClipStage")
        self.stage.setup()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return pack([run_clip_stage(self.stage, r) for r in unpack(batch)])
