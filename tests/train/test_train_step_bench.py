"""The trainer's step benchmark (bench/train_step.py) on the CPU, tiny preset: it times ``Trainer.train_step`` and
the trainer's checkpoint save + load, and reports every figure of the GPU runs (docs/performance.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import env, free_port
from train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def zero2_bench(tmp_path_factory):
    """The bench on one process (ZeRO-2, its default), timing two steps, a checkpoint save + load and a profiled step:
    (its directory, its JSON record, its CompletedProcess)."""
    tmp_path = tmp_path_factory.mktemp("train_step_bench")
    out, run_dir = tmp_path / "bench.json", tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--preset", "tiny", "--launch", "local",
           "--frames", "5", "--height", "64", "--width", "64", "--refs", "1", "--steps", "2", "--warmup", "1",
           "--checkpoint", "--profile", str(tmp_path / "prof.txt"),
           "--checkpoint-dir", str(run_dir), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
                          env=dict(env(), MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, json.loads(out.read_text()), proc


def test_train_step_bench_times_the_trainers_step_and_checkpoint(zero2_bench):
    tmp_path, r, proc = zero2_bench
    run_dir = tmp_path / "run"
    assert r["updates"] == "applied" and [s["step"] for s in r["steps"]] == [1, 2, 3]
    assert all(s["finite"] and s["applied"] and s["grad_norm"] > 0 for s in r["steps"])
    assert len(r["step_s_all"]) == 2 and r["step_s"] > 0 and len(r["forward_backward_step_ema_s"]) == 4
    assert 0 < sum(r["forward_backward_step_ema_s"]) <= 1.01 * max(r["step_s_all"])
    assert r["flops_per_step"] > 0 and r["tokens_per_sample"] > 0 and r["checkpointed_blocks"] == 0
    assert r["checkpoint_save_s"] > 0 and r["checkpoint_load_s"] > 0 and r["checkpoint_gib"] > 0
    tag_dir = run_dir / "stage3" / "checkpoints" / ckpt.tag_of(4)  # the trainer's own checkpoint, after the
    meta = ckpt.read_meta(tag_dir)                                   # profiled step 4
    assert meta["step"] == 4 and meta["stage"] == 3 and "frozen_signature" in meta
    assert ckpt.rank_files(tag_dir) == [ckpt.rank_file(tag_dir, 0)]
    assert "step 3: " in proc.stdout and " update applied" in proc.stdout
    prof = (tmp_path / "prof.txt").read_text()  # the profiled step after the timed ones, split by the trainer's ranges
    assert all(f"{name}: host " in prof for name in ("guard.before_step", "deepspeed.step", "ema.update")), prof[-2000:]


def test_train_step_bench_builds_zero3_as_the_trainer_does(tmp_path, zero2_bench):
    """``--zero zero3`` on 2 CPU ranks: the model is built partitioned (deepspeed.zero.Init, as train/stages.py
    builds it) with the same parameter count as the whole model (the ZeRO-2 bench run's), and every update is
    applied."""
    out = tmp_path / "zero3.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(ROOT / "bench" / "train_step.py"), "--preset", "tiny", "--launch", "local",
           "--zero", "zero3", "--frames", "5", "--height", "64", "--width", "64", "--refs", "1", "--steps", "1",
           "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r3, stdout3 = json.loads(out.read_text()), proc.stdout
    _, r2, proc2 = zero2_bench
    assert "model built under zero.Init" in stdout3 and "model built under" not in proc2.stdout
    assert r3["world_size"] == 2 and r3["params"] == r2["params"] > 0
    assert r3["updates"] == "applied" and r3["build_host_rss_gib"] > 0 and r3["peak_host_rss_gib"] > 0


def test_write_init_gives_weights_a_stage_starts_from(tmp_path):
    """``--write-init``: the bench's weights (random, no zero tensor) as a model.safetensors that a trainer stage
    loads (stage.init), for a trainer run at a preset without pretrained weights."""
    import torch

    from models.config import load_preset
    from models.dreamactor import DreamActor
    from models.partitioned import load_safetensors

    path = tmp_path / "init.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           str(ROOT / "bench" / "train_step.py"), "--preset", "tiny", "--launch", "local", "--write-init", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = DreamActor(load_preset("tiny"))
    load_safetensors(model, path)
    params = dict(model.named_parameters())
    assert all(p.any() for p in params.values())  # no zero tensor: no matmul on zeros in a timed run
    assert not params["dit.proj_out.weight"].eq(DreamActor(load_preset("tiny")).dit.proj_out.weight).all()
    assert torch.isfinite(torch.cat([p.flatten() for p in params.values()])).all()
