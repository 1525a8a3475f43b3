"""A real two-node Ray cluster on loopback (`ray start` head + worker): the pipeline run against its
address writes the same keys as a local run."""
import os
import shutil
import socket
import subprocess
import time

import pytest

from tests.preprocess.helpers import ENGINE_OVERRIDES, index_keys, make_corpus, run_cli, run_inprocess

# One driver that waits in-process until the cluster has ``n`` live nodes (one Ray import and connection for the
# whole wait); prints the count it saw.
PROBE = """import ray, sys, time
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.time() + float(sys.argv[3])
alive = lambda: sum(n["Alive"] for n in ray.nodes())
while alive() < int(sys.argv[2]) and time.time() < deadline:
    time.sleep(0.2)
print(alive())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(procs):
    """kill -9 of every process of both nodes (the ``ray start`` processes and all they started): a node's graceful
    stop (SIGTERM) takes about 30 s, and the keys are already written."""
    import psutil

    family = []
    for p in procs:
        try:
            family += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for q in family:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=20)
    for p in procs:
        p.wait()


@pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not on PATH")
def test_two_node_cluster_gives_the_local_keys(tmp_path, ray_local):
    d = tmp_path / "in"
    make_corpus(d, n_good=4)
    # the local run: the pipeline on this session's local Ray (2 CPUs)
    assert run_inprocess(str(d), str(tmp_path / "local")) == 0

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
        deadline = time.time() + 120
        while not _listening(port) and time.time() < deadline:  # the head's GCS takes connections
            assert head.poll() is None, f"the head node exited with {head.returncode}"
            time.sleep(0.1)
        procs.append(subprocess.Popen(["ray", "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                       *common], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        n = 0
        while n < 2 and time.time() < deadline:  # a driver may connect only once the head's raylet is up: retried
            q = subprocess.run(["python", "-c", PROBE, address, "2", str(max(1, deadline - time.time()))],
                               capture_output=True, text=True, env=env, timeout=180)
            n = int(q.stdout.strip().splitlines()[-1]) if q.returncode == 0 and q.stdout.strip() else 0
            if n < 2:
                time.sleep(0.5)
        assert n == 2, "the second Ray node did not join"
        r = run_cli([f"input={d}", *ENGINE_OVERRIDES, f"output={tmp_path / 'cluster'}", f"ray.address={address}"],
                    env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        _stop(procs)
    assert index_keys(tmp_path / "cluster") == index_keys(tmp_path / "local")
