"""Multi-node training proven on one machine: two ``deepspeed`` launcher invocations (node ranks 0 and 1, one
process each, ``--no_ssh``, rendezvous on loopback) train one job together. The same 2-rank job run by a
single torchrun gives bitwise the same losses, so the two "nodes" really are one data-parallel job.
Node 1 omits ``--no_local_rank``: train/run.py accepts the ``--local_rank=N`` the launcher then appends."""
from __future__ import annotations

import subprocess
import sys

from tests.train.conftest import REF_STEPS, ROOT, env, free_port, metrics, same_training


def test_two_nodes_on_loopback_train_together(tmp_path, base_overrides, reference_zero2):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = free_port()
    steps = 4
    procs = []
    for node in (1, 0):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               *(["--no_local_rank"] if node == 0 else []),
               str(ROOT / "train" / "run.py"), f"train.out_dir={out}", *base_overrides, f"stage.steps={steps}"]
        log = open(tmp_path / f"node{node}.log", "wb")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = {n: (tmp_path / f"node{n}.log").read_text(errors="replace") for n in (0, 1)}
    assert codes == [0, 0], f"{codes}\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    assert "dist_world_size=2" in logs[0] and "dist_world_size=2" in logs[1]
    ckpt = out / "stage1" / "checkpoints" / f"step_{3:08d}" / "trainer"
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    assert steps < REF_STEPS
    bad = same_training(metrics(out), metrics(reference_zero2), range(1, steps + 1))
    assert not bad, "\n".join(bad)
