"""Typed configuration of the trainer. The values live in ``conf/train.yaml`` and its groups ``conf/stage``,
``conf/zero``, ``conf/launch`` (plus ``conf/model`` and ``conf/data``, typed by their own modules); Hydra is
the only source of defaults, these dataclasses give the values types and reject what cannot work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from models.config import ModelConfig
from models.typed_config import Choice, ConfigError, from_node
from models.typed_config import resolved as resolved_node

TrainConfigError = ConfigError  # the one configuration error (models.typed_config); the old name stays


# string choices (models.typed_config.Choice): checked when the config is built, kept as plain strings
Offload = Choice("Offload", {"NONE": "none", "CPU": "cpu"})
Device = Choice("Device", {"CPU": "cpu", "CUDA": "cuda"})
Backend = Choice("Backend", {"GLOO": "gloo", "NCCL": "nccl"})
Precision = Choice("Precision", {"FP32": "fp32", "BF16": "bf16"})


@dataclass
class OptimizerConfig:
    """AdamW with a linear warm-up to ``lr``, a constant rate after it (paper 4.1: 5e-6) and an optional linear
    cool-down to 0 over the stage's last ``cooldown`` fraction (of its steps, or of its time limit)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float  # global L2 norm; 0 disables
    cooldown: float = 0.0  # last fraction of the stage (steps or train.time_limit_min) with lr falling to 0
    lr_scale: dict[str, float] = field(default_factory=dict)  # parameter group -> lr multiplier


@dataclass
class EMAConfig:
    decay: float


@dataclass
class CheckpointConfig:
    every: int
    keep: int
    export: bool
    verify: str  # size | sha256: how a checkpoint is checked against its COMPLETE before a resume or an export
    key_file: str | None  # the key that signs COMPLETE; null: $DREAMACTOR_CHECKPOINT_KEY, else the default file
    trust_unsigned: bool  # resume / export checkpoints this key did not sign (DeepSpeed's files are pickles)


@dataclass
class LogConfig:
    every: int
    tensorboard: bool
    progress_bar: bool
    sample_keys: bool


@dataclass
class SampleConfig:
    every: int
    frames: int
    steps: int


@dataclass
class EvalConfig:
    """``train.eval``: held-out scores during training (train/periodic_eval.py)."""

    every: int  # steps between evaluations (0: never)
    clips: int  # the fixed evaluation set
    steps: int  # Euler steps of the sampler


@dataclass
class GuardConfig:
    """``train.guard``: non-finite gradients are counted, logged and stop the run (train/guard.py)."""

    max_consecutive_nonfinite: int
    poison_steps: list[int]  # fault injection: these steps' gradients of poison_group become NaN
    poison_group: str
    owns_overflow_check: bool = True  # the guard's global norm replaces DeepSpeed's per-tensor check (ZeRO-1/2)
    owns_clipping: bool = True  # ZeRO-2: the guard clips with its norm; DeepSpeed computes none (train/guard.py)


@dataclass
class TrainSection:
    """``train.*``: the loop, the optimizer, checkpoints and logs."""

    out_dir: str
    seed: int
    resume: str  # auto | none | a checkpoint directory
    grad_accum: int
    time_limit_min: float | None  # stop the stage (checkpoint + export) after this many minutes; null: no limit
    compile_blocks: Any  # auto (on for CUDA + ZeRO-2 without SP) | true | false; a bool after to_job
    compile_encoders: Any  # auto (as compile_blocks) | true | false; a bool after to_job
    continuation_prob: float  # share of samples given their first latent frame as the I2V condition
    optimizer: OptimizerConfig
    ema: EMAConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    sample: SampleConfig
    guard: GuardConfig
    eval: EvalConfig
    # ranks per sequence-parallel group (models/sequence_parallel.py): they share each batch, 1/N of its video
    # tokens each; the data-parallel ranks are world / N; data.buckets.token_budget is per group
    sequence_parallel: int = 1


@dataclass
class StageConfig:
    """``stage``: one of the three progressive stages (paper 3.4), or stage 4, the audio encoder."""

    id: int
    name: str
    steps: int
    use_face: bool
    use_audio: bool  # the loader delivers the clips' audio (stage 4: speech -> face motion tokens)
    init: str | None  # None: the preset's pretrained weights; auto: the previous stage's export; or a path


@dataclass
class ZeroConfig:
    """``zero``: the DeepSpeed ZeRO stage and its knobs (see conf/zero/zero2.yaml)."""

    stage: int
    offload_optimizer: Offload
    offload_param: Offload
    overlap_comm: bool
    contiguous_gradients: bool
    bucket_size: Any  # int or "auto"
    prefetch_bucket_size: Any
    param_persistence_threshold: Any
    max_live_parameters: int
    communication_data_type: str | None


@dataclass
class LaunchConfig:
    """``launch``: where the processes run (see conf/launch/*.yaml)."""

    device: Device
    backend: Backend
    precision: Precision
    deterministic: bool
    timeout_min: float
    peak_tflops: Any  # None, "auto" or a number
    threads_per_rank: int
    torch_extensions_dir: str | None


@dataclass
class TrainJob:
    """Everything ``train/run.py`` runs on; ``resolved`` is the whole composed config (saved in checkpoints)."""

    train: TrainSection
    stage: StageConfig
    zero: ZeroConfig
    launch: LaunchConfig
    model: ModelConfig
    data: Any  # train.data.DataConfig
    resolved: dict

    @property
    def stage_dir(self) -> Path:
        """Everything of this stage: checkpoints/, export/, tb/, samples/, metrics.jsonl."""
        return Path(self.train.out_dir).expanduser() / f"stage{self.stage.id}"

    def stage_dir_of(self, stage_id: int) -> Path:
        """The directory of another stage of the same run."""
        return Path(self.train.out_dir).expanduser() / f"stage{stage_id}"


def _typed(cls, node: dict, key: str):
    """``node`` (a resolved plain dict) typed as the dataclass ``cls`` (models.typed_config), errors named
    by section."""
    try:
        return from_node(cls, node, key)
    except ConfigError as e:
        raise ConfigError(f"bad {key} config: {e}") from None


def to_job(cfg: DictConfig) -> TrainJob:
    """The composed Hydra config as a checked :class:`TrainJob`."""
    from train.data import to_config as data_config

    resolved = resolved_node(cfg)
    job = TrainJob(
        train=_typed(TrainSection, resolved["train"], "train"),
        stage=_typed(StageConfig, resolved["stage"], "stage"),
        zero=_typed(ZeroConfig, resolved["zero"], "zero"),
        launch=_typed(LaunchConfig, resolved["launch"], "launch"),
        model=_typed(ModelConfig, resolved["model"], "model"),
        data=data_config(resolved["data"]),
        resolved=resolved,
    )
    if job.train.compile_blocks == "auto":
        from models.dreamactor import AUDIO_STAGE

        job.train.compile_blocks = (job.launch.device == "cuda" and job.zero.stage == 2
                                    and job.train.sequence_parallel == 1 and job.stage.id != AUDIO_STAGE)
    if job.train.compile_encoders == "auto":
        job.train.compile_encoders = job.train.compile_blocks if isinstance(job.train.compile_blocks, bool) else False
    check(job)
    return job


def check_sequence_parallel(job: TrainJob, world_size: int | None = None) -> None:
    """``train.sequence_parallel`` must divide the attention heads and, once known, the number of ranks (a clip's
    video tokens need not divide: shards differ by at most one token)."""
    n = job.train.sequence_parallel
    if n < 1:
        raise ConfigError(f"train.sequence_parallel must be >= 1, got {n}")
    if n == 1:
        return
    if job.model.dit.num_heads % n:
        raise ConfigError(f"train.sequence_parallel={n} must divide the attention heads (model.dit.num_heads="
                          f"{job.model.dit.num_heads})")
    if world_size is not None and world_size % n:
        raise ConfigError(f"train.sequence_parallel={n} must divide the number of ranks ({world_size})")


def check(job: TrainJob) -> None:
    """Reject values that cannot work, naming the key."""
    from models.dreamactor import AUDIO_STAGE, PARAM_GROUPS, STAGE_GROUPS

    t, s, z, la = job.train, job.stage, job.zero, job.launch
    if s.id not in STAGE_GROUPS:
        raise ConfigError(f"stage.id must be one of {sorted(STAGE_GROUPS)}, got {s.id}")
    if s.id == 1 and s.use_face:
        raise ConfigError("stage 1 (pose) trains without face motion tokens: stage.use_face must be false")
    if s.use_audio != (s.id == AUDIO_STAGE):
        raise ConfigError(f"stage.use_audio={s.use_audio}: the audio is loaded exactly in stage {AUDIO_STAGE} (audio), "
                          "which trains the audio encoder on it")
    if s.id == AUDIO_STAGE and not s.use_face:
        raise ConfigError(f"stage {AUDIO_STAGE} (audio) learns the face motion encoder's tokens of the clips' face "
                          "crops: stage.use_face must be true")
    if s.id == AUDIO_STAGE and t.sequence_parallel != 1:
        raise ConfigError(f"stage {AUDIO_STAGE} (audio) runs no DiT: train.sequence_parallel must be 1")
    if s.id > 1 and s.init is None:
        raise ConfigError(f"stage {s.id} continues from stage {s.id - 1}: set stage.init=auto or a weights path")
    if s.steps < 1:
        raise ConfigError(f"stage.steps must be >= 1, got {s.steps}")
    if z.stage not in (2, 3):
        raise ConfigError(f"zero.stage must be 2 or 3, got {z.stage}")
    if z.offload_param != "none" and z.stage != 3:
        raise ConfigError("zero.offload_param needs zero.stage=3")
    if la.backend == "nccl" and la.device != "cuda":
        raise ConfigError("launch.backend=nccl needs launch.device=cuda")
    for key in ("compile_blocks", "compile_encoders"):
        if not isinstance(getattr(t, key), bool):
            raise ConfigError(f"train.{key} must be auto, true or false, got {getattr(t, key)!r}")
    if t.guard.max_consecutive_nonfinite < 1:
        raise ConfigError("train.guard.max_consecutive_nonfinite must be >= 1")

    if not 0.0 <= t.optimizer.cooldown < 1.0:
        raise ConfigError(f"train.optimizer.cooldown is a fraction of the stage in [0, 1), got {t.optimizer.cooldown}")
    for group, scale in t.optimizer.lr_scale.items():
        if group not in PARAM_GROUPS:
            raise ConfigError(f"train.optimizer.lr_scale: unknown parameter group {group!r}; "
                              f"the groups are {list(PARAM_GROUPS)}")
        if not scale > 0:
            raise ConfigError(f"train.optimizer.lr_scale.{group} must be > 0, got {scale}")
    if t.guard.poison_group not in PARAM_GROUPS:
        raise ConfigError(f"train.guard.poison_group must be one of {list(PARAM_GROUPS)}, got {t.guard.poison_group!r}")
    for key in ("compile_blocks", "compile_encoders"):
        if getattr(t, key) and z.stage != 2:
            raise ConfigError(f"train.{key} needs zero.stage=2 (ZeRO-3 fetches parameters in module hooks)")
    check_sequence_parallel(job)
    if t.grad_accum < 1:
        raise ConfigError("train.grad_accum must be >= 1")
    if t.checkpoint.every < 1 or t.checkpoint.keep < 1:
        raise ConfigError("train.checkpoint.every and train.checkpoint.keep must be >= 1")
    if t.checkpoint.verify not in ("size", "sha256"):
        raise ConfigError(f"train.checkpoint.verify={t.checkpoint.verify!r}: use size or sha256")
    if t.log.every < 1:
        raise ConfigError("train.log.every must be >= 1")
    if not 0.0 <= t.continuation_prob <= 1.0:
        raise ConfigError(f"train.continuation_prob must be in [0, 1], got {t.continuation_prob}")
    if not 0.0 <= t.ema.decay < 1.0:
        raise ConfigError(f"train.ema.decay must be in [0, 1), got {t.ema.decay}")
    tc = job.model.vae.temporal_compression
    if t.eval.every < 0 or t.eval.clips < 1 or t.eval.steps < 1:
        raise ConfigError(f"train.eval: every >= 0, clips >= 1 and steps >= 1, got {t.eval.every}/{t.eval.clips}/"
                          f"{t.eval.steps}")
    if t.sample.every and (t.sample.frames - 1) % tc:
        raise ConfigError(f"train.sample.frames must be 1 + k*{tc}, got {t.sample.frames}")
    if t.resume not in ("auto", "none") and not Path(t.resume).expanduser().is_dir():
        raise ConfigError(f"train.resume={t.resume!r}: expected auto, none or an existing checkpoint directory")
    if s.use_face != job.data.face_crops:
        raise ConfigError(f"stage.use_face={s.use_face} but data.face_crops={job.data.face_crops}: "
                               "the loader must decode face crops exactly when the stage uses face motion tokens")
