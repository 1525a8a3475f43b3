"""A real two-node Ray cluster on loopback (`ray start` head + worker): the pipeline run against its
address writes the same keys as a local run."""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.preprocess.helpers import ENGINE_OVERRIDES, index_keys, make_corpus, run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")
def test_two_node_cluster_gives_the_local_keys(tmp_path):
    d = tmp_path / "in"
    make_corpus(d, n_good=4)
    args = [f"input={d}", *ENGINE_OVERRIDES]
    r = run_cli([*args, f"output={tmp_path / 'local'}", "ray.num_cpus=2"])
    assert r.returncode == 0, r.stderr[-3000:]

    port = _free_port()
    # `ray start` clusters use token auth (Ray >= 2.5x); the driver reads the same ~/.ray/auth_token.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--include-dashboard=false", *common], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        address = f"127.0.0.1:{port}"
        probe = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + 120
        worker = None
        while time.time() < deadline:
            q = subprocess.run(["python", "-c", probe, address], capture_output=True, text=True, env=env, timeout=60)
            n = int(q.stdout.strip().splitlines()[-1]) if q.returncode == 0 and q.stdout.strip() else 0
            if n >= 1 and worker is None:
                worker = subprocess.Popen(["ray", "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                           *common], env=env, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(worker)
            if n >= 2:
                break
            time.sleep(1)
        assert n == 2, "the second Ray node did not join"
        r = run_cli([*args, f"output={tmp_path / 'cluster'}", f"ray.address={address}"], env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        _stop(procs)
    assert index_keys(tmp_path / "cluster") == index_keys(tmp_path / "local")
