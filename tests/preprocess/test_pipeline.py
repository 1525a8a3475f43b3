"""The engine end to end (annotators off, tiny clips): shards that validate, bad inputs recorded,
resume without rework, stable keys."""
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pandas as pd

from preprocess import demo_media
from preprocess.validate import validate
from tests.preprocess.helpers import failures, index_keys, make_corpus, make_video, run_inprocess, tar_members


def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def _wav(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_bad_inputs_are_recorded_and_never_stop_the_run(ray_local, tmp_path):
    d = tmp_path / "in"
    good = make_corpus(d, n_good=2)
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    data = good[0].read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.txt").write_text("not a video\n" * 100)
    _wav(d / "audio_only.wav")
    make_video(d / "short.mp4", n=4)
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([*(str(p) for p in sorted(d.iterdir())), str(d / "missing.mp4")]) + "\n")
    out = tmp_path / "out"
    code = run_inprocess(str(manifest), str(out))
    assert code == 3  # some inputs failed, the run finished
    f = failures(out)
    by_source = {Path(s).name: r for s, r in zip(f["source"], f["error_class"])}
    assert by_source["empty.mp4"] == "empty_file"
    assert by_source["missing.mp4"] == "missing_file"
    assert by_source["short.mp4"] == "too_short"
    assert by_source["audio_only.wav"] == "no_video_stream"
    assert by_source["notes.txt"] in ("not_a_video", "unreadable")
    assert by_source["corrupt.mp4"] in ("not_a_video", "unreadable")
    assert by_source["truncated.mp4"] in ("not_a_video", "unreadable", "truncated", "too_short")
    assert all(m for m in f["error_message"])
    assert len(f[f["kind"] == "video"]) == 7
    keys = index_keys(out)
    video_keys = set(pd.read_parquet(out / "index.parquet")["video_key"])
    assert len(keys) == 2 and {k.split("_")[0] for k in keys} == video_keys
    assert validate(str(out), deep=True, log=lambda *_: None) == []
    s = _summary(out)
    assert s["videos_failed"] == 7 and s["videos_done"] == 2 and sum(s["failures_by_reason"].values()) == 7


def test_resume_skips_finished_work_without_decoding(ray_local, tmp_path):
    d = tmp_path / "in"
    make_corpus(d, n_good=3)
    out = tmp_path / "out"
    assert run_inprocess(str(d), str(out)) == 0
    first = index_keys(out)
    members = tar_members(out)
    assert len(first) == 3
    # rerun: nothing to do, nothing decoded, same dataset
    assert run_inprocess(str(d), str(out)) == 0
    s = _summary(out)
    assert s["skipped_already_done"] == 3 and s["videos_done"] == 0 and s["stage_frames"] == {}
    assert s["wall_seconds"] < 5
    assert index_keys(out) == first and tar_members(out) == members
    # a renamed copy is recognised by content (only its ends are read) and a new video is added
    shutil.move(d / "good0.mp4", d / "renamed.mp4")
    make_video(d / "new.mp4", "camera", n=20, motion=demo_media.Motion(rotate=(0, 15)))
    assert run_inprocess(str(d), str(out)) == 0
    s = _summary(out)
    assert s["skipped_already_done"] == 3 and s["videos_done"] == 1
    keys = index_keys(out)
    assert len(keys) == 4 and set(first) < set(keys)
    assert validate(str(out), log=lambda *_: None) == []


def test_duplicate_content_is_written_once(ray_local, tmp_path):
    d = tmp_path / "in"
    [p] = make_corpus(d, n_good=1)
    shutil.copy(p, d / "copy.mp4")
    out = tmp_path / "out"
    assert run_inprocess(str(d), str(out)) == 3
    assert len(index_keys(out)) == 1
    f = failures(out)
    assert list(f["error_class"]) == ["duplicate"]
    assert validate(str(out), log=lambda *_: None) == []


def test_long_shots_split_and_keys_are_stable(ray_local, tmp_path):
    d = tmp_path / "in"
    make_video(d / "long.mp4", n=70, motion=demo_media.Motion(shift=(30.0, 0.0)))
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_inprocess(str(d), str(a)) == 0
    assert run_inprocess(str(d / "long.mp4"), str(b), ["writer.shard_bytes=1024"]) == 0
    ka, kb = index_keys(a), index_keys(b)
    assert ka == kb and len(ka) == 4  # 70 frames, max 20 per clip -> 4 windows of 17-18
    idx = pd.read_parquet(a / "index.parquet")
    assert idx["n_frames"].between(8, 20).all() and idx["n_frames"].sum() == 70
    assert all("." not in k for k in ka)


def test_small_shards_roll_over_at_video_boundaries(ray_local, tmp_path):
    d = tmp_path / "in"
    make_corpus(d, n_good=3)
    out = tmp_path / "out"
    assert run_inprocess(str(d), str(out), ["writer.shard_bytes=1024"]) == 0
    idx = pd.read_parquet(out / "index.parquet")
    assert idx["shard"].nunique() == 3  # each video fills a 1 KiB shard on its own
    assert idx.groupby("video_key")["shard"].nunique().max() == 1  # a video never spans shards
    assert validate(str(out), log=lambda *_: None) == []


def test_variable_frame_rate_and_damaged_videos_make_clips(ray_local, tmp_path):
    """Valid VFR video is read by timestamps (not rejected as truncated) into evenly timed clips; a file
    with a corrupt stretch keeps the clips around it and records the stretch (issue 17)."""
    from preprocess.shards import iter_samples
    from tests.preprocess.helpers import make_damaged_video, make_vfr_video

    d = tmp_path / "in"
    d.mkdir()
    make_vfr_video(d / "phone.mp4")
    make_damaged_video(d / "damaged.ts")
    out = tmp_path / "out"
    assert run_inprocess(str(d), str(out), ["plan.target_fps=20"]) == 0
    index = pd.read_parquet(out / "index.parquet")
    by_source = {Path(s).name: g for s, g in index.groupby("source")}
    assert set(by_source) == {"phone.mp4", "damaged.ts"}
    assert len(by_source["damaged.ts"]) >= 2
    times = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            for key, sample in iter_samples(f, select=lambda k, field: field == "timestamps.npy"):
                times[key] = np.load(__import__("io").BytesIO(sample["timestamps.npy"]))
    for key in by_source["phone.mp4"]["key"]:
        assert np.allclose(np.diff(times[key]), 0.05), times[key]  # evenly timed at 20 fps
    videos = pd.concat([pd.read_parquet(p) for p in (out / "shards").glob("*.parquet")])
    damaged = videos[(videos["kind"] == "video") & videos["source"].str.endswith("damaged.ts")]
    stretches = json.loads(damaged["clips_dropped"].iloc[0])["damaged_stretches"]
    assert stretches and all(len(s) == 2 for s in stretches)
    assert validate(str(out), deep=True, log=lambda *_: None) == []


def test_a_manifest_line_naming_no_readable_store_is_a_failure_not_a_dead_run(ray_local, tmp_path):
    good = make_corpus(tmp_path / "in", n_good=1)[0]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{good}\nfoo://bucket/clip.mp4\n")
    out = tmp_path / "out"
    assert run_inprocess(str(manifest), str(out)) == 3
    f = failures(out)
    row = f[f["source"] == "foo://bucket/clip.mp4"].iloc[0]
    assert (row["stage"], row["error_class"]) == ("list", "unsupported_uri") and "foo://" in row["error_message"]
    assert _summary(out)["inputs_unreadable_entries"] == 1 and len(index_keys(out)) >= 1


def test_a_damaged_committed_part_is_redone_into_a_new_part(ray_local, tmp_path):
    """A committed tar truncated, deleted or changed afterwards: the rerun retires its part (the index never lists
    it again) and redoes its videos into a new part; same-size damage is found by verify=deep (issue 17)."""
    d = tmp_path / "in"
    make_corpus(d, n_good=3)
    out = tmp_path / "out"
    args = ["writer.shard_bytes=1024"]  # one part per video
    assert run_inprocess(str(d), str(out), args) == 0
    want = index_keys(out)
    index = pd.read_parquet(out / "index.parquet")
    tars = sorted(index["shard"].unique())
    assert len(tars) == 3
    cut, gone, changed = (out / "shards" / t for t in tars)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    gone.unlink()
    problems = validate(str(out), log=lambda *_: None)
    assert any(cut.name in p and "were committed" in p for p in problems)
    assert any(gone.name in p and "missing" in p for p in problems)

    assert run_inprocess(str(d), str(out), args) == 0
    s = _summary(out)
    assert sorted(s["parts_retired"]) == sorted(t[: -len(".tar")] for t in (cut.name, gone.name))
    assert s["videos_done"] == 2 and s["skipped_already_done"] == 1
    index = pd.read_parquet(out / "index.parquet")
    assert sorted(index["key"]) == want and not set(index["shard"]) & {cut.name, gone.name}
    assert len(list((out / "_retired").glob("*.parquet"))) == 2
    assert validate(str(out), deep=True, log=lambda *_: None) == []

    data = bytearray(changed.read_bytes())  # same size, other bytes: only the checksum sees it
    data[1000:1010] = b"x" * 10
    changed.write_bytes(bytes(data))
    assert run_inprocess(str(d), str(out), args) == 0
    assert _summary(out)["videos_done"] == 0  # verify=size: the sizes agree
    assert any("sha256" in p for p in validate(str(out), deep=True, log=lambda *_: None))
    assert run_inprocess(str(d), str(out), [*args, "verify=deep"]) == 0
    s = _summary(out)
    assert list(s["parts_retired"]) == [changed.name[: -len(".tar")]] and s["videos_done"] == 1
    assert index_keys(out) == want
    assert validate(str(out), deep=True, log=lambda *_: None) == []


def test_the_exit_code_reflects_failures_an_earlier_run_recorded(ray_local, tmp_path):
    """A rerun that leaves an earlier failure in place exits 3 (not 0); once the input is gone or retried
    successfully, 0."""
    d = tmp_path / "in"
    make_corpus(d, n_good=1)
    (d / "broken.mp4").write_bytes(b"\x00" * 4096)
    out = tmp_path / "out"
    assert run_inprocess(str(d), str(out)) == 3
    assert run_inprocess(str(d), str(out)) == 3  # nothing redone, but broken.mp4 still has only its failure
    s = _summary(out)
    assert s["videos_failed"] == 0 and s["inputs_with_open_failures"] == 1
    (d / "broken.mp4").unlink()
    assert run_inprocess(str(d), str(out)) == 0
    assert _summary(out)["inputs_with_open_failures"] == 0


def test_retry_failed_keeps_the_record_and_marks_the_latest_attempt(ray_local, tmp_path):
    """An input fails; retried while still broken, it has two failure rows of which the newer is ``latest``;
    fixed and retried, it has clips and neither failure row is ``latest`` (the exit code then says 0). (The command
    exits with the code ``pipeline.run`` returns: test_cli.py runs it to each of 0, 2 and 3.)"""
    inputs = tmp_path / "in"
    inputs.mkdir()
    video = inputs / "clip.mp4"
    video.write_bytes(b"not a video, yet" * 64)
    out = tmp_path / "out"

    def run(*extra):
        code = run_inprocess(str(inputs), str(out), list(extra))
        return code, failures(out), pd.read_parquet(out / "index.parquet")

    code, f1, _ = run()
    assert code == 3 and len(f1) == 1 and f1["latest"].tolist() == [True]
    code, f2, _ = run("retry_failed=true")
    assert code == 3 and len(f2) == 2
    f2 = f2.sort_values("run_id")
    assert f2["latest"].tolist() == [False, True] and f2["run_id"].iloc[0] == f1["run_id"].iloc[0]
    make_video(video, n=24)
    code, f3, index = run("retry_failed=true")
    assert code == 0 and len(index) > 0 and set(index["source"]) == {str(video)}
    assert len(f3) == 2 and not f3["latest"].any()  # both failures are history now


def test_a_manifest_that_lists_a_file_twice_writes_it_once(ray_local, tmp_path):
    a, b = make_video(tmp_path / "a.mp4"), make_video(tmp_path / "b.mp4", photo="camera")
    manifest = tmp_path / "inputs.txt"
    manifest.write_text(f"{a}\n{b}\n{a}\n")
    out = tmp_path / "out"
    assert run_inprocess(str(manifest), str(out)) == 3  # the repeat is recorded, like any failure
    keys = index_keys(out)
    assert keys and len(keys) == len(set(keys))
    assert failures(out)[["source", "error_class"]].values.tolist() == [[str(a), "duplicate"]]
    assert _summary(out)["inputs_listed_twice"] == 1
    assert validate(str(out)) == []
