"""The stage contract: a pipeline is checked when it is built (every column a stage reads is written by an
earlier stage, every column it writes is defined by the schema), and every stage maps onto Ray Data the same
way (an actor pool or tasks, its setup once per worker)."""
import os

import cloudpickle
import numpy as np
import pytest

from preprocess import schema
from preprocess.adapter import from_rows, map_stage, pack, task_function, unpack
from preprocess.config import ConfigError, Resources, StageSpec, to_config
from preprocess.pipeline import build_stages, mapped, run
from preprocess.stage import ClipStage, Stage, load_stage, new_row, written_groups
from tests.conftest import compose


def _cfg(tmp_path, *overrides):
    return to_config(compose("preprocess", [f"output={tmp_path / 'out'}", "ray.progress_bars=false", *overrides]))


def _spec(cls: type) -> StageSpec:
    return StageSpec(target=f"{cls.__module__}.{cls.__qualname__}", enabled=True,
                     resources=Resources(num_cpus=0.1, num_gpus=0, batch_size=1, min_actors=1, max_actors=1))


class BlurScoreStage(ClipStage):
    """A clip stage whose output the schema does not define."""

    name = "blur"
    reads = ("frames",)
    writes = ("blur_score",)

    def process(self, row):
        return {"blur_score": float(np.var(row["frames"]))}


@pytest.mark.parametrize("annotators,names,groups", [
    ("embedded", ["probe", "decode", "body", "hands", "head", "sink", "refs"],
     ["subject", "body", "hands", "head", "face", "refs"]),
    ("none", ["probe", "decode", "sink"], []),
])
def test_the_shipped_pipelines_pass_the_check(annotators, names, groups, tmp_path):
    stages = build_stages(_cfg(tmp_path, f"annotators={annotators}"), "test")
    assert [st.name for st in stages] == names
    assert written_groups(stages) == groups
    assert all(st.resources is not None for st in mapped(stages))  # video stages run in the writers: none
    for st in stages:  # every name a stage declares is a schema column
        assert all(schema.is_column(c) for c in st.writes), st.name


def test_a_stage_that_reads_a_column_no_earlier_stage_writes_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "annotators=embedded", "annotators.head.enabled=false")  # refs needs the face crops
    with pytest.raises(ConfigError, match=r"stage 'refs' \(.*YawSortedRefsStage\) reads 'face', which no earlier "
                                          r"stage writes \(stages before it: probe, decode, body, hands, sink\)"):
        build_stages(cfg, "test")


def test_a_column_written_only_by_a_later_stage_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "annotators=embedded")
    cfg.annotators = {k: cfg.annotators[k] for k in ("hands", "body", "head")}  # hands reads the body's joints
    with pytest.raises(ConfigError, match=r"stage 'hands' .* reads 'camera_K', which no earlier stage writes"):
        build_stages(cfg, "test")


def test_a_stage_that_writes_a_column_outside_the_schema_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "annotators=none")
    cfg.annotators = {"blur": _spec(BlurScoreStage)}
    with pytest.raises(ConfigError, match=r"stage 'blur' \(.*BlurScoreStage\) writes 'blur_score', which is not a "
                                          r"column of preprocess/schema.py"):
        build_stages(cfg, "test")


def test_a_stage_of_the_wrong_kind_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "annotators=embedded")
    cfg.annotators = {**cfg.annotators, "refs": cfg.video_stages.pop("refs")}  # a video stage among the clip stages
    with pytest.raises(ConfigError, match=r"stage 'refs': '.*YawSortedRefsStage' is not a ClipStage subclass"):
        build_stages(cfg, "test")


def test_a_refused_pipeline_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, "annotators=none")
    cfg.annotators = {"blur": _spec(BlurScoreStage)}
    with pytest.raises(ConfigError, match="blur_score"):
        run(cfg, [])
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_schema_columns():
    assert schema.is_column("head_rotation") and schema.is_column("fps")  # a shard field, a meta key
    assert schema.is_column("m_yaw_mean") and schema.is_column("frames")  # an annotator's meta key, a work column
    assert not schema.is_column("m_") and not schema.is_column("blur_score")


def test_rows_round_trip_through_a_batch():
    rows = [new_row(key="a_0000", video_key="a", frames=np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)),
            new_row(kind="video", source="x.mp4", status="failed", error_class="empty_file")]
    back = unpack(pack(rows))
    assert [r["key"] for r in back] == ["a_0000", ""] and back[1]["status"] == "failed"
    np.testing.assert_array_equal(back[0]["frames"], rows[0]["frames"])
    assert back[1]["error_class"] == "empty_file" and back[1]["source"] == "x.mp4"


class WorkerStage(Stage):
    """Tags each row with the worker process, the stage instance and how often that instance was set up."""

    name = "worker"
    writes = ("m_worker",)

    def setup(self):
        self.setups = getattr(self, "setups", 0) + 1

    def process_batch(self, rows):
        for r in rows:
            r["m_worker"] = (os.getpid(), id(self), self.setups)
        return rows


class WorkerTaskStage(WorkerStage):
    actor = False


def _tags(stage: Stage, n: int = 8) -> list[tuple[int, int, int]]:
    ds = map_stage(from_rows([new_row(key=f"k{i}") for i in range(n)], num_blocks=n), stage)
    rows = [r for b in ds.iter_batches(batch_size=None, batch_format="numpy") for r in unpack(b)]
    assert sorted(r["key"] for r in rows) == sorted(f"k{i}" for i in range(n))
    return [r["m_worker"] for r in rows]


def test_an_actor_stage_sets_up_once_per_actor(ray_local):
    r = Resources(num_cpus=0.1, num_gpus=0, batch_size=1, min_actors=1, max_actors=1)
    tags = _tags(WorkerStage().using(r))
    assert len(set(tags)) == 1 and tags[0][2] == 1  # one actor, set up once, 8 batches


def test_a_task_stage_sets_up_once_per_worker_process(ray_local):
    r = Resources(num_cpus=0.1, num_gpus=0, batch_size=1)
    tags = _tags(WorkerTaskStage().using(r))
    assert all(setups == 1 for _, _, setups in tags)
    by_pid = {}
    for pid, instance, _ in tags:
        by_pid.setdefault(pid, set()).add(instance)
    assert all(len(instances) == 1 for instances in by_pid.values())  # later batches reuse the set-up stage


def test_task_copies_in_one_process_share_one_set_up_stage():
    """What Ray does to a task stage, in this process: every task unpickles its own copy of the function."""
    r = Resources(num_cpus=0.1, num_gpus=0, batch_size=1)
    blob = cloudpickle.dumps(task_function(WorkerTaskStage().using(r)))
    tags = [unpack(cloudpickle.loads(blob)(pack([new_row(key=f"k{i}")])))[0]["m_worker"] for i in range(3)]
    assert len(set(tags)) == 1 and tags[0] == (os.getpid(), tags[0][1], 1)
    other = cloudpickle.dumps(task_function(WorkerTaskStage().using(r)))  # another map_stage call: its own setup
    assert unpack(cloudpickle.loads(other)(pack([new_row(key="k")])))[0]["m_worker"][1] != tags[0][1]


def test_a_stage_without_resources_is_not_mapped():
    with pytest.raises(ValueError, match="stage 'worker' has no resources"):
        map_stage(None, WorkerStage())


def test_an_actor_pool_size_on_a_task_stage_is_refused():
    spec = StageSpec(target=f"{__name__}.WorkerTaskStage", enabled=True,
                     resources=Resources(num_cpus=0.1, num_gpus=0, batch_size=1, min_actors=2, max_actors=4))
    with pytest.raises(ConfigError, match="WorkerTaskStage runs as Ray tasks, not an actor pool"):
        load_stage("worker", spec)
    spec.resources = Resources(num_cpus=0.1, num_gpus=0, batch_size=1)
    assert load_stage("worker", spec).resources.pool == (1, 1)
