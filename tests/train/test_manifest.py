"""The checkpoint key and the manifest: where the key comes from, that it is refused when others can use it,
who owns which file of a checkpoint, and what each verification level sees."""
from __future__ import annotations

import os

import pytest

from train import manifest


def test_the_key_is_made_once_private_and_refused_when_others_can_use_it(tmp_path, monkeypatch):
    monkeypatch.delenv(manifest.KEY_ENV, raising=False)
    path = tmp_path / "conf" / "checkpoint.key"
    assert manifest.load_key(str(path)) == (None, str(path))  # a resume never makes one
    key, where = manifest.load_key(str(path), create=True)
    assert len(key) == 64 and where == str(path) and path.stat().st_mode & 0o777 == 0o600
    assert manifest.load_key(str(path), create=True) == (key, str(path))  # the same key at every save
    monkeypatch.setenv(manifest.KEY_ENV, "a key from a Kubernetes secret")
    assert manifest.load_key(None) == (b"a key from a Kubernetes secret", f"${manifest.KEY_ENV}")
    assert manifest.load_key(str(path))[0] == key  # an explicit key file wins
    os.chmod(path, 0o644)
    with pytest.raises(manifest.KeyFileError, match=f"{path} is open to other users .*chmod 600"):
        manifest.load_key(str(path))
    path.write_text("short")
    os.chmod(path, 0o600)
    with pytest.raises(manifest.KeyFileError, match="holds 5 bytes"):
        manifest.load_key(str(path))


def test_each_file_is_hashed_by_the_rank_that_wrote_it():
    assert [manifest.owner(r) for r in (
        "zero_pp_rank_3_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
        "zero_pp_rank_5_mp_rank_00_model_states.pt", "trainer/rank_00007.pt", "mp_rank_00_model_states.pt",
        "trainer/state.pt", "config.yaml")] == [3, 12, 5, 7, 0, 0, 0]


def test_sizes_see_missing_and_truncated_files_checksums_see_changed_ones(tmp_path):
    (tmp_path / "trainer").mkdir()
    for rel, data in (("a.pt", b"a" * 100), ("trainer/rank_00001.pt", b"b" * 50), ("config.yaml", b"x: 1\n")):
        (tmp_path / rel).write_bytes(data)
    (tmp_path / "universal").mkdir()  # made later from a verified checkpoint, with its own manifest
    (tmp_path / "universal" / "x.pt").write_bytes(b"u")
    key = b"k" * 32
    record = manifest.sign({"step": 1, "files": manifest.describe(tmp_path, manifest.listed(tmp_path))}, key)
    assert sorted(record["files"]) == ["a.pt", "config.yaml", "trainer/rank_00001.pt"]
    assert manifest.verify(tmp_path, record, key, "k") == []

    (tmp_path / "a.pt").write_bytes(b"A" + b"a" * 99)  # same size
    assert manifest.verify(tmp_path, record, key, "k", level="size") == []
    [changed] = manifest.verify(tmp_path, record, key, "k", level="sha256")
    assert changed.damaged and changed.path == str(tmp_path / "a.pt") and "sha256 differs" in changed.why
    (tmp_path / "trainer" / "rank_00001.pt").write_bytes(b"b" * 10)
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "planted.pt").write_bytes(b"?")
    problems = manifest.verify(tmp_path, record, key, "k", level="size")
    assert [(p.path.removeprefix(f"{tmp_path}/"), p.why.split(" (")[0]) for p in problems] == [
        ("config.yaml", "is missing"), ("planted.pt", "is not one of the files the save recorded in COMPLETE"),
        ("trainer/rank_00001.pt", "is 10 bytes, COMPLETE recorded 50")]

    record["step"] = 2  # a changed record: the signature no longer matches
    [untrusted] = manifest.trust_problems(tmp_path, record, key, "k", trust_unsigned=False)
    assert not untrusted.damaged and "signature does not match the checkpoint key k" in untrusted.why
    assert manifest.trust_problems(tmp_path, record, key, "k", trust_unsigned=True) == []
