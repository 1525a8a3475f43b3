"""Stages on Ray Data (after NeMo Curator's Ray Data adapter): the row format of a batch, and ``map_stage``, the
one function that turns a Stage into a ``map_batches`` operator.

Rows travel between stages as a few scalar columns (key, video_key, kind, status) plus one binary
``payload`` column holding the rest of the row (numpy arrays, bytes). Clips differ in T, H and W, and
keeping those in a single pickled column keeps every Arrow block's schema identical.
"""
from __future__ import annotations

import pickle
import uuid
from typing import TYPE_CHECKING

import numpy as np

from .stage import Stage, drop_frames

if TYPE_CHECKING:
    from ray.data import Dataset

# Scalar columns visible to Ray Data (for stats and routing); everything else is in ``payload``.
SCALAR_COLUMNS = ("key", "video_key", "kind", "status")


def pack_output(out):
    """A stage's output for Ray Data: one packed batch, or, for a stage whose ``process_batch`` yields lists of rows
    (one input, many outputs: the latent pass reads a whole part), a generator of packed batches that Ray Data
    streams out as they come."""
    return pack(out) if isinstance(out, list) else (pack(rows) for rows in out)


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


def set_data_context(progress_bars: bool, block_bytes: int) -> None:
    """Ray Data's settings for the pipeline: no ordering (rows stream as they are ready) and blocks of at most
    ``block_bytes``. A stage's actor hands each output block on once it is that big, so with Ray's default (128 MiB)
    the decode actor would hold up to 128 MiB of a long video's decoded clips; a block of ~1 MiB holds one clip."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.preserve_order = False
    ctx.target_max_block_size = block_bytes


def from_rows(rows: list[dict], num_blocks: int) -> Dataset:
    """A Ray dataset of ``rows`` (one row per item), split into ``num_blocks`` blocks."""
    import ray

    return ray.data.from_items([{c: col[0] for c, col in pack([r]).items()} for r in rows],
                               override_num_blocks=num_blocks)


def map_stage(ds: Dataset, stage: Stage) -> Dataset:
    """``ds`` followed by ``stage``: an actor pool of ``min_actors..max_actors`` workers for an actor stage, Ray
    tasks otherwise; each worker asks for ``num_cpus`` / ``num_gpus`` and gets ``batch_size`` rows per call."""
    from ray.data import ActorPoolStrategy

    r = stage.resources
    if r is None:
        raise ValueError(f"stage {stage.name!r} has no resources: build it with load_stage or .using(resources)")
    common = {"batch_size": r.batch_size, "num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "batch_format": "numpy"}
    if stage.actor:
        return ds.map_batches(actor_class(stage), fn_constructor_args=(stage,),
                              compute=ActorPoolStrategy(min_size=r.pool[0], max_size=r.pool[1]), **common)
    return ds.map_batches(task_function(stage), **common)


class StageActor:
    """A Ray Data actor holding one stage: ``setup`` (model loading) runs once, in ``__init__``."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.stage.setup()

    def __call__(self, batch: dict[str, np.ndarray]):
        return pack_output(drop_frames(self.stage, self.stage.process_batch(unpack(batch))))


def actor_class(stage: Stage) -> type[StageActor]:
    """The actor class ``map_batches`` instantiates for ``stage`` (constructor argument: the stage)."""
    return type(stage.name, (StageActor,), {})  # so Ray's plan and progress bars name the stage


# Task stages set up in this worker process, by the token of their map_stage call: a task stage's setup runs
# once per worker process, not once per batch.
_TASK_STAGES: dict[str, Stage] = {}


def _run_task(batch: dict[str, np.ndarray], stage: Stage, token: str):
    if token not in _TASK_STAGES:
        stage.setup()
        _TASK_STAGES[token] = stage
    st = _TASK_STAGES[token]
    return pack_output(drop_frames(st, st.process_batch(unpack(batch))))


def task_function(stage: Stage):
    """The function ``map_batches`` runs as tasks for ``stage``; every copy of it that Ray unpickles in one worker
    process shares the stage set up by the first."""
    token = f"{stage.name}-{uuid.uuid4().hex}"

    def fn(batch: dict[str, np.ndarray]):
        return _run_task(batch, stage, token)

    fn.__name__ = fn.__qualname__ = stage.name  # so Ray's plan and progress bars name the stage
    return fn
