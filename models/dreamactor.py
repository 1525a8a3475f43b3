"""The DreamActor-M1 model (paper Fig. 2): pose encoder + face motion encoder + DiT, with the named
parameter groups of the progressive training stages (paper 3.4), and the audio encoder (paper 3.2: speech ->
face motion tokens) in models that train or use it (``audio=True``: stage 4 and its exports).

Inputs of :meth:`DreamActor.forward` (B = batch; t = 1 + k latent frames):

- ``noisy_latents`` (B, 16, t, h, w) normalised VAE latents at noise level ``timesteps`` (B,) = sigma in [0, 1]
- ``cond``: :class:`models.conditions.Conditions` (references, pose maps, face crops, continuation latents)
- ``drop_ref`` / ``drop_motion`` (B,) bool: classifier-free-guidance dropout per sample. A dropped reference
  is a zero latent; dropped motion removes the pose-feature and Face Attn contributions of that sample.
- ``use_face``: False in stage 1 (no face motion tokens, Face Attn skipped)

Output: the predicted velocity (B, 16, t, h, w) (see :mod:`models.flow`). Face motion tokens come from
``cond.face_tokens`` when given (per frame, e.g. from the audio encoder), else from ``cond.face_crops``.

``forward(speech=SpeechClip(...))`` is the audio stage's pass instead (no DiT): :meth:`DreamActor.audio_tokens`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .audio_encoder import AudioEncoder, AudioTokens, SpeechClip
from .conditions import Conditions
from .config import ModelConfig
from .dit import DiT
from .face_encoder import FaceMotionEncoder, load_pdfgc_weights
from .flops import flops_per_step
from .partitioned import numel
from .pose_encoder import PoseEncoder

log = logging.getLogger(__name__)

PAPER_GROUPS = ("dit", "pose_encoder", "face_encoder", "face_attn")
# the audio encoder's own layers, and the frozen pretrained speech model of audio_encoder.frontend=pretrained
PARAM_GROUPS = (*PAPER_GROUPS, "audio_encoder", "audio_backbone")
AUDIO_STAGE = 4
STAGE_GROUPS = {
    1: ("dit", "pose_encoder"),  # skeleton + head sphere only, no face tokens
    2: ("face_encoder", "face_attn"),  # only the face motion encoder and Face Attn layers
    3: PAPER_GROUPS,  # everything of the paper's model
    AUDIO_STAGE: ("audio_encoder",),  # speech -> face motion tokens, the face motion encoder as the teacher
}


def param_group_of(name: str) -> str:
    """Which training group a parameter (by its name in :class:`DreamActor`) belongs to."""
    if name.startswith("audio_encoder.frontend.backbone."):
        return "audio_backbone"
    if name.startswith("audio_encoder."):
        return "audio_encoder"
    if name.startswith(("pose_encoder.", "dit.pose_embed.")):
        return "pose_encoder"
    if name.startswith("face_encoder."):
        return "face_encoder"
    if ".face_attn." in name or ".norm_face." in name:
        return "face_attn"
    return "dit"


def _allow_shape_recompiles() -> None:
    """Static shapes, one graph per bucket shape: the loader's batches change clip length, batch size and reference
    count, and Inductor's dynamic-shape tiling asserted on such a recompile (PyTorch 2.11, H200)."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


class DreamActor(nn.Module):
    """Pose encoder + face motion encoder + DiT (+ the audio encoder with ``audio``); see the module docstring."""

    def __init__(self, cfg: ModelConfig, audio: bool = False):
        super().__init__()
        self.cfg = cfg
        tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
        self.pose_encoder = PoseEncoder(cfg.pose_encoder, tc, sc)
        self.face_encoder = FaceMotionEncoder(cfg.face_encoder, cfg.dit.dim, tc)
        self.dit = DiT(cfg.dit, cfg.pose_encoder.out_channels, cfg.pose_encoder.channels[0])
        self.dit.pixels_per_latent_cell = tc * sc * sc
        # an extension module, absent from the paper's stages (their checkpoints and exports do not change)
        self.audio_encoder = (AudioEncoder(cfg.audio_encoder, cfg.dit.dim, cfg.weights.audio_backbone_dir)
                              if audio else None)

    @classmethod
    def from_config(cls, cfg: ModelConfig, load_weights: bool = True, audio: bool = False) -> DreamActor:
        """Build the model; with ``load_weights`` load every configured pretrained part (see ``load_pretrained``)."""
        model = cls(cfg, audio)
        if load_weights:
            model.load_pretrained()
        return model

    def load_pretrained(self) -> dict:
        """Load the Wan transformer, PD-FGC and fixed contexts from ``cfg.weights``; returns what was loaded.

        A configured path that does not exist raises an error naming it. With ``weights.required`` a path
        left unset raises too (real presets must not train from random weights by accident).
        """
        from .wan_convert import load_context, load_wan_transformer

        w = self.cfg.weights
        if w.required:
            unset = [k for k in ("wan_transformer_dir", "vae_dir", "pdfgc_path") if getattr(w, k) is None]
            if unset:
                raise FileNotFoundError(
                    f"model.weights.{', model.weights.'.join(unset)} not set for preset {self.cfg.name!r}: pass e.g. "
                    "model.weights.wan_transformer_dir=/ckpt/Wan2.1-T2V-1.3B-Diffusers/transformer "
                    "model.weights.vae_dir=/ckpt/Wan2.1-T2V-1.3B-Diffusers/vae "
                    "model.weights.pdfgc_path=/ckpt/pdfgc/motion_model.pth (docs/models.md lists the downloads)")
        report = {}
        if w.wan_transformer_dir is not None:
            report["wan"] = load_wan_transformer(self.dit, w.wan_transformer_dir, w.ref_attn_init)
        if w.pdfgc_path is not None:
            load_pdfgc_weights(self.face_encoder, w.pdfgc_path)
            report["pdfgc"] = w.pdfgc_path
        if w.text_context_path is not None:
            load_context(self.dit.text_context, w.text_context_path, "text context")
        if w.image_context_path is not None:
            if self.cfg.dit.image_dim is None:
                raise ValueError("weights.image_context_path is set but dit.image_dim is null")
            load_context(self.dit.image_context, w.image_context_path, "image context")
        if self.audio_encoder is not None and self.cfg.audio_encoder.frontend == "pretrained":
            self.audio_encoder.load_pretrained()
            report["audio_backbone"] = w.audio_backbone_dir
        return report

    # ------------------------------------------------------------------ forward

    def forward(self, noisy_latents: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                cond: Conditions | None = None, *, drop_ref: torch.Tensor | None = None,
                drop_motion: torch.Tensor | None = None, use_face: bool = True,
                speech: SpeechClip | None = None) -> torch.Tensor | AudioTokens:
        """Predicted flow velocity (B, C, t, h, w); with ``speech`` alone, :meth:`audio_tokens` (the audio stage
        runs through here so that DeepSpeed's engine sees a forward)."""
        if speech is not None:
            return self.audio_tokens(speech)
        ref_latents, pose_maps, face_crops = cond.ref_latents, cond.pose_maps, cond.face_crops
        b, _, t, h, w = noisy_latents.shape
        tc, sc = self.cfg.vae.temporal_compression, self.cfg.vae.spatial_compression
        want = (1 + (t - 1) * tc, h * sc, w * sc)
        if tuple(pose_maps.shape[2:]) != want:
            raise ValueError(f"pose_maps {tuple(pose_maps.shape)} do not match latents {tuple(noisy_latents.shape)}: "
                             f"expected (B, C, {want[0]}, {want[1]}, {want[2]})")
        if ref_latents.shape[-2:] != noisy_latents.shape[-2:]:
            raise ValueError(f"ref_latents {tuple(ref_latents.shape)} must share the latent grid of the video")
        if drop_ref is not None:
            ref_latents = ref_latents * (~drop_ref.bool()).to(ref_latents.dtype).view(b, 1, 1, 1, 1)
        keep = None if drop_motion is None else (~drop_motion.bool()).float()
        pose_features = self.pose_encoder(pose_maps)
        face_tokens = None
        if use_face and cond.face_tokens is not None:  # per-frame tokens given (from the audio encoder)
            if cond.face_tokens.shape[1] != want[0]:
                raise ValueError(f"face_tokens have {cond.face_tokens.shape[1]} frames, expected {want[0]}")
            face_tokens = self.face_encoder.latent_layout(cond.face_tokens, cond.face_valid)
        elif use_face:
            if face_crops is None:
                raise ValueError("use_face=True needs face_crops or face_tokens (stage 1 passes use_face=False)")
            if face_crops.shape[1] != want[0]:
                raise ValueError(f"face_crops have {face_crops.shape[1]} frames, expected {want[0]}")
            face_tokens = self.face_encoder(face_crops, cond.face_valid)
        cond_latents, given = cond.cond_latents, None
        if cond_latents is not None:
            if not self.cfg.dit.cond_channels:
                raise ValueError("cond_latents given but dit.cond_channels is 0")
            n_mask = self.cfg.dit.cond_channels - self.cfg.dit.latent_channels
            m = torch.ones(b, t, device=noisy_latents.device) if cond.cond_mask is None else cond.cond_mask.float()
            m = m.to(cond_latents.dtype)[:, None, :, None, None]
            given = torch.cat([m.expand(b, n_mask, t, h, w), cond_latents * m], dim=1)
        return self.dit(noisy_latents, timesteps, ref_latents, pose_features, face_tokens, given, keep)

    def audio_tokens(self, speech: SpeechClip) -> AudioTokens:
        """The audio stage's pass (no DiT): the audio encoder's frame tokens, and, when the clip has face crops,
        the frozen face motion encoder's tokens of them as the target (the teacher, without gradients) with the
        frames where both exist (a face, and audio under the frame)."""
        if self.audio_encoder is None:
            raise ValueError("this model has no audio encoder: build it with DreamActor(cfg, audio=True)")
        pred, has_audio = self.audio_encoder(speech.audio, speech.audio_samples, speech.fps, speech.num_frames)
        if speech.face_crops is None:
            return AudioTokens(pred, None, has_audio)
        with torch.no_grad():
            target = self.face_encoder.frame_tokens(speech.face_crops)
        mask = has_audio if speech.face_valid is None else has_audio & speech.face_valid.bool()
        return AudioTokens(pred, target.to(pred.dtype), mask)

    def compile_blocks(self, mix_order_reduction: bool = False) -> None:
        """``torch.compile`` each DiT block (fuses the fp32 norm/modulation/RoPE elementwise work; one graph
        serves all blocks, one more for checkpointed blocks: the checkpoint is traced inside the compiled block,
        see ``DiTBlock.forward``). Measured on an H100: 2.21 -> 1.83 s per 1.3B step (docs/performance.md).

        Inductor's mix-order reduction (on by default on CUDA since PyTorch 2.10) fuses the LayerNorm backward
        with the reduction of the adaLN shift/scale gradients and computes them wrong for Wan's shared
        modulation table once a block sees more than ~16k tokens (pytorch/pytorch#193061): measured on an
        H200 with wan1_3b blocks at 49x480x832, gradients 20-70x too large in the modulation tables and the
        timestep embedding, non-finite from step 2 under checkpointing, while every CPU test agreed. It stays
        off unless ``mix_order_reduction`` (for the regression check in bench/grad_agreement.py)."""
        options = {"triton.mix_order_reduction": bool(mix_order_reduction)}
        _allow_shape_recompiles()
        for block in self.dit.blocks:
            block.compile(dynamic=False, options=options)
        self.dit.compiled = True

    def compile_encoders(self) -> None:
        """``torch.compile`` the pose encoder and the face encoder's FAN backbone (static shapes, one graph per
        clip shape): their activations, BatchNorms and pooling fuse around the cuDNN convolutions, which run at
        full pixel resolution (the pose encoder) or on every frame's face crop (the face encoder)."""
        _allow_shape_recompiles()
        self.pose_encoder.compile(dynamic=False)
        self.face_encoder.model.compile(dynamic=False)

    # ------------------------------------------------------------------ stages and accounting

    def named_param_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by training group (``PARAM_GROUPS``)."""
        groups = {g: [] for g in PARAM_GROUPS}
        for name, p in self.named_parameters():
            groups[param_group_of(name)].append((name, p))
        return groups

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (1, 2 or 3: paper 3.4; 4: the audio encoder)."""
        if stage not in STAGE_GROUPS:
            raise ValueError(f"stage must be one of {sorted(STAGE_GROUPS)}, got {stage}")
        if stage == AUDIO_STAGE and self.audio_encoder is None:
            raise ValueError(f"stage {AUDIO_STAGE} trains the audio encoder: build the model with audio=True")
        groups = self.named_param_groups()
        return [p for g in STAGE_GROUPS[stage] for _, p in groups[g]]

    def set_stage(self, stage: int) -> None:
        """Freeze everything but the groups of ``stage`` (requires_grad); callers pass use_face=(stage > 1)."""
        train = {id(p) for p in self.trainable_parameters(stage)}
        for p in self.parameters():
            p.requires_grad_(id(p) in train)

    def num_parameters(self, group: str | None = None) -> int:
        """Parameter count, of one group or of all."""
        if group is None:
            return sum(numel(p) for p in self.parameters())
        return sum(numel(p) for _, p in self.named_param_groups()[group])

    def flops_per_step(self, batch: int, frames: int, height: int, width: int, num_refs: int, *,
                       use_face: bool = True, backward: bool = True) -> int:
        """Model FLOPs of a training step on ``batch`` clips of ``frames`` x ``height`` x ``width`` pixels."""
        return flops_per_step(self.cfg, batch, frames, height, width, num_refs, use_face=use_face, backward=backward)
