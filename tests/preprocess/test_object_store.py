"""Inputs and outputs as object-store URIs: an S3 server (moto) on loopback, pyarrow's S3 filesystem."""
import json

import pytest

from preprocess.validate import validate
from tests.preprocess.helpers import ENGINE_OVERRIDES, index_keys, make_corpus, run_cli, run_inprocess

moto_server = pytest.importorskip("moto.server")


def test_s3_input_and_output(s3, ray_local, tmp_path):
    import os
    files = make_corpus(tmp_path / "in", n_good=3)
    for f in files:
        s3.upload_file(str(f), "raw", f"videos/{f.name}")
    assert run_inprocess(str(tmp_path / "in"), str(tmp_path / "local")) == 0

    args = ["input=s3://raw/videos", "output=s3://shards/v1", *ENGINE_OVERRIDES, "ray.num_cpus=2"]
    r = run_cli(args, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "s3://shards/v1/index.parquet" in r.stdout
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket="shards", Prefix="v1/")["Contents"]}
    assert {"v1/index.parquet", "v1/failures.parquet", "v1/summary.json", "v1/dataset.json"} <= listed
    assert not [k for k in listed if k.endswith(".tmp")]
    assert validate("s3://shards/v1", log=lambda *_: None) == []
    import io

    import pandas as pd
    idx = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="shards", Key="v1/index.parquet")["Body"].read()))
    assert sorted(idx["key"]) == index_keys(tmp_path / "local")  # content keys: same bytes, same keys
    assert all(s.startswith("s3://raw/videos/") for s in idx["source"])

    r = run_cli(args, env=dict(os.environ))  # resume: nothing to do
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(s3.get_object(Bucket="shards", Key="v1/summary.json")["Body"].read())
    assert summary["skipped_already_done"] == 3 and summary["videos_done"] == 0


def test_damaged_parts_on_s3_are_found_and_retired(s3):
    """Parts record their tar's size and sha256 on an object store too; a truncated, a deleted and a changed tar are
    found (the last by its checksum only) and retired: stats file moved to _retired/, tar deleted, index rewritten."""
    from preprocess.shards import INDEX_FILE
    from preprocess.state import damaged_parts, load_committed, read_table, retire_damaged
    from preprocess.storage import Storage
    from preprocess.writer import ShardWriter
    from tests.preprocess.test_writer import video_rows

    w = ShardWriter("s3://shards/damaged", 0, "run", 16 << 20, [], {}, commit_every_s=0)
    for i in range(4):
        w.add(video_rows(i))
    w.close()
    storage = Storage("s3://shards/damaged")
    committed = load_committed(storage)
    assert len(committed.parts) == 4 and all(committed.info[p]["tar_bytes"] > 0 for p in committed.parts)
    cut, gone, changed, whole = committed.parts

    def tar(part: str) -> str:
        return f"damaged/shards/{part}.tar"

    body = s3.get_object(Bucket="shards", Key=tar(cut))["Body"].read()
    s3.put_object(Bucket="shards", Key=tar(cut), Body=body[:1000])
    s3.delete_object(Bucket="shards", Key=tar(gone))
    body = bytearray(s3.get_object(Bucket="shards", Key=tar(changed))["Body"].read())
    body[700:704] = b"oops"
    s3.put_object(Bucket="shards", Key=tar(changed), Body=bytes(body))
    assert sorted(damaged_parts(storage, committed, deep=False)) == sorted([cut, gone])
    left, retired = retire_damaged(storage, committed, deep=True, run_id="rerun")
    assert sorted(retired) == sorted([cut, gone, changed]) and "sha256" in retired[changed]
    assert load_committed(storage).parts == left.parts == [whole]
    assert set(read_table(storage, INDEX_FILE)["shard"]) == {f"{whole}.tar"}
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket="shards", Prefix="damaged/")["Contents"]}
    assert {f"damaged/_retired/{p}.parquet" for p in (cut, gone, changed)} <= listed
    assert not {tar(cut), tar(changed)} & listed
