"""The command as users type it: exit codes, config errors, the prod config, kill -9 and resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from preprocess.validate import validate
from tests.conftest import ROOT
from tests.preprocess.helpers import ENGINE_OVERRIDES, index_keys, make_corpus, run_cli


@pytest.mark.parametrize("args,needle", [
    (["plan.min_frames=50", "plan.max_frames=20"], "plan.min_frames"),
    (["decode.backend=ffmpeg"], "decode.backend"),
    (["plan.min_frames=abc"], "min_frames"),
    (["input=/definitely/not/here"], "/definitely/not/here"),
    (["writer.shard_bytes=10"], "writer.shard_bytes"),
    (["max_videos=-1"], "max_videos=-1 is out of range"),
    (["decode.max_side=-5"], "decode.max_side=-5 is out of range"),
    (["decode.crf=60"], "decode.crf=60 is out of range: use a value in [0, 51]"),
    (["writer.jpeg_quality=0"], "writer.jpeg_quality=0 is out of range"),
    (["nonsense_key=3"], "unknown config key 'nonsense_key'"),
    (["decode.crff=3"], "unknown config key 'decode.crff'"),
    (["+cluster=nope"], "cluster has no option 'nope' (available: latents, prod)"),
    (["decode.crf=[1,"], "bad override decode.crf=[1,"),
    (["probe.list_timeout_s=0"], "probe.list_timeout_s=0.0 is out of range"),
])
def test_bad_config_is_a_clear_error(args, needle, tmp_path):
    r = run_cli([*args, f"output={tmp_path / 'o'}", "annotators=none"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_an_output_that_cannot_work_is_refused_in_one_line(tmp_path):
    """A file where the output directory should be, and a disk without room: exit 2 with the path and the
    fix, nothing created, no traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli([f"output={afile}", "annotators=none"], timeout=120)
    assert r.returncode == 2 and f"output={afile} is a file" in r.stderr and "Traceback" not in r.stderr
    from preprocess.config import ConfigError
    from preprocess.storage import check_output

    with pytest.raises(ConfigError, match="MiB free on its disk"):
        check_output(str(tmp_path / "new"), min_free_bytes=1 << 62)
    check_output(str(tmp_path / "new"))  # a creatable, writable directory passes and leaves no probe file
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())


def test_a_printed_config_is_a_config_that_runs():
    """``--cfg job`` builds the typed config before Hydra prints it: a bad value is the same one-line error as a
    run's; the prod profile's environment variables (set on the cluster) need not be set to print it."""
    r = run_cli(["--cfg", "job", "plan.min_frames=-3"], timeout=120)
    assert r.returncode == 2 and "need 1 <= min_frames <= max_frames" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["--cfg", "job", "+cluster=prod", "writer.jpeg_quality=0"], timeout=120)
    assert r.returncode == 2 and "writer.jpeg_quality=0 is out of range" in r.stderr


def test_prod_config_prints_without_connecting():
    t0 = time.time()
    r = run_cli(["+cluster=prod", "--cfg", "job"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert "address: ${oc.env:RAY_ADDRESS,auto}" in r.stdout and "shard_bytes: 536870912" in r.stdout
    assert "${oc.env:DREAMACTOR_INPUT}" in r.stdout  # not resolved: nothing is read or connected
    assert time.time() - t0 < 60


def test_prod_profile_composes_to_a_valid_config(monkeypatch):
    from preprocess.config import to_config
    from tests.conftest import compose

    monkeypatch.setenv("DREAMACTOR_INPUT", "s3://raw/videos/")
    monkeypatch.setenv("DREAMACTOR_OUTPUT", "s3://shards/v1/")
    cfg = to_config(compose("preprocess", ["+cluster=prod"]))
    assert cfg.input == "s3://raw/videos/" and cfg.ray.address == "auto"
    assert cfg.writer.shard_bytes == 512 << 20 and cfg.decode.max_side == 1280
    body = cfg.annotators["body"]
    assert body.resources.num_gpus > 0 and body.params["backend"]["params"]["delegate"] == "gpu"
    assert all(0 < s.resources.num_gpus < 1 for s in cfg.annotators.values())  # GPU fractions
    assert cfg.stages["decode"].num_gpus == 0 and cfg.stages["decode"].num_cpus >= 1  # CPU for decode
    # the profile tunes stages by name; with annotators=none there are none to tune
    assert to_config(compose("preprocess", ["annotators=none", "+cluster=prod"])).annotators == {}


@pytest.mark.parametrize("override,needle", [
    ("writer.commit_every_s=-1", "writer.commit_every_s=-1.0 is out of range"),
    ("lock.stale_s=1", "lock.stale_s=1.0 is out of range: use a value >= 30.0"),
    ("lock.heartbeat_s=0", "lock.heartbeat_s=0.0 is out of range"),
    ("verify=full", "verify='full': use one of size, deep"),
    # every key is read: actor-pool sizes only where there is an actor pool, no resources for a video stage
    ("+stages.sink.min_actors=2", "stages.sink: the sink runs as Ray tasks, not an actor pool"),
    ("+video_stages.refs.resources={num_cpus:1,num_gpus:0,batch_size:1}",
     "video_stages.refs.resources: a video stage runs inside the shard writers"),
    ("stages.decode.min_actors=3", "stages.decode: need 1 <= min_actors <= max_actors"),
    ("~stages.decode.max_actors", "stages.decode: give both min_actors and max_actors, or neither"),
])
def test_lock_commit_and_verify_keys_are_checked(override, needle):
    from preprocess.config import ConfigError, to_config
    from tests.conftest import compose

    with pytest.raises(ConfigError, match=re.escape(needle)):
        to_config(compose("preprocess", [override]))


def test_a_run_where_every_input_fails_writes_its_outputs(tmp_path):
    """Every input fails before any clip exists (not a video, empty file): the run still writes an empty index,
    the failures and the summary, exits 3, and a rerun neither crashes nor redoes the recorded failures."""
    import pandas as pd

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not a video\n")
    (inputs / "empty.mp4").write_bytes(b"")
    out = tmp_path / "out"
    for attempt in range(2):
        r = run_cli([f"input={inputs}", f"output={out}", *ENGINE_OVERRIDES])
        assert r.returncode in ((3,) if attempt == 0 else (0, 3)), r.stdout[-3000:] + r.stderr[-3000:]
        assert len(pd.read_parquet(out / "index.parquet")) == 0
        failures = pd.read_parquet(out / "failures.parquet")
        assert sorted(failures["source"].map(lambda s: s.rsplit("/", 1)[-1])) == ["empty.mp4", "notes.txt"]
        assert json.loads((out / "summary.json").read_text())
    assert validate(str(out)) == []


def _args(d, out, *extra) -> list[str]:
    """Engine-only args with a progress line after every batch of events."""
    return [f"input={d}", f"output={out}", *(a for a in ENGINE_OVERRIDES if not a.startswith("progress_interval_s")),
            "progress_interval_s=0", "ray.num_cpus=2", *extra]


def _committed_videos(out) -> set[str]:
    import pandas as pd
    stats = [pd.read_parquet(p) for p in (out / "shards").glob("*.parquet")]
    return set(pd.concat(stats).query("kind == 'video'")["video_key"]) if stats else set()


N_KILLED = 8  # videos of the kill -9 tests' corpus


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The kill -9 tests' corpus, and the command run on it to its end without interruption (every video committed as
    it is done: ``writer.commit_every_s=0``). Two such runs start together on the one output: one runs, the other is
    refused (test_two_runs_on_one_output_at_once). Returns (input dir, output, [(Popen, stdout, stderr)] of the two
    runs)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    d = root / "in"
    make_corpus(d, n_good=N_KILLED)
    out = root / "out"
    cmd = [sys.executable, str(ROOT / "preprocess" / "run.py"), *_args(d, out, "writer.commit_every_s=0")]
    procs = [subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    return d, out, [(p, *p.communicate(timeout=600)) for p in procs]


def test_a_clean_run_prints_no_traceback(uninterrupted):
    """Nothing alarming on a run where every input succeeds (the isolated decoder used to make
    multiprocessing print a KeyError traceback per semaphore inside Ray workers)."""
    _, out, runs = uninterrupted
    p, stdout, stderr = min(runs, key=lambda r: r[0].returncode)  # the run that held the output
    assert p.returncode == 0, stderr[-3000:]
    text = stdout + stderr
    assert "Traceback" not in text and "KeyError" not in text and "died unexpectedly" not in text, text[-3000:]
    assert len(index_keys(out)) == N_KILLED and validate(str(out), log=lambda *_: None) == []


def test_kill_9_loses_only_the_videos_in_flight_and_the_resume_gives_the_uninterrupted_keys(tmp_path, uninterrupted):
    """writer.commit_every_s=0: every video is committed before the driver reports it. kill -9 of the whole job once
    videos are reported: none of them is redone; the rerun redoes exactly the uncommitted (in-flight) ones, takes
    over the dead run's lock, and leaves every key once (issue 17: before, the open 16 MiB shard was lost whole): the
    key set of the uninterrupted run, no temporary or staging file left. A run after that has nothing to do: no Ray,
    no decoding, every video skipped."""
    import threading

    import pandas as pd

    n = N_KILLED
    d, reference, _ = uninterrupted
    out = tmp_path / "out"
    args = _args(d, out, "writer.commit_every_s=0")  # writer.shard_bytes stays 16 MiB: one part would hold them all
    proc = subprocess.Popen([sys.executable, str(ROOT / "preprocess" / "run.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    reported, enough = [0], threading.Event()

    def follow():
        for line in proc.stderr:
            if m := re.search(r"videos (\d+)/", line):
                reported[0] = int(m.group(1))
                if reported[0] >= 2:
                    enough.set()

    threading.Thread(target=follow, daemon=True).start()
    assert enough.wait(300), "no video was reported done"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: driver, local Ray, writers
    proc.wait()
    done = reported[0]
    if done == n:
        pytest.skip("the run finished before it could be killed")
    committed = _committed_videos(out)
    assert len(committed) >= done  # no video reported done was lost

    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over the lock of run" in r.stdout + r.stderr and "is gone" in r.stdout + r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["videos_done"] == n - len(committed) and s["skipped_already_done"] == len(committed)
    index = pd.read_parquet(out / "index.parquet")
    assert index["video_key"].nunique() == n and not index["key"].duplicated().any()  # 0 missing, 0 twice
    want = index_keys(reference)
    assert len(want) == n and index_keys(out) == want  # the uninterrupted run's keys: none duplicated, none missing
    assert not list((out / "shards").glob("*.tmp")) and not (out / "_staging").exists()
    assert validate(str(out), log=lambda *_: None) == []

    t0 = time.time()
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t0 < 30  # nothing to do: no Ray, no decoding
    s = json.loads((out / "summary.json").read_text())
    assert s["skipped_already_done"] == n and s["videos_done"] == 0 and s["stage_frames"] == {}
    assert index_keys(out) == want


def test_two_runs_on_one_output_at_once(uninterrupted):
    """Two runs started together on one output (the module's uninterrupted run): one runs, the other is refused with
    one line naming the holder (host, pid, run id, heartbeat age) and exit 2; the dataset is whole (issue 17: before,
    each deleted the other's staging files)."""
    _, out, results = uninterrupted
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [e[-2000:] for _, _, e in results]
    (winner, _, _), (_, _, refused) = sorted(results, key=lambda r: r[0].returncode)
    errors = [ln for ln in refused.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in refused
    assert f"output={out} is in use by run " in errors[0] and f"pid {winner.pid}, heartbeat " in errors[0]
    assert "host " in errors[0] and "lock.stale_s" in errors[0]
    assert len(index_keys(out)) == N_KILLED and not (out / "_lock.json").exists()
    assert validate(str(out), log=lambda *_: None) == []


def test_a_killed_driver_leaves_no_committing_writer_and_no_process(tmp_path):
    """kill -9 of the driver alone: its writers commit nothing more (they check the driver before every commit) and
    every process the run started ends within seconds (the reaper of the local Ray); a rerun completes the dataset.
    Before: an orphaned writer committed every remaining part, and Ray's agents lived on."""
    from preprocess.reaper import alive, descendants

    d = tmp_path / "in"
    make_corpus(d, n_good=8)
    out = tmp_path / "out"
    args = _args(d, out, "writer.shard_bytes=1024")  # a commit per video
    proc = subprocess.Popen([sys.executable, str(ROOT / "preprocess" / "run.py"), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen: dict[int, str] = {}
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _committed_videos(out):
        seen.update(descendants({proc.pid}))
        time.sleep(0.1)
    seen.update(descendants({proc.pid}))
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # the driver only
    proc.wait()
    # counted once the driver is dead, not before the kill: the writer commits a part every few ms here, and a
    # test preempted between its count and its kill saw three more parts land while the driver still lived
    at_kill = len(list((out / "shards").glob("*.parquet")))
    deadline = time.time() + 20
    while alive(seen) and time.time() < deadline:
        time.sleep(0.2)
    left = alive(seen)
    try:
        assert not left, f"{len(left)} processes outlived the driver"
        time.sleep(2)
        assert len(list((out / "shards").glob("*.parquet"))) <= at_kill + 1  # at most the commit under way
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(index_keys(out)) == 8 and validate(str(out), log=lambda *_: None) == []
