"""The progressive training stages (paper 3.4) on top of the model's parameter groups
(``models.dreamactor.STAGE_GROUPS``): what a stage starts from and what it may change.

- Stage 1 (``stage=pose``) starts from the preset's pretrained weights (``model.weights.*``; random for
  the tiny preset) and trains the DiT and the pose encoder, without face motion tokens.
- Stage 2 (``stage=face``) starts from stage 1's final weights and trains **only** the face motion
  encoder and the Face Attn layers.
- Stage 3 (``stage=full``) starts from stage 2's final weights and trains everything.
- Stage 4 (``stage=audio``, paper 3.2's audio-driven encoder) starts from stage 3's final weights, adds the audio
  encoder (fresh, or from the init file when it has one) and trains only it, the face motion encoder as the
  teacher (train/audio_step.py). Models of stages 1-3 have no audio encoder; their weights files neither.

A stage starts from the *module weights* of the previous stage's final checkpoint (its export) and a
fresh optimizer, warm-up and EMA.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from models.dreamactor import AUDIO_STAGE, STAGE_GROUPS, DreamActor
from models.partitioned import gathered, load_safetensors, numel, shape

from .config import TrainJob
from .distributed import seed_everything
from .engine import construction

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
    """The model of this stage with its trainable set chosen, identical on every rank: on the CPU in fp32, or
    under ZeRO-3 already partitioned over the ranks (each rank allocates its shard and one module at a time;
    see :func:`train.engine.construction`). Starting weights are streamed in, one tensor at a time."""
    path = init_weights_path(job)
    seed_everything(job.train.seed)
    audio = job.stage.id == AUDIO_STAGE
    with construction(job):
        model = DreamActor(job.model, audio=audio)
    if job.stage.id == 1:
        model.load_pretrained()
    if path is not None:
        # a stage-4 export has an audio encoder that the paper's stages do not; stage 4 adds one to theirs
        fresh = load_safetensors(model, path, optional=("audio_encoder.",))
        log.info("stage %d starts from %s%s", job.stage.id, path, " (a new audio encoder)" if audio and fresh else "")
        if audio and fresh:
            model.audio_encoder.load_pretrained()  # the pretrained speech backbone, if the front end has one
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
            with gathered([p]):  # ZeRO-3 partitions: one parameter whole at a time (collective)
                flat = p.detach().reshape(-1).to(torch.float32).cpu()
            stride = max(1, flat.numel() // 1_000_000)  # a strided sample bounds the cost on 14B models
            h.update(f"{name}:{shape(p)}".encode())
            h.update(flat[::stride].contiguous().numpy().tobytes())
    return h.hexdigest()


def describe(model: DreamActor, stage: int) -> str:
    """One line: trainable / frozen parameter counts by group."""
    groups = model.named_param_groups()
    train = set(STAGE_GROUPS[stage])
    parts = [f"{g} {sum(numel(p) for _, p in groups[g]):,} ({'train' if g in train else 'frozen'})" for g in groups]
    return f"stage {stage}: " + ", ".join(parts)
