"""Bad input is skipped with a counted, logged reason and never stops the stream: a shard that breaks off,
a missing shard, a sample without a required field, a malformed field, a clip that does not decode."""
from __future__ import annotations

import logging
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest

from preprocess import schema
from tests.train.data.helpers import assert_epochs_covered, read_dataset, records, take, write_tar


@pytest.fixture(scope="module")
def broken(dataset_dir, tmp_path_factory):
    """A copy of the dataset with one defect per shard; returns (dir, keys that must be skipped, reasons)."""
    out = tmp_path_factory.mktemp("broken")
    shutil.copytree(dataset_dir, out, dirs_exist_ok=True)
    tars = sorted((out / "shards").glob("*.tar"))
    lost, expected = set(), Counter()

    def samples_of(tar):
        with tarfile.open(tar) as tf:
            members = {}
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                members.setdefault(key, {})[member] = tf.extractfile(m).read()
        return members

    # 0: cut inside the second sample: the samples before it are still served
    with tarfile.open(tars[0]) as tf:
        members = tf.getmembers()
    first = members[0].name.split(".")[0]
    second = next(m for m in members if m.name.split(".")[0] != first)
    tars[0].write_bytes(tars[0].read_bytes()[:second.offset + 1000])
    cut_off = {m.name.split(".")[0] for m in members if m.offset >= second.offset}
    lost |= cut_off
    expected["samples/shard_corrupt"] += len(cut_off)
    expected["shards/shard_corrupt"] += 1
    # 1: the tar is gone (its stats file stays, as after a lost object-store upload)
    gone = set(samples_of(tars[1]))
    tars[1].unlink()
    lost |= gone
    expected["samples/shard_missing"] += len(gone)
    expected["shards/shard_missing"] += 1
    # 2: one sample lacks its face crops, the other has a malformed joint array
    s2 = samples_of(tars[2])
    k_a, k_b = sorted(s2)
    del s2[k_a][schema.field("face").member]
    f = schema.field("body_conf")
    s2[k_b][f.member] = schema.encode(f, np.zeros((3, 3), np.float32))
    write_tar(tars[2], s2)
    lost |= {k_a, k_b}
    expected["samples/missing_field"] += 1
    expected["samples/bad_field"] += 1
    # 3: one clip is not a video any more
    s3 = samples_of(tars[3])
    k_c = sorted(s3)[0]
    s3[k_c][schema.field("video").member] = np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    write_tar(tars[3], s3)
    lost.add(k_c)
    expected["samples/video_undecodable"] += 1
    return out, lost, expected


def test_bad_shards_and_samples_are_skipped_counted_and_logged(broken, dataset_dir, make_loader, caplog):
    out, lost, expected = broken
    every = set(read_dataset(dataset_dir))
    loader = make_loader("data.workers.num_workers=0", dataset=out)
    delivered = []
    with caplog.at_level(logging.WARNING, logger="train.data"):
        it = iter(loader)
        while True:
            b = next(it)
            if int(b.epoch.min()) > 0:
                break
            delivered += b.keys
    assert len(delivered) == len(set(delivered))
    assert set(delivered) == every - lost  # every good sample once, every bad one skipped
    counts = loader.skip_counts()
    for reason, n in expected.items():  # the first batch of epoch 1 may already carry some of epoch 1's
        assert n <= counts.get(reason, 0) <= 2 * n, (reason, counts)
    assert set(counts) <= set(expected) | {"batches/empty"}
    for reason in expected:
        assert any(reason in r.getMessage() for r in caplog.records), reason
    assert loader.state_dict()["skips"]["0"] == counts  # the counts are part of the cursor


def test_a_shard_without_stats_file_is_scanned(dataset_dir, tmp_path, make_loader):
    shutil.copytree(dataset_dir, tmp_path / "d")
    for p in (tmp_path / "d" / "shards").glob("*.parquet"):
        p.unlink()
    with_stats = make_loader("data.workers.num_workers=0")
    without = make_loader("data.workers.num_workers=0", dataset=tmp_path / "d")
    a, b = iter(with_stats), iter(without)
    for _ in range(4):
        x, y = next(a), next(b)
        assert x.keys == y.keys and (x.video == y.video).all()


def test_shard_urls_instead_of_a_dataset(dataset_dir, make_loader):
    shards = sorted(str(p) for p in (dataset_dir / "shards").glob("*.tar"))
    pattern = str(dataset_dir / "shards" / "*.tar")
    by_list = make_loader("data.workers.num_workers=0", "data.source.dataset=null", f"data.source.shards=[{pattern}]")
    assert by_list.shard_urls == shards
    keys = [k for _ in range(1) for b in [next(iter(by_list))] for k in b.keys]
    assert keys and set(keys) <= set(read_dataset(dataset_dir))


def test_a_sample_that_kills_its_worker_is_quarantined(dataset_dir, tmp_path, make_loader, monkeypatch):
    """decord can abort the process on some corrupt streams: simulated by a decoder that aborts on a marked
    clip (the DataLoader's forked workers inherit the patch). The run goes on without that clip."""
    import os

    from train.data import sample as sample_mod

    shutil.copytree(dataset_dir, tmp_path / "d")
    tar = sorted((tmp_path / "d" / "shards").glob("*.tar"))[2]
    with tarfile.open(tar) as tf:
        samples = {}
        for m in tf.getmembers():
            key, member = m.name.split(".", 1)
            samples.setdefault(key, {})[member] = tf.extractfile(m).read()
    bad = sorted(samples)[0]
    video = schema.field("video").member
    samples[bad][video] = b"ABORT" + samples[bad][video]
    write_tar(tar, samples)
    decode = sample_mod.decode_frames

    def aborting(data, *a, **k):
        if data.startswith(b"ABORT"):
            import faulthandler

            faulthandler.disable()  # an expected death: no traceback dump in the test log
            os.abort()
        return decode(data, *a, **k)

    monkeypatch.setattr(sample_mod, "decode_frames", aborting)
    every = set(read_dataset(dataset_dir))
    loader = make_loader("data.workers.num_workers=2", "data.workers.start_method=fork", dataset=tmp_path / "d")
    assert_epochs_covered(records(take(loader, 24)), 2, every - {bad})  # two consumers: epochs overlap a little
    state = loader.state_dict()
    assert state["quarantine"] == [bad] and loader.skip_counts()["samples/worker_died"] >= 1
    again = make_loader("data.workers.num_workers=0", dataset=tmp_path / "d")
    again.load_state_dict(state)  # the quarantine travels with the cursor (and also holds in-process)
    it = iter(again)
    for _ in range(12):
        assert bad not in next(it).keys


def test_a_missing_video_reader_stops_the_loader_with_its_name(make_loader, monkeypatch):
    """Without the configured reader no clip decodes: that is the machine's fault, not the clips'. Calling every
    sample ``video_undecodable`` once spun a whole GPU run through empty batches (issue 9, run 9)."""
    import sys

    from train.data.sample import DecoderMissing, decode_frames

    monkeypatch.setitem(sys.modules, "decord", None)  # what a machine without decord does on `import decord`
    with pytest.raises(DecoderMissing, match=r"'decord' \(data.workers.decoder\).*data.workers.decoder=pyav"):
        make_loader("data.workers.num_workers=0", "data.workers.decoder=decord")
    # and inside a worker (a reader that disappears after the check) it is raised, not counted as a bad clip
    with pytest.raises(DecoderMissing, match="pip install decord"):
        decode_frames(b"not read", [0], decoder="decord")
