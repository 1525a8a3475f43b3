"""Flow matching (paper 3.1) and the sampler with dual classifier-free guidance and segment-wise long-video
generation (paper 4.1).

Convention (rectified flow, as Wan): ``x_t = (1 - sigma) x_0 + sigma * noise``, sigma in [0, 1]; the model
predicts the velocity ``v = noise - x_0``; sampling integrates ``dx/dsigma = v`` from sigma = 1 to 0.

Timesteps: training sigmas are logit-normal, ``sigmoid(N(mean, std))``, then shifted towards noise by
``shift * s / (1 + (shift - 1) s)``; the shift grows with the number of video tokens as
``flow.shift * sqrt(tokens / flow.shift_ref_tokens)`` (SD3's resolution rule), for training and sampling alike.

Dual CFG: with R = reference, M = motion (pose + face):
``v = v(-,-) + g_R (v(R,-) - v(-,-)) + g_M (v(R,M) - v(R,-))``; scales of 1.0 give ``v(R,M)``. Only the
needed passes run, batched into one model call.

Long videos: segments of ``flow.segment_frames`` frames (73 -> 19 latent frames); the last latent of a
segment is the first latent of the next, given to the model as Wan-I2V conditioning (mask + latent
channels), i.e. the next segment is generated as an image-to-video task, and written into the result
exactly, so consecutive segments share that latent.
"""
from __future__ import annotations

import math

import torch

from .conditions import Conditions
from .config import FlowConfig


def timestep_shift(cfg: FlowConfig, num_tokens: int) -> float:
    """Resolution-dependent shift for ``num_tokens`` video tokens."""
    return cfg.shift * math.sqrt(num_tokens / cfg.shift_ref_tokens)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform-ish sigmas towards the noisy end: ``shift * s / (1 + (shift - 1) s)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(cfg: FlowConfig, batch: int, num_tokens: int, device=None, generator=None) -> torch.Tensor:
    """Training noise levels (B,): logit-normal, shifted for the resolution."""
    u = torch.randn(batch, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return shift_sigmas(torch.sigmoid(u), timestep_shift(cfg, num_tokens))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy latents ``x_t`` and the velocity target ``noise - x0`` for (B,) sigmas."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def flow_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target velocity (in float32)."""
    return torch.mean((velocity.float() - target.float()) ** 2)


def sampling_sigmas(steps: int, shift: float, device=None) -> torch.Tensor:
    """(steps + 1,) sigmas from 1 to 0, shifted."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


def video_tokens(model, latents: torch.Tensor) -> int:
    """Number of video tokens of a latent batch (for the resolution-dependent shift)."""
    p = model.dit.cfg.patch_size
    return (latents.shape[2] // p[0]) * (latents.shape[3] // p[1]) * (latents.shape[4] // p[2])


def guided_velocity(model, x: torch.Tensor, sigma: torch.Tensor, cond: Conditions, guidance_ref: float,
                    guidance_motion: float, use_face: bool = True, motion: bool = True) -> torch.Tensor:
    """Dual-CFG velocity (formula in the module docstring), with only the passes the scales need.

    ``motion=False``: the "no motion" branch alone, ``v(-,-) + g_R (v(R,-) - v(-,-))`` (the motion-dropped
    baseline of the evaluation: what the model makes of the reference without the driving signals)."""
    b = x.shape[0]
    if motion:
        passes = [(False, False)]  # (drop_ref, drop_motion): full conditions first
        if guidance_motion != 1.0 or guidance_ref != 1.0:
            passes.append((False, True))
    else:
        passes, guidance_motion = [(False, True)], 1.0
    if guidance_ref != 1.0:
        passes.append((True, True))
    n = len(passes)

    def flags(i):
        return torch.tensor([p[i] for p in passes], device=x.device).repeat_interleave(b)

    c = cond.repeat(n) if n > 1 else cond
    v = model(torch.cat([x] * n), sigma.expand(b).repeat(n), c, drop_ref=flags(0), drop_motion=flags(1),
              use_face=use_face).float().chunk(n)
    if n == 1:
        return v[0]
    if not motion:
        return v[1] + guidance_ref * (v[0] - v[1])
    full, ref_only = v[0], v[1]
    out = ref_only + guidance_motion * (full - ref_only)
    if n == 3:
        out = out + (guidance_ref - 1.0) * (ref_only - v[2])
    return out


@torch.no_grad()
def sample(model, noise: torch.Tensor, cond: Conditions, cfg: FlowConfig, *, steps: int | None = None,
           guidance_ref: float | None = None, guidance_motion: float | None = None, use_face: bool = True,
           motion: bool = True, on_step=None) -> torch.Tensor:
    """Euler integration from ``noise`` (sigma = 1) to latents (sigma = 0); defaults from ``cfg``;
    ``motion=False`` samples the motion-dropped branch (see :func:`guided_velocity`); ``on_step()`` is called
    after each step (progress bars)."""
    steps = cfg.sample_steps if steps is None else steps
    g_r = cfg.guidance_ref if guidance_ref is None else guidance_ref
    g_m = cfg.guidance_motion if guidance_motion is None else guidance_motion
    sigmas = sampling_sigmas(steps, timestep_shift(cfg, video_tokens(model, noise)), noise.device)
    x = noise.float()
    for i in range(steps):
        v = guided_velocity(model, x, sigmas[i].view(1), cond, g_r, g_m, use_face, motion)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if on_step is not None:
            on_step()
    if cond.cond_mask is not None:  # given latents are exact in the result
        m = cond.cond_mask.to(x.dtype)[:, None, :, None, None]
        x = x * (1 - m) + cond.cond_latents.float() * m
    return x


def segment_plan(num_frames: int, segment_frames: int, temporal_compression: int) -> list[tuple[int, int]]:
    """Pixel-frame ranges [start, stop) of the segments covering ``num_frames`` frames.

    Consecutive segments overlap by one frame (the shared latent); every segment has 1 + k*tc frames; the
    last one may run past ``num_frames`` (its controls are padded, its extra frames cropped).
    """
    tc = temporal_compression
    if (segment_frames - 1) % tc:
        raise ValueError(f"segment_frames must be 1 + k*{tc}, got {segment_frames}")
    plan, start = [], 0
    while True:
        remaining = num_frames - start
        length = min(segment_frames, 1 + tc * math.ceil(max(remaining - 1, 0) / tc))
        plan.append((start, start + length))
        if start + length >= num_frames:
            return plan
        start += length - 1


@torch.no_grad()
def generate_long(model, cond: Conditions, cfg: FlowConfig, num_frames: int, *, generator=None,
                  steps: int | None = None, guidance_ref: float | None = None, guidance_motion: float | None = None,
                  use_face: bool = True, segment_frames: int | None = None, on_step=None) -> list[torch.Tensor]:
    """Latents of each segment of a ``num_frames``-frame video driven by full-length ``cond`` controls.

    ``cond.pose_maps`` / ``face_crops`` / ``face_valid`` cover all frames (at least ``num_frames``).
    Segment k > 0 starts with the last latent of segment k - 1. Decode with :func:`decode_segments`.
    ``segment_frames`` overrides ``cfg.segment_frames``; ``on_step()`` is called after every sampling step.
    """
    tc = model.cfg.vae.temporal_compression
    sc = model.cfg.vae.spatial_compression
    b, c = cond.ref_latents.shape[:2]
    h, w = cond.pose_maps.shape[-2] // sc, cond.pose_maps.shape[-1] // sc
    segments, prev_last = [], None
    for start, stop in segment_plan(num_frames, segment_frames or cfg.segment_frames, tc):
        t = 1 + (stop - start - 1) // tc
        seg = cond.pixel_frames(start, stop)
        if prev_last is not None:
            seg.cond_latents = torch.zeros(b, c, t, h, w, device=prev_last.device)
            seg.cond_latents[:, :, 0] = prev_last
            seg.cond_mask = torch.zeros(b, t, device=prev_last.device)
            seg.cond_mask[:, 0] = 1
        noise = torch.randn(b, c, t, h, w, generator=generator, device=cond.ref_latents.device)
        x = sample(model, noise, seg, cfg, steps=steps, guidance_ref=guidance_ref, guidance_motion=guidance_motion,
                   use_face=use_face, on_step=on_step)
        segments.append(x)
        prev_last = x[:, :, -1]
    return segments


def stitch_latents(segments: list[torch.Tensor]) -> torch.Tensor:
    """One latent sequence: the first segment, then each next one without its shared first latent."""
    return torch.cat([segments[0]] + [s[:, :, 1:] for s in segments[1:]], dim=2)


@torch.no_grad()
def decode_segments(vae, segments: list[torch.Tensor], num_frames: int, out_device=None) -> torch.Tensor:
    """Decode each segment (a causal clip of its own) and join them, dropping the shared first frame of
    every segment after the first; crop to ``num_frames``. Returns (B, 3, num_frames, H, W)."""
    videos = []
    for i, seg in enumerate(segments):
        v = vae.decode(seg, out_device=out_device)
        videos.append(v if i == 0 else v[:, :, 1:])
    return torch.cat(videos, dim=2)[:, :, :num_frames]
