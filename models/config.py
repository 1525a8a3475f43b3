"""Typed model configuration. The values live in ``conf/model/*.yaml`` (the only source of defaults);
these dataclasses give them types and check that nothing is missing or misspelt.

With Hydra: ``ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))``.
Without Hydra (e.g. a GPU box that has only PyYAML): ``load_preset("wan1_3b")``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .typed_config import build

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"
PRESETS = ("tiny", "small", "wan1_3b", "wan14b")


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the DiT backbone (Wan 2.1 names in brackets) and how it runs."""

    num_heads: int  # [num_attention_heads]
    head_dim: int  # [attention_head_dim]; dim = num_heads * head_dim
    ffn_dim: int
    num_layers: int
    latent_channels: int  # VAE latent channels of the noisy / reference latents [out_channels]
    cond_channels: int  # Wan I2V conditioning channels after the latent: 4 mask + 16 latent (0 = none)
    patch_size: tuple[int, int, int]  # (t, h, w)
    text_dim: int  # width of the fixed text context (umT5-XXL: 4096)
    text_len: int  # tokens of the fixed text context (Wan pads prompts to 512)
    image_dim: int | None  # CLIP image-context width of I2V checkpoints (1280), None for T2V
    image_len: int  # tokens of the fixed image context (CLIP ViT-H: 257); unused when image_dim is None
    freq_dim: int  # sinusoidal timestep features
    eps: float
    rope_theta: float
    timestep_scale: float  # sigma in [0, 1] -> Wan timestep in [0, 1000]
    attention_backends: tuple[str, ...]  # SDPA backends in priority order; () = PyTorch's choice
    # blocks (from the first) run under activation checkpointing: 0 off, -1 all, auto: the fewest that fit the
    # GPU memory for each batch's token count (models.dit.checkpoint_plan; no checkpointing where it fits)
    activation_checkpointing: int | str
    # what a checkpointed block keeps: selective = its inputs and its attention outputs (the attention kernels are
    # not re-run in backward, everything else is), full = its inputs only (auto mixes both when selective does
    # not fit)
    checkpoint_policy: str = "selective"

    @property
    def dim(self) -> int:
        """Token width."""
        return self.num_heads * self.head_dim

    def __post_init__(self):
        ac = self.activation_checkpointing
        if isinstance(ac, bool) or not (ac == "auto" or (isinstance(ac, int) and ac >= -1)):
            raise ValueError(f"model.dit.activation_checkpointing must be auto, -1 (every block), 0 (none) or a "
                             f"number of blocks, got {ac!r}")
        if self.checkpoint_policy not in ("selective", "full"):
            raise ValueError(f"model.dit.checkpoint_policy must be selective or full, got {self.checkpoint_policy!r}")


@dataclass(frozen=True)
class PoseEncoderConfig:
    """[skeleton ; head sphere] maps -> features on the latent grid (paper 3.2, E_p)."""

    in_channels: int  # 3 skeleton + 3 sphere
    channels: tuple[int, ...]  # per-frame conv widths: full res, then one stride-2 stage per entry after it
    out_channels: int  # features per latent cell, concatenated with the noisy latent


@dataclass(frozen=True)
class FaceEncoderConfig:
    """PD-FGC-style face motion encoder + MLP -> face motion tokens (paper 3.2, E_f)."""

    width: float  # channel multiplier of the FAN backbone; 1.0 = PD-FGC (required to load its weights)
    crop_size: int  # face crops are crop_size x crop_size RGB in [-1, 1]
    mlp_hidden: int  # hidden width of the motion-vector -> token MLP


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Speech -> face motion tokens (paper 3.2, the audio-driven encoder; models/audio_encoder.py)."""

    # mel: a log-mel spectrogram (computed in torch) + two 1-D convolutions, trained from scratch | pretrained:
    # the hidden states of a wav2vec 2.0 / HuBERT model (weights.audio_backbone_dir, transformers), kept frozen
    frontend: str
    n_fft: int  # mel: samples per STFT window (400 = 25 ms at 16 kHz)
    hop: int  # mel: samples between spectrogram frames (160 = 10 ms); features run at 16 kHz / (2 hop) = 50 Hz
    n_mels: int
    width: int  # Conformer channels
    num_layers: int
    num_heads: int
    ffn_mult: int  # feed-forward width = ffn_mult * width
    conv_kernel: int  # depthwise convolution taps (odd), at the 50 Hz feature rate
    context_s: float  # self-attention reaches +-context_s seconds (no absolute positions: any length works)

    def __post_init__(self):
        if self.frontend not in ("mel", "pretrained"):
            raise ValueError(f"model.audio_encoder.frontend must be mel or pretrained, got {self.frontend!r}")
        if self.width % self.num_heads:
            raise ValueError(f"model.audio_encoder.width={self.width} must be a multiple of num_heads={self.num_heads}")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"model.audio_encoder.conv_kernel must be odd, got {self.conv_kernel}")


@dataclass(frozen=True)
class VAEConfig:
    """The 3D causal video VAE: ``kind=wan``, the pretrained Wan 2.1 VAE (diffusers AutoencoderKLWan), or a random
    init of its architecture (``arch``, tests); ``kind=patch``, the fixed linear autoencoder of the same layout
    (``models.vae.PatchAutoencoder``) for runs that have no pretrained weights and must still see every frame."""

    latent_channels: int
    temporal_compression: int
    spatial_compression: int
    arch: dict[str, Any] | None  # AutoencoderKLWan kwargs for a random init (tests only); None = pretrained
    dtype: str  # float32 | bfloat16
    tiling: bool  # spatial tiling for large frames (diffusers' enable_tiling)
    encode_batch_pixels: int = 1 << 20  # samples x height x width per encode call (memory ~ this, not frames)
    kind: str = "wan"  # wan | patch

    def __post_init__(self):
        if self.kind not in ("wan", "patch"):
            raise ValueError(f"model.vae.kind={self.kind!r}: expected wan (the Wan 2.1 VAE) or patch (the fixed "
                             "linear autoencoder, models.vae.PatchAutoencoder)")


@dataclass(frozen=True)
class FlowConfig:
    """Flow matching: training timesteps and the sampler (paper 3.1, 4.1)."""

    logit_mean: float  # logit-normal timestep sampling
    logit_std: float
    shift: float  # timestep shift at shift_ref_tokens video tokens; scales with sqrt(tokens / ref)
    shift_ref_tokens: int
    sample_steps: int
    guidance_ref: float  # CFG scale of the reference condition
    guidance_motion: float  # CFG scale of the motion condition (pose + face)
    segment_frames: int  # frames per generated segment for long videos (4k + 1)


@dataclass(frozen=True)
class RenderConfig:
    """How control signals are drawn; sizes are fractions of the shorter image side."""

    limb_width: float
    joint_radius: float
    hand_limb_width: float
    hand_joint_radius: float
    min_confidence: float  # joints with confidence <= this are not drawn
    draw_hands: bool


@dataclass(frozen=True)
class WeightsConfig:
    """Local paths of pretrained weights; None = random init (refused when ``required``)."""

    required: bool  # real presets: building with load_weights=True needs every path below except contexts
    wan_transformer_dir: str | None  # diffusers WanTransformer3DModel dir (config.json + *.safetensors)
    vae_dir: str | None  # diffusers AutoencoderKLWan dir
    pdfgc_path: str | None  # PD-FGC motion encoder state dict (motion_model.pth)
    text_context_path: str | None  # optional (text_len, text_dim) tensor: the fixed text context
    image_context_path: str | None  # optional (image_len, image_dim) tensor: the fixed image context
    audio_backbone_dir: str | None  # audio_encoder.frontend=pretrained: a transformers wav2vec 2.0 / HuBERT dir
    ref_attn_init: str  # "self_attn": Ref Attn q/k/v start as copies of the block's self-attention; "random"


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model side needs; one ``conf/model/<preset>.yaml`` per preset."""

    name: str
    dit: DiTConfig
    pose_encoder: PoseEncoderConfig
    face_encoder: FaceEncoderConfig
    audio_encoder: AudioEncoderConfig
    vae: VAEConfig
    flow: FlowConfig
    render: RenderConfig
    weights: WeightsConfig

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a plain dict (yaml / OmegaConf container); unknown or missing keys raise
        :class:`~models.typed_config.ConfigError` naming them."""
        return build(cls, data, "model")

    @classmethod
    def from_run_config(cls, data: dict) -> ModelConfig:
        """Like :meth:`from_dict`, for the ``model`` section of a run's saved config.yaml (an export's): a run
        written before the audio encoder existed gets its preset's ``audio_encoder`` section and no audio
        backbone, the values it would have had (its weights have no audio encoder either)."""
        data = dict(data)
        if "audio_encoder" not in data:
            preset = data["name"] if data.get("name") in PRESETS else "tiny"
            data["audio_encoder"] = preset_data(preset)["audio_encoder"]
        if isinstance(data.get("weights"), dict):
            data["weights"] = {"audio_backbone_dir": None, **data["weights"]}
        return cls.from_dict(data)

    def replace(self, **sections) -> ModelConfig:
        """Copy with some fields of some sections replaced: ``cfg.replace(dit={"num_layers": 2})``."""
        changes = {}
        for name, fields in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **fields) if dataclasses.is_dataclass(current) else fields
        return dataclasses.replace(self, **changes)


def preset_data(name: str) -> dict:
    """The plain data of ``conf/model/<name>.yaml`` (or a yaml path) with its ``defaults`` applied."""
    path = Path(name) if name.endswith(".yaml") else CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"model preset {name!r} not found at {path}; presets: {', '.join(PRESETS)}")
    return _with_defaults(yaml_load(path), path.parent)


def load_preset(name: str, overrides: dict | None = None) -> ModelConfig:
    """Read ``conf/model/<name>.yaml`` (or a yaml path) with PyYAML, apply nested ``overrides``."""
    data = preset_data(name)
    if overrides:
        data = _merge(data, overrides)
    return ModelConfig.from_dict(data)


def _with_defaults(data: dict, group_dir: Path) -> dict:
    """Apply a preset's Hydra ``defaults`` list as Hydra does for a config of this group: each entry
    (``base/wan@_here_``) is another file of the group merged first, then the preset itself (``_self_``)."""
    out: dict = {}
    entries = data.pop("defaults", None) or ["_self_"]
    if "_self_" not in entries:
        entries = [*entries, "_self_"]
    for entry in entries:
        if entry == "_self_":
            out = _merge(out, data)
            continue
        name = str(entry).split("@", 1)[0]
        base = yaml_load(group_dir / f"{name}.yaml")
        out = _merge(out, _with_defaults(base, group_dir))
    return out


def yaml_load(path: Path) -> dict:
    """One yaml file as plain data (PyYAML)."""
    import yaml

    return yaml.safe_load(path.read_text())


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
