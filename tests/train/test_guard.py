"""The update guard (train/guard.py) through the real command: non-finite gradients are counted, named and
logged, no checkpoint is taken from a step that applied no update, and a run of them stops the job with exit
code 4 leaving the last good checkpoint as ``latest``."""
from __future__ import annotations

import torch

from tests.train.conftest import kill_job, metrics, start
from train import checkpoint as ckpt
from train.guard import UpdateGuard


def test_nonfinite_steps_are_counted_named_and_stop_the_run(tmp_path, base_overrides):
    # steps 1-4 train (checkpoint at 4); 5 is poisoned, 6 recovers; 8, 9, 10 are poisoned: stop at 10
    over = [*base_overrides, "stage.steps=12", "train.checkpoint.every=4", "train.guard.poison_steps=[5,8,9,10]",
            "train.guard.max_consecutive_nonfinite=3"]
    p = start(tmp_path, over)
    try:
        rc = p.wait(timeout=600)
    finally:
        if p.poll() is None:
            kill_job(p)
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert rc != 0 and "exitcode  : 4" in log, log[-4000:]  # the ranks exit 4; torchrun reports it, exits 1
    assert "step 5: non-finite gradients in pose_encoder" in log
    assert "3 optimizer steps in a row up to step 10 applied no update" in log
    m = metrics(tmp_path)
    assert m[4]["update_applied"] == 1 and m[4]["nonfinite_steps"] == 0
    assert m[5]["update_applied"] == 0 and m[5]["nonfinite_steps"] == 1
    assert m[6]["update_applied"] == 1 and m[6]["consecutive_bad_steps"] == 0
    assert m[9]["nonfinite_steps"] == 3 and 10 not in m  # step 10 raised before its record
    # checkpoints: step 4 (periodic) and step 8 is poisoned (no checkpoint): latest stays step 4
    assert ckpt.find_resume(tmp_path / "stage1" / "checkpoints").name == ckpt.tag_of(4)


class _Optimizer:
    """ZeRO-2's surface the guard reads: the gradient partitions and the per-step overflow-check switch."""

    def __init__(self, grad: torch.Tensor):
        self.averaged_gradients = {0: [grad]}
        self.check_grad_overflow = True
        self.cpu_offload = False


class _Engine:
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.applied = True

    def was_step_applied(self) -> bool:
        return self.applied


def test_the_guard_runs_deepspeeds_overflow_check_only_on_steps_it_cannot_clear():
    grad = torch.ones(4)
    opt = _Optimizer(grad)
    guard = UpdateGuard(_Engine(opt), [("pose_encoder.conv_in.weight", torch.nn.Parameter(torch.ones(4)))],
                        max_consecutive=3, owns_overflow_check=True)
    h = guard.before_step(1)
    assert h.finite and h.grad_norm == 2.0 and opt.check_grad_overflow is False  # finite: no per-tensor check
    grad[0] = float("nan")
    guard.bad_groups = lambda: ["pose_encoder"]  # the full-gradient gather needs a real ZeRO engine
    h = guard.before_step(2)
    assert not h.finite and opt.check_grad_overflow is True  # DeepSpeed checks this step and skips it
    guard.engine.applied = False
    guard.after_step(h)
    assert guard.counters()["nonfinite_steps"] == 1
    opt.cpu_offload = True  # the partitions live on the CPU optimizer: DeepSpeed keeps its own check
    assert not UpdateGuard(_Engine(opt), [], max_consecutive=3, owns_overflow_check=True).owns_overflow_check
