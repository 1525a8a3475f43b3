"""The update guard (train/guard.py) through the real command: non-finite gradients are counted, named and
logged, no checkpoint is taken from a step that applied no update, and a run of them stops the job with exit
code 4 leaving the last good checkpoint as ``latest``."""
from __future__ import annotations

import pytest
import torch

from tests.train.conftest import metrics, run_to_exit
from train import checkpoint as ckpt
from train.guard import UpdateGuard


def test_nonfinite_steps_are_counted_named_and_stop_the_run(tmp_path, base_overrides):
    # steps 1-4 train (checkpoint at 4); 5 is poisoned, 6 recovers; 8, 9, 10 are poisoned: stop at 10
    over = [*base_overrides, "stage.steps=12", "train.checkpoint.every=4", "train.guard.poison_steps=[5,8,9,10]",
            "train.guard.max_consecutive_nonfinite=3"]
    rc, log = run_to_exit(tmp_path, over)
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


def test_the_guard_clips_with_its_norm_only_finite_steps_above_the_threshold():
    grad = torch.ones(4)  # norm 2
    opt = _Optimizer(grad)
    guard = UpdateGuard(_Engine(opt), [], max_consecutive=3, owns_overflow_check=True, clip=1.0)
    h = guard.before_step(1)
    assert h.grad_norm == 2.0  # the norm before clipping is what is logged
    torch.testing.assert_close(grad, torch.full((4,), 1.0 / (2.0 + 1e-6)))  # DeepSpeed's rule: clip / (norm + 1e-6)
    guard.before_step(2)  # now at the threshold: left alone
    torch.testing.assert_close(grad, torch.full((4,), 1.0 / (2.0 + 1e-6)))
    grad[0] = float("nan")
    guard.bad_groups = lambda: ["pose_encoder"]
    before = grad.clone()
    assert not guard.before_step(3).finite and opt.check_grad_overflow is True  # DeepSpeed skips it; not scaled
    torch.testing.assert_close(grad, before, equal_nan=True)


def _clip_run(owns: bool, out: str) -> None:
    """One ZeRO-2 step of a small model through the trainer's DeepSpeed config (this process = one gloo rank),
    SGD with lr 1 so that the update is the clipped gradient itself; saves the weights after the step. Each engine
    starts from the same seed: the two settings run one after the other in one process (:func:`_clip_runs`)."""
    import deepspeed

    from models.command_line import compose
    from train.config import to_job
    from train.engine import deepspeed_config, guard_clips

    job = to_job(compose("train", ["launch=local", "zero=zero2", "train.optimizer.grad_clip=0.05",
                                   f"train.guard.owns_clipping={str(owns).lower()}"]))
    assert guard_clips(job) is owns
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    cfg = {**deepspeed_config(job, sum(p.numel() for p in model.parameters())), "zero_allow_untested_optimizer": True}
    assert cfg["gradient_clipping"] == (0.0 if owns else 0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)
    named = list(engine.module.named_parameters())
    guard = UpdateGuard(engine, named, max_consecutive=3, owns_overflow_check=True, clip=0.05 if owns else 0.0)
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    engine.backward(engine(x).float().square().mean() * 100)
    health = guard.before_step(1)
    engine.step()
    guard.after_step(health)
    assert health.applied and health.grad_norm > 0.05  # clipping is active
    torch.save({"weights": [p.detach().float().clone() for _, p in named], "norm": health.grad_norm}, out)


def _clip_runs(outs: dict) -> None:
    """:func:`_clip_run` of each ``{owns: out}`` in this one process (one import of DeepSpeed, one gloo group)."""
    for owns, out in outs.items():
        _clip_run(owns, out)


def test_guard_clipping_updates_the_weights_as_deepspeeds_clipping(tmp_path):
    """train.guard.owns_clipping: the guard's in-place clip before DeepSpeed's step (DeepSpeed's clipping norm
    off) moves the weights exactly as DeepSpeed's own clipping."""
    import subprocess
    import sys

    from tests.train.conftest import ROOT, env, free_port

    outs = {owns: str(tmp_path / f"{owns}.pt") for owns in (True, False)}
    code = f"from tests.train.test_guard import _clip_runs; _clip_runs({outs!r})"
    e = dict(env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {owns: torch.load(out) for owns, out in outs.items()}
    assert runs[True]["norm"] == pytest.approx(runs[False]["norm"], rel=1e-5)
    for a, b in zip(runs[True]["weights"], runs[False]["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
