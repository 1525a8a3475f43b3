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
