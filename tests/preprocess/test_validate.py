"""The validator catches what a broken dataset looks like."""
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from preprocess.validate import validate
from tests.conftest import ROOT
from tests.preprocess.helpers import make_corpus, run_inprocess


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    make_corpus(d / "in", n_good=2)
    assert run_inprocess(str(d / "in"), str(d / "out")) == 0
    assert validate(str(d / "out"), log=lambda *_: None) == []
    return d / "out"


def _copy(dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    [tar] = sorted((out / "shards").glob("*.tar"))
    return out, tar


def _rewrite(tar: Path, transform):
    with tarfile.open(tar) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    members = transform(members)
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _cli(out):
    return subprocess.run([sys.executable, str(ROOT / "preprocess" / "validate.py"), f"output={out}"],
                          capture_output=True, text=True, timeout=120)


def test_truncated_tar(dataset, tmp_path):
    out, tar = _copy(dataset, tmp_path)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    problems = validate(str(out), log=lambda *_: None)
    assert any("truncated" in p for p in problems)
    r = _cli(out)
    assert r.returncode == 1 and "truncated" in r.stdout


def test_missing_field(dataset, tmp_path):
    out, tar = _copy(dataset, tmp_path)
    _rewrite(tar, lambda ms: [(ti, d) for ti, d in ms if not ti.name.endswith(".frame_index.npy")])
    problems = validate(str(out), log=lambda *_: None)
    assert sum("missing field frame_index.npy" in p for p in problems) == 2


def test_wrong_dtype_and_shape(dataset, tmp_path):
    out, tar = _copy(dataset, tmp_path)

    def bad(ms):
        res = []
        for ti, d in ms:
            if ti.name.endswith(".timestamps.npy"):
                buf = io.BytesIO()
                np.save(buf, np.zeros(3, np.float32))
                d = buf.getvalue()
            res.append((ti, d))
        return res
    _rewrite(tar, bad)
    problems = validate(str(out), log=lambda *_: None)
    assert any("timestamps.npy: dtype float32" in p for p in problems)


def test_members_not_contiguous(dataset, tmp_path):
    out, tar = _copy(dataset, tmp_path)
    _rewrite(tar, lambda ms: ms[1::2] + ms[0::2])  # interleave the two samples
    assert any("not contiguous" in p for p in validate(str(out), log=lambda *_: None))


def test_uncommitted_tar_and_index_mismatch(dataset, tmp_path):
    out, tar = _copy(dataset, tmp_path)
    shutil.copy(tar, tar.with_name("orphan.tar"))
    problems = validate(str(out), log=lambda *_: None)
    assert any("never committed" in p for p in problems)
    assert any("also in" in p for p in problems)  # its keys duplicate the committed shard's


def test_a_missing_directory_is_named_and_not_created(tmp_path):
    missing = tmp_path / "no" / "such"
    r = subprocess.run([sys.executable, str(ROOT / "preprocess" / "validate.py"), f"output={missing}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no such directory" in r.stderr and str(missing) in r.stderr
    assert not missing.exists() and not missing.parent.exists()
