"""FLOPs of one training step from the model's own shapes (for MFU), in the manner of nanoGPT/PaLM:
matrix multiplies and convolutions only (2 FLOPs per multiply-add), backward = 2x forward, activation
recomputation not counted (it is overhead, not model work).

The DiT is counted analytically below (it is > 99% of the work at real sizes; a test checks the formula
against ``torch.utils.flop_counter`` on a real forward). The small convolutional encoders are counted by
tracing one instance on the meta device (no memory, no compute).
"""
from __future__ import annotations

from functools import lru_cache
from math import prod

import torch

from .config import AudioEncoderConfig, FaceEncoderConfig, ModelConfig, PoseEncoderConfig


def dit_forward_flops(cfg: ModelConfig, batch: int, t: int, h: int, w: int, num_refs: int, use_face: bool,
                      use_pose: bool = True) -> int:
    """Forward FLOPs of the DiT on a (t, h, w) latent grid with ``num_refs`` reference frames."""
    c = cfg.dit
    d, f, p = c.dim, c.ffn_dim, prod(c.patch_size)
    tokens_per_frame = (h // c.patch_size[1]) * (w // c.patch_size[2])
    nv = (t // c.patch_size[0]) * tokens_per_frame
    nr = num_refs * tokens_per_frame
    n = nv + nr
    lt = c.text_len
    li = c.image_len if c.image_dim is not None else 0
    g = cfg.vae.temporal_compression

    per_block = 2 * n * d * d * 4 + 4 * n * n * d  # self-attention: q, k, v, out projections + scores/values
    streams = 2 if nr else 1  # the context keys/values are projected for the ref and the video stream
    per_block += 2 * n * d * d * 2 + streams * 2 * (lt + li) * d * d * 2 + 4 * n * (lt + li) * d  # text (+image)
    if nr:
        per_block += 2 * nv * d * d * 2 + 2 * nr * d * d * 2 + 4 * nv * nr * d  # Ref Attn
    if use_face:
        per_block += 2 * nv * d * d * 2 + 2 * t * g * d * d * 2 + 4 * nv * g * d  # Face Attn
    per_block += 2 * n * d * f * 2  # MLP
    per_sample = c.num_layers * per_block
    per_sample -= 2 * nr * d * f * 2  # the last block runs no MLP on the reference stream (nothing reads it)
    per_sample += 2 * n * (c.latent_channels + c.cond_channels) * p * d  # patch embedding (refs included)
    if use_pose:
        per_sample += 2 * nv * cfg.pose_encoder.out_channels * p * d
    per_sample += 2 * nv * d * c.latent_channels * p  # output projection
    per_sample += streams * 2 * (c.freq_dim * d + d * d + d * 6 * d)  # timestep embeddings
    shared = 2 * lt * (c.text_dim * d + d * d)  # the fixed context is embedded once per forward
    if c.image_dim is not None:
        shared += 2 * li * (c.image_dim * c.image_dim + c.image_dim * d)
    return batch * per_sample + shared


def _meta_flops(build, *shapes) -> int:
    """FLOPs of one forward of ``build()`` on inputs of ``shapes``, traced on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        module = build()
        inputs = [torch.empty(s) for s in shapes]
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    return counter.get_total_flops()


@lru_cache(maxsize=32)
def pose_encoder_flops(pe: PoseEncoderConfig, tc: int, sc: int, batch: int, frames: int, height: int,
                       width: int) -> int:
    """Forward FLOPs of the pose encoder."""
    from .pose_encoder import PoseEncoder

    return _meta_flops(lambda: PoseEncoder(pe, tc, sc), (batch, pe.in_channels, frames, height, width))


@lru_cache(maxsize=32)
def face_encoder_flops(fe: FaceEncoderConfig, token_dim: int, group: int, batch: int, frames: int) -> int:
    """Forward FLOPs of the face motion encoder + MLP."""
    from .face_encoder import FaceMotionEncoder

    s = fe.crop_size
    return _meta_flops(lambda: FaceMotionEncoder(fe, token_dim, group), (batch, frames, 3, s, s))


def flops_per_step(cfg: ModelConfig, batch: int, frames: int, height: int, width: int, num_refs: int, *,
                   use_face: bool = True, backward: bool = True) -> int:
    """Model FLOPs of one step on a batch of ``frames`` x ``height`` x ``width`` clips (pixels) with
    ``num_refs`` reference images: forward, times 3 with the backward pass."""
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w = 1 + (frames - 1) // tc, height // sc, width // sc
    total = dit_forward_flops(cfg, batch, t, h, w, num_refs, use_face)
    total += pose_encoder_flops(cfg.pose_encoder, tc, sc, batch, frames, height, width)
    if use_face:
        total += face_encoder_flops(cfg.face_encoder, cfg.dit.dim, tc, batch, frames)
    return total * (3 if backward else 1)


def audio_encoder_flops(ae: AudioEncoderConfig, token_dim: int, batch: int, samples: int, frames: int,
                        attention: bool = True) -> int:
    """Forward FLOPs of the audio encoder (mel front end) on ``batch`` rows of ``samples`` samples under ``frames``
    frames: the mel filterbank, the convolutions, the Conformer blocks (attention over all N features, as SDPA
    computes it under the local mask; ``attention=False`` leaves the scores and values out, as
    ``torch.utils.flop_counter`` does on the CPU), frame pooling and the head. A pretrained front end's backbone
    is not counted (frozen, and not ours)."""
    from .audio_encoder import FEATURE_STRIDE, num_features

    w, k, m = ae.width, ae.conv_kernel, ae.ffn_mult
    n_mel = samples // (FEATURE_STRIDE // 2) + 1
    n = num_features(samples)
    front = 2 * n_mel * (ae.n_fft // 2 + 1) * ae.n_mels + 2 * n_mel * ae.n_mels * w * 3 + 2 * n * w * w * 3
    per_step = (8 * m + 14) * w * w + 2 * k * w + (4 * n * w if attention else 0)
    tail = 2 * frames * n * w + 2 * frames * w * token_dim
    return batch * (front + ae.num_layers * n * per_step + tail)


def audio_stage_flops(cfg: ModelConfig, batch: int, samples: int, frames: int, backward: bool = True) -> int:
    """Model FLOPs of one audio-stage step: the audio encoder forward (x 3 with its backward) + the frozen face
    motion encoder's forward on the clip's face crops (the teacher; no backward). No DiT."""
    student = audio_encoder_flops(cfg.audio_encoder, cfg.dit.dim, batch, samples, frames)
    teacher = face_encoder_flops(cfg.face_encoder, cfg.dit.dim, cfg.vae.temporal_compression, batch, frames)
    return student * (3 if backward else 1) + teacher
