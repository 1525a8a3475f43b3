"""The progressive training stages (paper 3.4) on top of the model's parameter groups
(``models.dreamactor.STAGE_GROUPS``): what a stage starts from and what it may change.

- Stage 1 (``stage=pose``) starts from the preset's pretrained weights (``model.weights.*``; random for
  the tiny preset) and trains the DiT and the pose encoder, without face motion tokens.
- Stage 2 (``stage=face``) starts from stage 1's final weights and trains **only** the face motion
  encoder and the Face Attn layers.
- Stage 3 (``stage=full``) starts from stage 2's final weights and trains everything.

A stage starts from the *module weights* of the previous stage's final checkpoint (its export) and a
fresh optimizer, warm-up and EMA.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from models.dreamactor import STAGE_GROUPS, DreamActor

from .config import TrainJob
from .distributed import seed_everything

log = logging.getLogger(__name__)


def init_weights_path(job: TrainJob) -> Path | None:
    """Where this stage's starting weights come from (None: the preset's own pretrained weights)."""
    init = job.stage.init
    if init is None:
        return None
    if init == "auto":
        path = job.stage_dir_of(job.stage.id - 1) / "export" / "model.safetensors"
        hint = (f"run stage {job.stage.id - 1} to its end first (it exports {path}), or export a checkpoint with "
                "`python -m train.export <checkpoint dir> --out <dir>` and pass stage.init=<dir>/model.safetensors")
    else:
        path = Path(init).expanduser()
        hint = "stage.init must name a model.safetensors written by train/export.py"
    if not path.is_file():
        raise FileNotFoundError(f"stage {job.stage.id} ({job.stage.name}) starts from {path}, "
                                f"which does not exist: {hint}")
    return path


def build_model(job: TrainJob) -> DreamActor:
    """The model of this stage on the CPU in fp32, identical on every rank, with its trainable set chosen."""
    seed_everything(job.train.seed)
    model = DreamActor.from_config(job.model, load_weights=job.stage.id == 1)
    path = init_weights_path(job)
    if path is not None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
        log.info("stage %d starts from %s", job.stage.id, path)
    model.set_stage(job.stage.id)
    return model


def trainable_names(model: DreamActor) -> list[str]:
    """Names of the parameters this stage trains."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_signature(model: DreamActor) -> str:
    """A fingerprint of the frozen parameters (built before DeepSpeed wraps the model).

    Frozen parameters are never written by training, and a universal checkpoint does not carry them: a
    resume rebuilds them from this stage's init and compares this fingerprint with the checkpoint's.
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            flat = p.detach().reshape(-1).to(torch.float32).cpu()
            stride = max(1, flat.numel() // 1_000_000)  # a strided sample bounds the cost on 14B models
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(flat[::stride].contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(model: DreamActor, stage: int) -> str:
    """One line: trainable / frozen parameter counts by group."""
    groups = model.named_param_groups()
    train = set(STAGE_GROUPS[stage])
    parts = [f"{g} {sum(p.numel() for _, p in groups[g]):,} ({'train' if g in train else 'frozen'})" for g in groups]
    return f"stage {stage}: " + ", ".join(parts)
