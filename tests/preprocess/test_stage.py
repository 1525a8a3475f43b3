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


@pytest.mark.parametrize("annotators,fuse,names,groups", [
    ("embedded", "null", ["probe", "decode", "body", "hands", "head", "sink", "refs"],
     ["subject", "body", "hands", "head", "face", "refs"]),
    ("embedded", "default", ["probe", "decode", "body+hands+head+sink", "refs"],
     ["subject", "body", "hands", "head", "face", "refs"]),
    ("none", "default", ["probe", "decode", "sink"], []),
])
def test_the_shipped_pipelines_pass_the_check(annotators, fuse, names, groups, tmp_path):
    stages = build_stages(_cfg(tmp_path, f"annotators={annotators}", *(["fuse=null"] if fuse == "null" else [])),
                          "test")
    assert [st.name for st in stages] == names
    # the decoded frames go after the last stage that reads them, not at the sink (inside a fused stage: after
    # that member)
    members = [m for st in stages for m in getattr(st, "members", [st])]
    assert [m.name for m in members if m.last_frames] == (["head"] if annotators == "embedded" else [])
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


class _Doubler(ClipStage):
    name = "doubler"
    reads = ("frames",)
    writes = ("blur_score",)

    def __init__(self, fail_on=None):
        super().__init__()
        self.fail_on, self.set_up = fail_on, 0

    def setup(self):
        self.set_up += 1

    def process(self, row):
        if row["key"] == self.fail_on:
            raise ValueError("no person")
        return {"blur_score": 2.0 * float(row["frames"].mean())}


class _Reader(ClipStage):
    name = "reader"
    reads = ("blur_score", "fps")
    writes = ("n_frames",)

    def process(self, row):
        return {"n_frames": int(row["blur_score"])}


def test_a_fused_stage_runs_its_members_in_order_and_keeps_their_failures_and_timings():
    from preprocess.stage import FAILED, OK, FusedStage

    first = _Doubler(fail_on="b")
    fused = FusedStage([first, _Reader()])
    assert fused.name == "doubler+reader"
    assert fused.reads == ("frames", "fps")  # blur_score comes from inside the group
    assert fused.writes == ("blur_score", "n_frames")
    fused.setup()
    assert first.set_up == 1
    rows = [new_row(key=k, kind="clip", frames=np.full((2, 4, 4, 3), 3, np.uint8), fps=25.0) for k in "ab"]
    a, b = fused.process_batch(rows)
    assert a["status"] == OK and a["n_frames"] == 6 and set(a["timings"]) == {"doubler", "reader"}
    # the failing member is named, and the members after it leave the failed clip alone
    assert b["status"] == FAILED and b["error_stage"] == "doubler" and "no person" in b["error_message"]
    assert "n_frames" not in b and set(b["timings"]) == {"doubler"}


def test_the_last_stage_that_reads_frames_drops_them_before_the_object_store():
    from preprocess.adapter import StageActor

    st = _Doubler().using(Resources(num_cpus=0.1, num_gpus=0, batch_size=1))
    row = new_row(key="a", kind="clip", frames=np.zeros((2, 4, 4, 3), np.uint8))
    assert "frames" in unpack(StageActor(st)(pack([dict(row)])))[0]
    st.last_frames = True
    out = unpack(StageActor(st)(pack([dict(row)])))[0]
    assert "frames" not in out and out["blur_score"] == 0.0


def test_fused_and_separate_annotators_write_the_same_dataset(tmp_path, ray_local):
    """The embedded annotators fused into one pool (the default) and as three pools give the same annotations."""
    import tarfile

    from preprocess.storage import list_inputs
    from tests.preprocess.helpers import make_video

    video = make_video(tmp_path / "v.mp4", n=24, size=192)
    out = {}
    for fuse in ("default", "null"):
        cfg = _cfg(tmp_path / fuse, "plan.min_frames=8", "decode.max_side=192",
                   *(["fuse=null"] if fuse == "null" else []))
        assert run(cfg, list_inputs(str(video))) == 0
        members = {}
        for tar in sorted((tmp_path / fuse / "out" / "shards").glob("*.tar")):
            with tarfile.open(tar) as tf:
                members.update({m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()})
        out[fuse] = members
    assert out["default"].keys() == out["null"].keys()
    arrays = [m for m in out["default"] if m.endswith(".npy")]
    assert any("body" in m for m in arrays) and any("head" in m for m in arrays)
    for m in arrays:  # the annotations, array by array
        assert out["default"][m] == out["null"][m], m


def test_the_fused_pool_holds_only_the_actors_the_cpus_fit(tmp_path):
    """min 2 / max 16 actors of 0.65 CPUs beside probe 0.2, decode 0.3 and a writer 0.15: 2 on a 2-core machine
    (a third would load its models and wait), the configured 16 on 16 cores, and on one core one actor (a minimum
    the cluster cannot place would hold the run up)."""
    from preprocess.pipeline import fit_fused_pool

    for cpus, want in ((1.0, (1, 1)), (2.0, (2, 2)), (4.0, (2, 5)), (16.0, (2, 16))):
        cfg = _cfg(tmp_path, "annotators=embedded")
        stages = build_stages(cfg, "test")
        fit_fused_pool(cfg, stages, cpus)
        fused = next(st for st in stages if "+" in st.name)
        assert fused.resources.pool == want, cpus


def test_gpu_stages_on_a_cluster_without_gpus_are_refused_or_warned(tmp_path, caplog):
    """+cluster=prod's model stages take GPU fractions: a local Ray without a GPU would never start them and the run
    would wait without a word. Refused on a local Ray, with what to change; a warning on a remote cluster (its
    autoscaler may add GPU nodes); nothing with a GPU, or without GPU stages."""
    from preprocess.pipeline import check_gpus

    cfg = _cfg(tmp_path, "+cluster=prod", "input=null", f"output={tmp_path / 'out'}", "ray.address=local")
    stages = build_stages(cfg, "test")
    with pytest.raises(ConfigError, match=r"ask for GPUs .* this local Ray sees no GPU.*num_gpus=0"):
        check_gpus(cfg, stages, 0.0)
    check_gpus(cfg, stages, 1.0)
    remote = _cfg(tmp_path, "+cluster=prod", "input=null", f"output={tmp_path / 'out'}", "ray.address=auto")
    with caplog.at_level("WARNING"):
        check_gpus(remote, build_stages(remote, "test"), 0.0)
    assert "wait until the cluster adds GPU nodes" in caplog.text
    check_gpus(_cfg(tmp_path), build_stages(_cfg(tmp_path), "test"), 0.0)  # the local default asks for none
