"""The DeepSpeed engine: its config built from the Hydra groups (``zero``, ``launch``, ``train.optimizer``),
AdamW with a linear warm-up, and ``deepspeed.initialize`` around the staged model.

The optimizer is a torch AdamW passed to DeepSpeed (fused on CUDA) rather than a DeepSpeed-config
optimizer: same update, no JIT-compiled op; with ZeRO-Offload it is DeepSpeed's CPU Adam, the only fast
host-side Adam.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from models.partitioned import numel

from .config import TrainJob

log = logging.getLogger(__name__)

MAX_BUCKET = 500_000_000  # DeepSpeed's default bucket size (elements)


def _auto(value, default: int) -> int:
    """``auto`` -> ``default``; numbers (also 5e8 written in yaml) -> int."""
    return int(default) if value in (None, "auto") else int(float(value))


def _bucket(value, default: int) -> int:
    """A bucket size (elements), rounded up to a multiple of 1024: ZeRO asserts its NCCL start alignment."""
    return -(-_auto(value, default) // 1024) * 1024


def guard_clips(job: TrainJob) -> bool:
    """Whether the update guard clips the gradients (``train.guard.owns_clipping``) instead of DeepSpeed: ZeRO-2
    without optimizer offload, the layout whose gradient partitions the guard reaches (DeepSpeed's
    ``compute_grad_norm=false``)."""
    return (job.train.guard.owns_clipping and job.zero.stage == 2 and job.zero.offload_optimizer == "none"
            and job.train.optimizer.grad_clip > 0)


def deepspeed_config(job: TrainJob, num_trainable: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config of this job (what a hand-written ds_config.json would hold)."""
    z, la, opt = job.zero, job.launch, job.train.optimizer
    dim = job.model.dit.dim
    zero = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": _bucket(z.bucket_size, min(MAX_BUCKET, max(num_trainable, 1_000_000))),
        "allgather_bucket_size": _bucket(z.bucket_size, min(MAX_BUCKET, max(num_trainable, 1_000_000))),
    }
    if z.stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": _bucket(z.prefetch_bucket_size, max(int(0.9 * dim * dim), 1_000_000)),
            "stage3_param_persistence_threshold": _auto(z.param_persistence_threshold, 10 * dim),
            "stage3_max_live_parameters": int(z.max_live_parameters),
            "stage3_gather_16bit_weights_on_model_save": False,  # exports come from the fp32 checkpoint
        })
        del zero["allgather_bucket_size"]
    if guard_clips(job):  # the guard's one fused norm clips; DeepSpeed would take one norm per tensor again
        zero["compute_grad_norm"] = False
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": la.device == "cuda"}
    if z.offload_param != "none":
        zero["offload_param"] = {"device": z.offload_param, "pin_memory": la.device == "cuda"}
    cfg = {
        # The loader's batches are bucketed by a token budget, so their size varies; DeepSpeed only uses this
        # number for its own sample counters (the trainer counts samples itself).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": job.train.grad_accum,
        "gradient_clipping": 0.0 if guard_clips(job) else opt.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": la.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if z.communication_data_type:
        cfg["communication_data_type"] = z.communication_data_type
    return cfg


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], job: TrainJob) -> torch.optim.Optimizer:
    """AdamW over the stage's trainable parameters: one optimizer group per learning rate, the groups of
    ``train.optimizer.lr_scale`` (a model parameter group -> lr multiplier; e.g. a new branch on a pretrained
    backbone learns faster) apart from the rest."""
    from models.dreamactor import param_group_of

    opt = job.train.optimizer
    by_lr: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        by_lr.setdefault(opt.lr * opt.lr_scale.get(param_group_of(name), 1.0), []).append(p)
    groups = [{"params": aligned_order(ps), "lr": lr} for lr, ps in sorted(by_lr.items())]
    kw = dict(lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)
    if job.zero.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=job.launch.device == "cuda", **kw)


class StageProgress:
    """How far the stage has come, for the learning-rate schedule: the trainer sets ``time_fraction`` (the ranks'
    mean time since launch over ``train.time_limit_min``) after every step; the steps' fraction the schedule knows."""

    def __init__(self):
        self.time_fraction = 0.0


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int = 1, cooldown: float = 0.0,
                progress: StageProgress | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup to lr over ``warmup_steps`` optimizer steps, then constant (paper 4.1), then,
    with ``cooldown`` > 0, a linear fall to 0 over the stage's last ``cooldown`` fraction (warm-up, stable, decay).
    The stage's fraction done is the larger of its steps' (of ``total_steps``) and ``progress.time_fraction``, so a
    stage that its time limit ends also ends on a decayed rate. A closure, not a callable object: ``LambdaLR``
    checkpoints only the step counter then, and a resume with a new ``stage.steps`` follows the new length."""
    w = max(1, warmup_steps)
    total = max(1, total_steps)

    def factor(step: int) -> float:  # LambdaLR's step k sets the rate of optimizer step k + 1
        f = min(1.0, (step + 1) / w)
        if cooldown > 0:
            done = max(step / total, progress.time_fraction if progress is not None else 0.0)
            f *= min(1.0, max(0.0, (1.0 - done) / cooldown))
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def aligned_order(params: list[torch.nn.Parameter], multiple: int = 8) -> list[torch.nn.Parameter]:
    """Parameters whose size is a multiple of ``multiple`` first (stable), the odd-sized ones last.

    ZeRO-1/2 packs the trainable parameters back to back into one flat buffer and points every parameter at
    its slice: after one odd-sized tensor (a 3x3 conv to 1 channel in the face encoder, say) every later
    weight starts off a 16-byte boundary and cuBLAS falls back to slow pre-Hopper kernels (measured on an
    H100: the DiT's matmuls ran on sm75 CUTLASS kernels and the step took 2x as long)."""
    return sorted(params, key=lambda p: numel(p) % multiple != 0)


def construction(job: TrainJob):
    """The context the model is built in. Under ZeRO-3 it is ``deepspeed.zero.Init``: each module's parameters
    are partitioned over the ranks as soon as its ``__init__`` returns (rank 0's values, in the training
    precision, on the training device), so a rank never holds more than its shard of the model plus the
    module being built (wan14b would need 92 GiB of fp32 per rank otherwise; docs/scaling.md).
    ``torch.nn.functional.linear`` is left alone (``mem_efficient_linear=False``): DeepSpeed would replace it
    for the whole process."""
    if job.zero.stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=deepspeed_config(job, num_trainable=0),
                               mem_efficient_linear=False)


def initialize(model: torch.nn.Module, job: TrainJob, load_universal: bool = False,
               progress: StageProgress | None = None):
    """``deepspeed.initialize`` on ``model`` (its trainable set already chosen; under ZeRO-3 built in
    :func:`construction`): returns the engine. ``progress`` feeds the cool-down (:func:`lr_schedule`)."""
    import deepspeed
    from deepspeed.checkpoint import constants as ck

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = build_optimizer(named, job)
    opt = job.train.optimizer
    scheduler = lr_schedule(optimizer, opt.warmup_steps, job.stage.steps, opt.cooldown, progress)
    config = deepspeed_config(job, sum(numel(p) for p in params), load_universal)
    # ds_to_universal needs this marker in the model-states file to convert a ZeRO-1/2 checkpoint.
    setattr(model, ck.UNIVERSAL_CHECKPOINT_INFO,
            {ck.UNIVERSAL_CHECKPOINT_VERSION_KEY: ck.UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    align_buffer_dtypes(engine.module)
    return engine


@torch.no_grad()
def align_buffer_dtypes(module: torch.nn.Module) -> None:
    """Give every floating buffer its module's parameter dtype. DeepSpeed bf16 casts parameters only, and
    BatchNorm (the face motion encoder) refuses bf16 weights with fp32 running statistics in backward."""
    for m in module.modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        dtype = params[0].dtype
        for name, buf in list(m.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                m._buffers[name] = buf.to(dtype)


# GPU memory kept free of activations: allocator fragmentation, cuDNN/cuBLAS workspaces, the loss and the
# encoders' temporaries: max(6% of the card, 6 GiB).
RESERVE_FRACTION, RESERVE_MIN = 0.06, 6 * 2**30


def set_activation_budget(engine, job: TrainJob, dist) -> int | None:
    """``model.dit.activation_checkpointing=auto``: give the DiT the bytes its activations may use, so that it
    checkpoints the fewest blocks that fit each batch (``models.dit.checkpoint_plan``). Call after the engine and
    the EMA exist. What is not allocated yet is counted in: the Adam moments (allocated at the first step,
    8 bytes per trainable parameter on this rank's partition) and the full bf16/fp32 gradients of one backward
    before ZeRO reduces them. Returns the budget, or None (not auto, or not on a GPU: no checkpointing)."""
    dit = engine.module.dit
    if job.model.dit.activation_checkpointing != "auto" or dist.device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(dist.device).total_memory
    trainable = sum(numel(p) for p in engine.module.parameters() if p.requires_grad)
    grad_bytes = trainable * (2 if job.launch.precision == "bf16" else 4)
    state = getattr(engine.optimizer, "optimizer", engine.optimizer)
    pending = 0 if getattr(state, "state", None) else 8 * trainable // dist.world_size
    if job.zero.offload_optimizer != "none":
        pending = 0
    reserve = max(RESERVE_FRACTION * total, RESERVE_MIN)
    budget = int(total - reserve - torch.cuda.memory_allocated(dist.device) - pending - grad_bytes)
    dit.activation_budget_bytes = max(budget, 0)
    return dit.activation_budget_bytes
