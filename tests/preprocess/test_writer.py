"""The shard writer on its own (no Ray): every finished video is committed within writer.commit_every_s (0: before
it is reported), each part records its tar's size and sha256, and a writer whose driver is gone commits nothing."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from preprocess import schema, writer
from preprocess.lock import DriverCheck, Holder, process_start
from preprocess.shards import LOCK_FILE, SHARD_DIR, TAR_SUFFIX
from preprocess.stage import new_row
from preprocess.state import load_committed
from preprocess.storage import Storage
from preprocess.video import encode_mp4
from preprocess.writer import DriverGone, ShardWriter

MP4 = encode_mp4(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8), 25.0, crf=30,
                 preset="ultrafast")


def video_rows(i: int, n_clips: int = 2) -> list[dict]:
    """The clip rows of video ``i`` as the sink hands them to a writer."""
    vk = f"{i:016x}"
    return [new_row(key=schema.clip_key(vk, c), video_key=vk, source=f"/in/v{i}.mp4", source_size=1000 + i,
                    source_mtime=1.0, source_seconds=1.0, n_clips=n_clips, clip_index=c, shot_index=0,
                    frame_index=np.arange(8, dtype=np.int32) + 8 * c, timestamps=np.arange(8) / 25.0 + 0.32 * c,
                    fps=25.0, width=32, height=32, video=MP4, start_frame=8 * c, end_frame=8 * c + 7, n_frames=8,
                    src_fps=25.0, src_width=32, src_height=32, src_codec="h264", src_rotation=0)
            for c in range(n_clips)]


def committed_videos(out) -> set[str]:
    c = load_committed(Storage(str(out)), cleanup=False)
    return set(c.videos()["video_key"]) if len(c.stats) else set()


def test_each_video_is_committed_before_it_is_reported(tmp_path):
    w = ShardWriter(str(tmp_path), 0, "run", 16 << 20, [], {}, commit_every_s=0)
    for i in range(3):
        events = w.add(video_rows(i))
        assert [e["event"] for e in events] == ["video", "commit"]
        assert f"{i:016x}" in committed_videos(tmp_path)
    assert w.close()[-1]["event"] == "timings"
    c = load_committed(Storage(str(tmp_path)), cleanup=False)
    assert len(c.parts) == 3
    for part in c.parts:
        data = (tmp_path / SHARD_DIR / f"{part}{TAR_SUFFIX}").read_bytes()
        assert c.info[part] == {"tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest()}


def test_a_part_is_committed_once_its_oldest_video_waited_commit_every_s(tmp_path):
    w = ShardWriter(str(tmp_path), 0, "run", 16 << 20, [], {}, commit_every_s=2.0)
    assert [e["event"] for e in w.add(video_rows(0))] == ["video"]  # within the budget: the part stays open
    assert [e["event"] for e in w.add(video_rows(1))] == ["video"]
    deadline = time.time() + 10
    while not committed_videos(tmp_path) and time.time() < deadline:
        time.sleep(0.1)  # no call: the writer's own thread commits
    assert committed_videos(tmp_path) == {f"{0:016x}", f"{1:016x}"}
    events = w.add(video_rows(2))
    assert [e["event"] for e in events] == ["commit", "video"]  # the background commit is reported with the next call
    assert events[0]["clips"] == 4
    w.close()
    assert len(committed_videos(tmp_path)) == 3


def test_a_writer_whose_driver_is_gone_commits_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "DRIVER_CHECK_S", 0.1)
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    holder = replace(Holder.this_process("run"), pid=driver.pid, pid_start=process_start(driver.pid))
    check = DriverCheck(holder, stale_s=30)
    lease = {"token": holder.token, "heartbeat": time.time()}
    Storage(str(tmp_path)).write_bytes(LOCK_FILE, json.dumps(lease).encode())

    # a part left open when the driver dies is discarded by the writer's own thread
    w = ShardWriter(str(tmp_path), 0, "run", 16 << 20, [], {}, commit_every_s=None, driver=check)
    assert [e["event"] for e in w.add(video_rows(0))] == ["video"]
    assert list((tmp_path / "_staging").glob("*.tmp"))
    driver.kill()
    driver.wait()
    deadline = time.time() + 10
    while w.stopped is None and time.time() < deadline:
        time.sleep(0.05)
    assert "driver (pid" in w.stopped
    assert not list((tmp_path / "_staging").glob("*.tmp"))
    with pytest.raises(DriverGone):
        w.add(video_rows(1))
    with pytest.raises(DriverGone):
        w.close()

    # a video finished after the driver died is not committed either
    w = ShardWriter(str(tmp_path), 1, "run", 16 << 20, [], {}, commit_every_s=0, driver=check)
    with pytest.raises(DriverGone, match="driver"):
        w.add(video_rows(2))
    assert not list((tmp_path / SHARD_DIR).iterdir()) and not list((tmp_path / "_staging").glob("*.tmp"))
