"""input= forms: directory, glob, manifests (.txt/.csv/.parquet), single file; atomic writes."""
import pandas as pd
import pytest

from preprocess.config import ConfigError
from preprocess.storage import Storage, list_inputs


@pytest.fixture()
def tree(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").mkdir()
    for rel in ("a/x.mp4", "a/b/y.mov", "a/b/z.mp4", "a/.hidden.mp4"):
        (tmp_path / rel).write_bytes(b"v" * 10)
    return tmp_path


def test_directory_is_walked_recursively_without_hidden_files(tree):
    got = [f.uri for f in list_inputs(str(tree / "a"))]
    assert got == [str(tree / p) for p in ("a/b/y.mov", "a/b/z.mp4", "a/x.mp4")]
    assert all(f.size == 10 and f.mtime > 0 for f in list_inputs(str(tree / "a")))


def test_glob(tree):
    assert [f.uri for f in list_inputs(str(tree / "a" / "b" / "*.mp4"))] == [str(tree / "a/b/z.mp4")]
    with pytest.raises(ConfigError, match="matches no file"):
        list_inputs(str(tree / "nothing*.mp4"))


def test_manifests(tree):
    (tree / "list.txt").write_text("# comment\na/x.mp4\n\na/b/z.mp4\nmissing.mp4\n")
    got = list_inputs(str(tree / "list.txt"))
    assert [f.uri for f in got] == [str(tree / "a/x.mp4"), str(tree / "a/b/z.mp4"), str(tree / "missing.mp4")]
    assert [f.size for f in got] == [10, 10, -1]  # a missing entry fails later as missing_file
    (tree / "list.csv").write_text("id,path\n1,a/x.mp4\n2," + str(tree / "a/b/y.mov") + "\n")
    assert [f.uri for f in list_inputs(str(tree / "list.csv"))] == [str(tree / "a/x.mp4"), str(tree / "a/b/y.mov")]
    pd.DataFrame({"path": ["a/b/z.mp4"], "other": [1]}).to_parquet(tree / "list.parquet")
    assert [f.uri for f in list_inputs(str(tree / "list.parquet"))] == [str(tree / "a/b/z.mp4")]


def test_single_file_and_missing_input(tree):
    assert [f.uri for f in list_inputs(str(tree / "a/x.mp4"))] == [str(tree / "a/x.mp4")]
    with pytest.raises(ConfigError, match="does not exist"):
        list_inputs(str(tree / "nope"))


def test_atomic_write_leaves_no_temporary(tmp_path):
    st = Storage(str(tmp_path / "out"))
    st.write_bytes("d/f.json", b"{}")
    assert st.read_bytes("d/f.json") == b"{}" and st.list("d") == ["f.json"]
