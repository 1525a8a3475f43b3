"""preview.py: a clip written by the shard writer is found through the index and rendered with its
annotations drawn where they belong."""
import numpy as np
import pytest

from preprocess import preview, schema
from preprocess.demo_media import Motion
from preprocess.shards import INDEX_FILE
from preprocess.state import build_index, load_committed, write_table
from preprocess.storage import Storage
from preprocess.video import decode_mp4
from preprocess.writer import ShardWriter

from .annotators.conftest import annotate, clip_stages, render, stage_spec, to_writer_row  # noqa: F401, F811 (fixture)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, clip_stages):  # noqa: F811 (the fixture)
    out = tmp_path_factory.mktemp("ds")
    frames, _ = render("camera", Motion(shift=(20.0, 0.0)), 8, size=256)
    row = to_writer_row(annotate(clip_stages, frames, video_key="0123456789abcdef"))
    row.update(n_clips=1, source="camera.mp4", start_frame=0, end_frame=7, n_frames=8)
    groups = [g for g in schema.GROUPS if g != "clip"]
    w = ShardWriter(str(out), 0, "test", 1 << 20, groups, {"refs": stage_spec("video_stages", "refs")})
    w.add([row])
    w.close()
    storage = Storage(str(out))
    write_table(storage, INDEX_FILE, build_index(load_committed(storage)))
    return str(out), row


def test_load_clip_reads_every_member_back(dataset):
    out, row = dataset
    sample = preview.load_clip(out)  # no key: the first clip of the index
    assert sample["key"] == row["key"]
    for f in ("body_joints2d", "head_rotation", "hand_conf", "face_box"):
        assert np.array_equal(sample[f], row[f].astype(sample[f].dtype)), f
    assert sample["meta"]["shot_scale"] == row["m_shot_scale"]
    with pytest.raises(SystemExit, match="not in"):
        preview.load_clip(out, "0123456789abcdef_0042")


def test_preview_draws_the_annotations_on_the_clip(dataset):
    out, row = dataset
    path = preview.write_preview(out, row["key"])
    video = decode_mp4(open(path, "rb").read())
    frames = decode_mp4(row["video"])
    T, H, W = frames.shape[:3]
    assert video.shape[0] == T and video.shape[1] == H and video.shape[2] > W  # references on the right
    diff = np.abs(video[:, :, :W].astype(int) - frames).sum(-1) > 60
    # drawn: around the head centre (sphere, axes) and along the body joints; untouched far from the subject
    for t in (0, T - 1):
        cx, cy = row["head_center"][t].astype(int)
        r = int(row["head_radius"][t])
        assert diff[t, cy - r // 2:cy + r // 2, cx - r // 2:cx + r // 2].mean() > 0.5
        sure = row["body_conf"][t] > 0.5
        hits = [diff[t, max(0, y - 2):y + 3, max(0, x - 2):x + 3].any()
                for x, y in row["body_joints2d"][t][sure].astype(int)
                if 2 <= x < W - 2 and 2 <= y < H - 2]
        assert np.mean(hits) > 0.9
    assert preview.main([f"output={out}", f"key={row['key']}", f"out={out}/p.mp4"]) == 0
    assert preview.main(["key=x"]) == 2


@pytest.mark.parametrize("key", ["../../../escaped", "0123456789abcdef_0001/../../escaped", "/tmp/escaped",
                                 "0123456789abcdef_0001\n"])
def test_a_crafted_key_never_becomes_a_path(tmp_path, key):
    """A dataset whose index lists a key made to climb out of previews/ (or given as key=) is refused before
    anything is read or written."""
    import pandas as pd

    out = tmp_path / "crafted"
    write_table(Storage(str(out)), INDEX_FILE, pd.DataFrame({"key": [key], "shard": ["x-w00-00000.tar"]}))
    for given in (None, key):  # the first clip of the index, and key= on the command line
        with pytest.raises(SystemExit, match="is not a clip key.*refusing it"):
            preview.write_preview(str(out), given)
    with pytest.raises(ValueError, match="is not a clip key"):
        preview.preview_path(str(out), key)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [INDEX_FILE]


def test_a_crafted_shard_name_is_not_read(tmp_path):
    import pandas as pd

    out = tmp_path / "crafted"
    write_table(Storage(str(out)), INDEX_FILE, pd.DataFrame({"key": ["0123456789abcdef_0001"],
                                                             "shard": ["../../outside"]}))
    with pytest.raises(SystemExit, match="not a part name"):
        preview.load_clip(str(out))
