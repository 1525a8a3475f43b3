"""The output's lock (preprocess/lock.py) on a local disk and on an S3 server (moto): a second run is refused with a
line naming the holder, a stale lock is taken over, runs that start together get one winner, a run whose lease is
taken over notices, and the shard writers' check sees a dead driver."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from preprocess.config import LockConfig
from preprocess.lock import (
    Holder,
    LockLost,
    OutputBusy,
    OutputLock,
    driver_gone,
    machine_id,
    pid_alive,
    process_start,
    read_lease,
)
from preprocess.shards import LOCK_FILE
from preprocess.storage import Storage

CFG = LockConfig(stale_s=30.0, heartbeat_s=0.05, settle_s=0.0)


def dead_pid() -> tuple[int, str]:
    """The pid and start time of a process of this machine that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    start = process_start(p.pid)
    p.wait()
    return p.pid, start


def plant(storage: Storage, **over) -> dict:
    """A lease as another run would have written it."""
    lease = {"run_id": "20260101T000000other", "token": "feedfacefeedface", "host": "elsewhere",
             "machine": "elsewhere/boot/1", "pid": 4242, "pid_start": "1", "output": storage.uri,
             "started": time.time(), "heartbeat": time.time(), **over}
    storage.write_bytes(LOCK_FILE, json.dumps(lease).encode())
    return lease


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "out"))
    request.getfixturevalue("s3")  # a moto server with buckets raw and shards (its objects outlive a test)
    return Storage(f"s3://shards/{request.node.originalname}")


def test_a_second_run_is_refused_naming_the_holder(storage):
    with OutputLock(storage, "runA", CFG) as a:
        with pytest.raises(OutputBusy) as e:
            OutputLock(storage, "runB", CFG).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"run runA (host {a.holder.host}, pid {os.getpid()}, heartbeat" in msg
        assert storage.uri in msg and "lock.stale_s=30" in msg
        time.sleep(0.2)
        assert read_lease(storage)["heartbeat"] > time.time() - 1  # refreshed while held
        assert driver_gone(storage, a.holder, CFG.stale_s) is None
    assert read_lease(storage) is None  # released
    with OutputLock(storage, "runB", CFG) as b:
        assert b.took_over is None


def test_a_stale_lock_is_taken_over(storage):
    pid, start = dead_pid()
    cases = [  # (planted lease, why it is stale)
        ({"machine": machine_id(), "pid": pid, "pid_start": start}, f"its process {pid} on this host is gone"),
        ({"heartbeat": time.time() - 100}, "its heartbeat is 100 s old (lock.stale_s=30)"),
        ({"machine": machine_id(), "pid": os.getpid(), "pid_start": "1"}, "is gone"),  # this pid, reused
    ]
    for over, why in cases:
        plant(storage, **over)
        with OutputLock(storage, "runB", CFG) as b:
            assert why in b.took_over and "run 20260101T000000other" in b.took_over
            assert read_lease(storage)["token"] == b.holder.token
    storage.write_bytes(LOCK_FILE, b"{not json")
    with OutputLock(storage, "runC", CFG) as c:
        assert "does not parse" in c.took_over
    plant(storage)  # another host, fresh heartbeat: alive as far as anyone here can tell
    with pytest.raises(OutputBusy, match="run 20260101T000000other .host elsewhere, pid 4242, heartbeat 0 s ago"):
        OutputLock(storage, "runD", CFG).acquire()


def test_runs_that_start_together_get_one_winner(storage):
    cfg = LockConfig(stale_s=30.0, heartbeat_s=0.05, settle_s=0.0 if storage.local else 1.0)
    locks = [OutputLock(storage, f"run{i}", cfg) for i in range(6)]
    won, refused = [], []
    go = threading.Barrier(len(locks))

    def take(lock):
        go.wait()
        try:
            lock.acquire()
            won.append(lock)
        except OutputBusy:
            refused.append(lock)

    threads = [threading.Thread(target=take, args=(lk,)) for lk in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert read_lease(storage)["token"] == won[0].holder.token
    won[0].release()


def test_a_run_whose_lock_is_taken_over_stops(storage):
    a = OutputLock(storage, "runA", CFG)
    a.acquire()
    deadline = time.time() + 10
    while a.lost is None and time.time() < deadline:
        plant(storage)  # e.g. a run that judged runA stale (again: a heartbeat may have been under way)
        time.sleep(0.2)
    assert "taken over by run 20260101T000000other" in a.lost
    with pytest.raises(LockLost):
        a.check()
    assert "taken over" in driver_gone(storage, a.holder, CFG.stale_s)
    a.release()
    assert read_lease(storage)["token"] == "feedfacefeedface"  # not this run's: left alone


def test_writers_see_a_dead_driver(tmp_path):
    from dataclasses import asdict, replace

    storage = Storage(str(tmp_path / "out"))
    me = Holder.this_process("runA")
    plant(storage, **asdict(me))
    assert driver_gone(storage, me, CFG.stale_s) is None
    pid, start = dead_pid()
    assert not pid_alive(pid, start) and pid_alive(os.getpid(), process_start(os.getpid()))
    assert "its driver (pid" in driver_gone(storage, replace(me, pid=pid, pid_start=start), CFG.stale_s)
    elsewhere = replace(me, machine="elsewhere", pid=pid)
    assert driver_gone(storage, elsewhere, CFG.stale_s) is None  # a pid of another machine is not checked
    plant(storage, **asdict(me), heartbeat=time.time() - 20)
    assert "heartbeat is 20 s old" in driver_gone(storage, elsewhere, CFG.stale_s)  # > stale_s / 2
    assert "taken over" in driver_gone(storage, replace(me, token="0" * 16), CFG.stale_s)
    storage.delete(LOCK_FILE)
    assert "released" in driver_gone(storage, me, CFG.stale_s)


def test_a_run_that_fails_releases_the_lock(tmp_path):
    """The lock is released on errors too: here the output holds a dataset of another format (refused before Ray)."""
    from preprocess import pipeline
    from preprocess.config import ConfigError, to_config
    from tests.conftest import compose
    from tests.preprocess.helpers import ENGINE_OVERRIDES

    out = tmp_path / "out"
    out.mkdir()
    (out / "dataset.json").write_text(json.dumps({"schema_version": -1}))
    cfg = to_config(compose("preprocess", [f"input={tmp_path}", f"output={out}", *ENGINE_OVERRIDES]))
    with pytest.raises(ConfigError, match="schema_version"):
        pipeline.run(cfg, [])
    assert not (out / LOCK_FILE).exists()
