"""The one shard reader (preprocess/shards.py) on a dataset written before the readers were consolidated
(``fixtures/dataset_before_consolidation``: made by ``preprocess/run.py`` at commit 500ebf7): the validator, the
preview's clip loader and the training loader's sample stream all read it, and they read exactly the bytes
that a plain ``tarfile`` read of the shard holds."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pandas as pd

from preprocess import schema
from preprocess.preview import load_clip
from preprocess.shards import INDEX_FILE, SHARD_DIR, iter_members, iter_samples
from preprocess.validate import validate
from train.data.config import SourceConfig
from train.data.source import iter_samples as loader_samples

FIXTURE = Path(__file__).parent / "fixtures" / "dataset_before_consolidation"


def _plain_read(tar: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            key, _, member = m.name.partition(".")
            out.setdefault(key, {})[member] = t.extractfile(m).read()
    return out


def test_an_old_dataset_reads_the_same(tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(FIXTURE, out)
    assert validate(str(out), deep=True, log=lambda *_: None) == []
    (tar,) = sorted((out / SHARD_DIR).glob("*.tar"))
    want = _plain_read(tar)
    index = pd.read_parquet(out / INDEX_FILE)
    assert sorted(index["key"]) == sorted(want)
    with open(tar, "rb") as f:
        assert dict(iter_samples(f)) == want
    cfg = SourceConfig(dataset=str(out), shards=None, storage_options={}, require_groups=[], read_retries=0,
                       latents=None)
    assert dict(loader_samples(str(tar), cfg)) == want
    key = sorted(want)[0]
    clip = load_clip(str(out), key)
    assert clip["video"] == want[key]["video.mp4"]
    meta = schema.decode(schema.field("meta"), want[key][schema.field("meta").member])
    assert clip["meta"] == meta


def test_members_are_streamed_with_a_selection(tmp_path):
    (tar,) = sorted((FIXTURE / SHARD_DIR).glob("*.tar"))
    with open(tar, "rb") as f:
        members = list(iter_members(f, select=lambda k, m: m.startswith("meta")))
    assert members and all(m.is_file and m.key for m in members)
    assert all((m.data is not None) == m.member.startswith("meta") for m in members)


def test_parts_written_before_sizes_were_recorded_are_verified_as_they_can_be(tmp_path):
    """The fixture's part has no recorded size or checksum: it is read as before; a rerun can still tell that its tar
    is missing, and (verify=deep) that it is truncated."""
    from preprocess.state import damaged_parts, load_committed
    from preprocess.storage import Storage

    out = tmp_path / "ds"
    shutil.copytree(FIXTURE, out)
    storage = Storage(str(out))
    committed = load_committed(storage, cleanup=False)
    (part,) = committed.parts
    assert committed.info == {part: {}}
    assert damaged_parts(storage, committed, deep=False) == {} and damaged_parts(storage, committed, deep=True) == {}
    tar = out / SHARD_DIR / f"{part}.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    assert damaged_parts(storage, committed, deep=False) == {}  # no recorded size to compare with
    assert "truncated" in damaged_parts(storage, committed, deep=True)[part]
    tar.unlink()
    assert "missing" in damaged_parts(storage, committed, deep=False)[part]
