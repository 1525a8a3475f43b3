"""A short sample video from the current weights, as a progress check (every ``train.sample.every`` steps).

Every rank runs the sampler (under ZeRO-3 a forward needs every rank's parameter shards) on the first clip
of a batch it kept, with its own generator (the training generators are untouched); rank 0 writes
``samples/step_XXXXXXXX.mp4``: [driving clip | skeleton + head sphere | generated], and a strip of frames to
TensorBoard.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from models.flow import sample
from models.vae import frames_uint8

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_video(engine, vae, batch, frames: int, steps: int, use_face: bool, seed: int, dtype) -> np.ndarray:
    """(T, H, 3 W, 3) uint8: driving clip, control maps and the generated clip side by side."""
    model = engine.module
    tc = model.cfg.vae.temporal_compression
    n = min(frames, batch.num_frames)
    n = 1 + (n - 1) // tc * tc
    one = slice(0, 1)
    t, (h, w) = 1 + (n - 1) // tc, batch.resolution
    if batch.video_latents is not None:  # a batch from the latent cache: the driving clip is decoded from its latents
        x0_pix = vae.decode(batch.video_latents[one, :, :t].float())
        ref = batch.ref_latents.float()
    else:
        x0_pix = batch.video_pixels()[one, :, :n]
        ref = batch.refs_to_latent_layout(vae.encode(batch.ref_pixels()))
    cond = batch.conditions(ref, dtype, use_face).samples(one).pixel_frames(0, n)
    use_face = cond.face_crops is not None
    sc = model.cfg.vae.spatial_compression
    g = torch.Generator(device=ref.device).manual_seed(seed)
    noise = torch.randn(1, ref.shape[1], t, h // sc, w // sc, generator=g, device=ref.device)
    was_training = model.training
    model.eval()
    try:
        latents = sample(model, noise, cond, model.cfg.flow, steps=steps, use_face=use_face)
    finally:
        model.train(was_training)
    video = vae.decode(latents)[0]
    skeleton = cond.pose_maps[0, :3].float() * 2 - 1
    sphere = cond.pose_maps[0, 3:6].float() * 2 - 1
    controls = torch.maximum(skeleton, sphere)
    panel = torch.cat([x0_pix[0], controls.to(x0_pix), video.to(x0_pix)], dim=-1)
    return frames_uint8(panel)


def write_sample(path: Path, frames: np.ndarray, fps: float) -> Path:
    """MP4 (H.264, even sides) through a temporary name."""
    from preprocess.video import encode_mp4

    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encode_mp4(np.ascontiguousarray(frames[:, :h, :w]), fps))
    tmp.replace(path)
    return path
