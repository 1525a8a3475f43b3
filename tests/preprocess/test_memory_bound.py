"""Memory per actor is bounded by a clip, not by a video: the shard writer keeps a long video's rows on disk until
its last clip arrives (and writes exactly what it would write from rows in memory), the references stage holds one
clip's face crops at a time, a killed writer leaves only files a rerun deletes, and the decode stage hands every clip
on in a block of its own size instead of gathering a video's clips into one block."""
from __future__ import annotations

import copy
import pickle
import random
import tarfile

import numpy as np

from preprocess import demo_media, schema
from preprocess.adapter import from_rows, map_stage, set_data_context
from preprocess.config import StageSpec, to_config
from preprocess.engine import input_row
from preprocess.pipeline import build_stages
from preprocess.shards import SHARD_DIR
from preprocess.spill import SpilledRow
from preprocess.stage import OK, load_stage
from preprocess.state import load_committed
from preprocess.storage import STAGING_PREFIX, Storage, list_inputs, remove_dead_staging
from preprocess.writer import ShardWriter, clip_meta, sample_members
from tests.conftest import compose

from .helpers import ENGINE_OVERRIDES, REFS_GROUPS, annotated_rows, writer_peak

T = 24  # frames of a clip of annotated_rows
CLIP_FACES = T * schema.FACE_CROP_SIZE ** 2 * 3  # one clip's decoded face crops: the most the refs stage holds


def refs_spec() -> StageSpec:
    """The references stage as shipped, with a cheap stand-in for the face-identity model."""
    return StageSpec(target="preprocess.annotators.refs.YawSortedRefsStage", enabled=True,
                     params={"identity": {"target": "tests.preprocess.helpers.ThumbnailIdentity"}})


def test_a_spilled_row_keeps_light_values_and_reads_heavy_ones_from_disk_every_time(tmp_path):
    buf = np.arange(10, dtype=np.int64)
    row = {"key": "k", "video": b"\x01" * 5000, "frame_index": buf[:4], "m_yaw": 1.5,
           "face_landmarks": np.asfortranarray(np.random.default_rng(0).random((40, 30)).astype(np.float16)),
           "head_ypr": np.arange(3000, dtype=np.float32).reshape(1000, 3)[::2, :2]}  # a strided view
    path = tmp_path / "x.spill.tmp"
    r = SpilledRow(str(path), row)
    assert list(r) == list(row) and path.stat().st_size > 5000 + 2 * 2000
    for k, v in row.items():  # every value reads back to the same tar member bytes
        f = schema.FIELDS_BY_NAME.get(k)
        assert (schema.encode(f, r[k]) == schema.encode(f, v)) if f else r[k] == v
    assert r["frame_index"].base is None  # a light array is a copy: it pins nothing of the buffer it came in
    assert r["video"] is not r["video"]  # read from the file on every access, never cached
    r["video"] = b"\x02" * 3000
    assert list(r) == list(row) and r["video"] == b"\x02" * 3000  # set again: new value, same place in the row
    r.release()
    assert not path.exists() and "video" not in r and r["m_yaw"] == 1.5


def _arriving(rows: list[dict], batch: int = 3):
    """Rows as a writer receives them from Ray: in any order, a few per call, each call a fresh copy."""
    random.Random(0).shuffle(rows)
    for i in range(0, len(rows), batch):
        yield pickle.loads(pickle.dumps(rows[i:i + batch]))


def test_the_writer_writes_the_bytes_it_would_write_from_rows_held_in_memory(tmp_path):
    videos = [list(annotated_rows(f"{v:016x}", 9, seed=v)) for v in range(2)]
    refs = load_stage("refs", refs_spec())
    refs.setup()
    fields = schema.fields_of(["clip", *REFS_GROUPS])
    want = []  # the reference: every row in memory, the references stage on them, then each clip's members
    for rows in copy.deepcopy(videos):
        refs.process_video([r for r in rows if r["status"] == OK])
        for r in rows:
            if r["status"] == OK:
                r["meta"] = clip_meta(r)
                want += sample_members(r, fields)
    w = ShardWriter(str(tmp_path), 0, "run", 1 << 40, REFS_GROUPS, {"refs": refs_spec()})
    staging = tmp_path / "_staging"
    for rows in videos:
        for part in _arriving(rows[:-1]):
            w.add(part)
        assert len(list(staging.glob("*.spill.tmp"))) == len(rows) - 1  # the video waits on disk
        w.add(next(_arriving(rows[-1:])))
        assert not list(staging.glob("*.spill.tmp"))  # written: its files are gone
    w.close()
    (tar,) = (tmp_path / SHARD_DIR).glob("*.tar")
    with tarfile.open(tar) as tf:
        got = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    assert [n for n, _ in got] == [n for n, _ in want]
    assert got == want  # meta.json carries every m_* value the references stage wrote
    assert sum(n.endswith(".ref_half_body.jpg") for n, _ in got) >= 4  # every role was exercised


def test_a_writer_holds_a_clip_of_a_long_video_not_the_video(tmp_path):
    short, long = (writer_peak(tmp_path / str(n), refs_spec(), n, n_frames=T) for n in (6, 30))
    # before: every clip's rows and decoded face crops were held until the video was written (+3.3 MB a clip here)
    assert long < short + CLIP_FACES / 2, (short, long)
    assert long < 2 * CLIP_FACES, long


def test_a_killed_writer_leaves_nothing_a_rerun_does_not_delete(tmp_path):
    w = ShardWriter(str(tmp_path), 0, "run", 16 << 20, REFS_GROUPS, {"refs": refs_spec()}, commit_every_s=0)
    w.add(list(annotated_rows("00000000000000a0", 2, n_frames=8)))
    w.add(list(annotated_rows("00000000000000a1", 4, n_frames=8))[:3])  # in flight when the writer is killed
    staging = tmp_path / "_staging"
    assert len(list(staging.glob("*.spill.tmp"))) == 3
    # kill -9 here: nothing more runs in the writer; a rerun starts by reading the output
    c = load_committed(Storage(str(tmp_path)))
    assert not list(staging.iterdir())
    assert set(c.videos()["video_key"]) == {"00000000000000a0"}
    # an object-store output stages in the temp directory: a writer starting on the host deletes the directories
    # of writers that died there
    for name in (f"{STAGING_PREFIX}4242-abc", f"{STAGING_PREFIX}7-xyz", "other-4242"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run-w00-00000001-k.spill.tmp").write_bytes(b"x")
    assert remove_dead_staging(lambda pid: pid == 7, root=str(tmp_path)) == [f"{STAGING_PREFIX}4242-abc"]
    assert {p.name for p in tmp_path.iterdir()} >= {f"{STAGING_PREFIX}7-xyz", "other-4242"}


def test_the_decode_stage_hands_on_each_clip_in_a_block_of_its_own_size(ray_local, tmp_path):
    video = demo_media.write_long_video(tmp_path / "long.mp4", 40, size=64)  # 4 shots of 10 s: 52 clips of 19-20
    cfg = to_config(compose("preprocess", [f"input={video}", f"output={tmp_path / 'out'}", *ENGINE_OVERRIDES,
                                           "decode.max_side=64"]))
    probe, decode = build_stages(cfg, "test")[:2]
    set_data_context(cfg.ray.progress_bars, cfg.ray.block_bytes)
    ds = map_stage(map_stage(from_rows([input_row(v) for v in list_inputs(cfg.input)], 1), probe), decode)
    blocks = [m for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    assert sum(m.num_rows for m in blocks) == 52
    clip = max(m.size_bytes / m.num_rows for m in blocks)  # ~250 kB: 20 frames of 64 px and their MP4
    # Ray's default would have gathered the video's clips into one 13 MB block in the decode actor
    assert max(m.size_bytes for m in blocks) <= cfg.ray.block_bytes + clip
