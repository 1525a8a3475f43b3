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


def test_symlink_cycles_are_followed_once(tree, tmp_path, caplog):
    """A link back up the tree (a cycle) and a second link to the same directory: each real directory is
    listed once and the listing ends; a link to a directory outside the tree is followed."""
    import os

    os.symlink(tree / "a", tree / "a" / "b" / "loop")  # a/b/loop -> a
    os.symlink(tree / "a" / "b", tree / "a" / "again")  # a second way into a/b
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.mp4").write_bytes(b"v" * 10)
    os.symlink(outside, tree / "a" / "ext")
    os.symlink(tree / "gone", tree / "a" / "dangling.mp4")
    with caplog.at_level("WARNING", logger="preprocess"):
        got = [f.uri for f in list_inputs(str(tree / "a"))]
    names = sorted(os.path.basename(u) for u in got)
    assert names == ["dangling.mp4", "w.mp4", "x.mp4", "y.mov", "z.mp4"], got
    assert "leads back to" in caplog.text
    sizes = {os.path.basename(f.uri): f.size for f in list_inputs(str(tree / "a"))}
    assert sizes["dangling.mp4"] == -1  # fails later as missing_file


def test_manifest_lines_that_cannot_be_read_are_problems_not_crashes(tree, monkeypatch):
    """An unknown scheme, a scheme whose package is missing, and a store that never answers: each line
    gets a problem (a recorded failure later); the other lines list normally, in order."""
    import time

    from preprocess import storage

    real = storage._stat_entry

    def stat(uri):
        if "hangs" in uri:
            time.sleep(60)
        return real(uri)

    monkeypatch.setattr(storage, "_stat_entry", stat)
    (tree / "list.txt").write_text(f"a/x.mp4\nfoo://bucket/v.mp4\ns3://hangs/v.mp4\n{tree / 'a/b/z.mp4'}\n")
    t0 = time.monotonic()
    got = list_inputs(str(tree / "list.txt"), timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    expected = [str(tree / "a/x.mp4"), "foo://bucket/v.mp4", "s3://hangs/v.mp4", str(tree / "a/b/z.mp4")]
    assert [f.uri for f in got] == expected
    assert got[0].problem is None and got[3].problem is None and got[0].size == 10
    assert got[1].problem[0] == "unsupported_uri" and "foo://" in got[1].problem[1]
    assert got[2].problem[0] == "unreachable" and "no answer within 1 s" in got[2].problem[1]


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
