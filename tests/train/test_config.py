"""The trainer's configuration: Hydra groups -> typed job -> the DeepSpeed config (no hand-written JSON)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import compose
from train.config import TrainConfigError, to_job
from train.distributed import strip_local_rank_arg
from train.engine import StageProgress, build_optimizer, deepspeed_config, guard_clips, lr_schedule


def _job(*overrides):
    return to_job(compose("train", ["data.source.dataset=outputs/preprocess", *overrides]))


def test_local_default():
    job = _job()
    assert (job.model.name, job.stage.id, job.zero.stage) == ("tiny", 1, 2)
    assert (job.launch.device, job.launch.backend, job.launch.precision) == ("cpu", "gloo", "fp32")
    assert job.data.source.dataset == "outputs/preprocess" and job.data.face_crops is False
    assert job.train.resume == "auto"
    assert job.stage_dir.as_posix().endswith("outputs/train/tiny/stage1")


def test_production_defaults_are_the_papers():
    job = _job("model=wan1_3b", "data=prod", "launch=gpu", "stage=full")
    assert job.train.optimizer.lr == 5e-6  # paper 4.1
    assert [_job(f"stage={s}").stage.steps for s in ("pose", "face", "full")] == [12, 12, 12]  # launch=local
    assert [_job("launch=gpu", f"stage={s}").stage.steps for s in ("pose", "face", "full")] == [20000, 20000, 30000]
    assert job.launch.precision == "bf16" and job.model.dit.activation_checkpointing == "auto"
    assert job.train.compile_blocks is True and job.train.compile_encoders is True  # CUDA + ZeRO-2
    sp = _job("model=wan1_3b", "data=prod", "launch=gpu", "train.sequence_parallel=4")
    assert sp.train.sequence_parallel == 4 and sp.train.compile_blocks is False  # auto: not with SP
    assert sp.train.compile_encoders is False  # auto: as compile_blocks
    assert _job("launch=gpu", "train.compile_blocks=false", "train.compile_encoders=true").train.compile_encoders


def test_deepspeed_config_zero2():
    job = _job("launch=gpu", "train.optimizer.grad_clip=0.5", "train.grad_accum=4")
    cfg = deepspeed_config(job, num_trainable=10_240_000)
    z = cfg["zero_optimization"]
    assert z["stage"] == 2 and z["overlap_comm"] and z["contiguous_gradients"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 10_240_000  # auto: capped by the model
    assert "offload_optimizer" not in z and "stage3_prefetch_bucket_size" not in z
    assert cfg["bf16"] == {"enabled": True}
    # the update guard clips (train.guard.owns_clipping): DeepSpeed computes no norm of its own
    assert cfg["gradient_clipping"] == 0.0 and z["compute_grad_norm"] is False and guard_clips(job)
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["checkpoint"] == {"load_universal": False}
    own = deepspeed_config(_job("launch=gpu", "train.optimizer.grad_clip=0.5", "train.guard.owns_clipping=false"), 1)
    assert own["gradient_clipping"] == 0.5 and "compute_grad_norm" not in own["zero_optimization"]
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch AdamW + LambdaLR are passed in


def test_deepspeed_config_zero3_offload_and_universal():
    job = _job("zero=zero3_offload", "zero.bucket_size=20480000")
    dim = job.model.dit.dim
    cfg = deepspeed_config(job, num_trainable=1000, load_universal=True)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 20_480_000
    assert z["stage3_param_persistence_threshold"] == 10 * dim
    assert z["stage3_prefetch_bucket_size"] == 1_000_448  # auto: max(0.9 dim^2, 1e6), a multiple of 1024
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["bf16"] == {"enabled": False} and cfg["checkpoint"] == {"load_universal": True}
    assert cfg["gradient_clipping"] > 0 and "compute_grad_norm" not in z  # ZeRO-3 / offload: DeepSpeed clips


@pytest.mark.parametrize("overrides,match", [
    (["zero=zero2", "zero.offload_param=cpu"], "needs zero.stage=3"),
    (["stage=face", "stage.init=null"], "stage.init=auto"),
    (["stage=face", "data.face_crops=false"], "face crops"),
    (["launch.backend=nccl"], "needs launch.device=cuda"),
    (["train.resume=/nonexistent/ckpt"], "train.resume"),
    (["train.optimizer.lr=fast"], "bad train config"),
    (["+train.optimizer.lr_scale.pose=10"], "unknown parameter group 'pose'"),
    (["train.optimizer.lr_scale.pose_encoder=0"], "lr_scale.pose_encoder must be > 0"),
    (["train.sequence_parallel=0"], "train.sequence_parallel must be >= 1"),
    (["train.optimizer.cooldown=1.0"], r"train.optimizer.cooldown is a fraction of the stage in \[0, 1\)"),
    (["train.sequence_parallel=4"], r"sequence_parallel=4 must divide the attention heads \(model.dit.num_heads=2\)"),
])
def test_config_errors_name_the_key(overrides, match):
    with pytest.raises(TrainConfigError, match=match):
        _job(*overrides)


def test_local_rank_argument_of_the_deepspeed_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank_arg(["--local_rank=3", "stage=face"]) == ["stage=face"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_local_rank_arg(["a=1", "--local_rank", "3", "b=2"]) == ["a=1", "b=2"]


def test_warmup_then_constant():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=5e-6)
    sched = lr_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1.25e-6, 2.5e-6, 3.75e-6, 5e-6, 5e-6, 5e-6])


def _lrs(sched, opt, steps: int, progress: StageProgress | None = None, times=None) -> list[float]:
    lrs = []
    for i in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if times is not None:
            progress.time_fraction = times[i]
        sched.step()
    return lrs


def test_cooldown_falls_linearly_to_zero_over_the_stages_last_fraction():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    lrs = _lrs(lr_schedule(opt, 2, total_steps=10, cooldown=0.4), opt, 10)
    # warm-up 0.5, 1; stable to step 6 (60% done); then 1 - done over 0.4: 0.75, 0.5, 0.25 at steps 8-10
    assert lrs == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])


def test_cooldown_follows_the_time_limit_when_it_ends_the_stage_first():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    progress = StageProgress()
    sched = lr_schedule(opt, 1, total_steps=1_000_000, cooldown=0.5, progress=progress)
    lrs = _lrs(sched, opt, 5, progress, times=[0.2, 0.5, 0.75, 0.9, 1.0])
    assert lrs == pytest.approx([1, 1, 1, 0.5, 0.2])
    # the schedule is a closure: a checkpoint holds the step counter, not the time fraction or the stage length
    assert sched.state_dict()["lr_lambdas"] == [None] and sched.state_dict()["last_epoch"] == 5


def test_lr_scale_gives_a_group_its_own_learning_rate():
    job = _job("train.optimizer.lr=1e-4", "train.optimizer.lr_scale.pose_encoder=10")
    named = [("dit.blocks.0.attn.to_q.weight", torch.nn.Parameter(torch.zeros(8))),
             ("pose_encoder.conv_in.weight", torch.nn.Parameter(torch.zeros(3))),
             ("dit.pose_embed.weight", torch.nn.Parameter(torch.zeros(16))),
             ("dit.proj_out.weight", torch.nn.Parameter(torch.zeros(8)))]
    opt = build_optimizer(named, job)
    groups = [(round(g["lr"], 12), [p.numel() for p in g["params"]]) for g in opt.param_groups]
    # the pose encoder and the DiT's pose projection learn 10x faster; within a group the sizes that are a
    # multiple of 8 come first (the flat ZeRO buffer stays aligned)
    assert groups == [(1e-4, [8, 8]), (1e-3, [16, 3])]
    assert len(build_optimizer(named, _job()).param_groups) == 1  # no lr_scale: one group, as before


@pytest.mark.parametrize("args,needle", [
    (["--cfg", "job", "train.guard.max_consecutive_nonfinite=0"], "train.guard.max_consecutive_nonfinite must be >= 1"),
    (["train.optimizer.lrr=1"], "unknown config key 'train.optimizer.lrr'"),
    (["--cfg", "job", "train.optimizer.lr_scale.pose=3"], "unknown config key 'train.optimizer.lr_scale.pose'"),
])
def test_the_command_line_is_checked_before_anything_starts(args, needle):
    """A bad override or value is one line and exit 2, also when the config is only printed (--cfg job)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "train" / "run.py"), *args], capture_output=True, text=True,
                       timeout=120, cwd=root)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_printed_config_shows_no_credential():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "train" / "run.py"), "--cfg", "job",
                        "+data.source.storage_options.secret=hunter2", "+data.source.storage_options.key=AKIA123"],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "storage_options" in r.stdout and "hunter2" not in r.stdout and "AKIA123" not in r.stdout
    assert "<redacted>" in r.stdout and "warmup_steps:" in r.stdout  # the rest as composed
