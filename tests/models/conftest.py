"""Fixtures of the models/ tests: the tiny preset and a small synthetic driving clip made from a shipped photo."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.conditions import Conditions
from models.config import load_preset
from models.dreamactor import DreamActor


@pytest.fixture(scope="session")
def tiny_cfg():
    """The tiny preset (every component, CPU-sized)."""
    return load_preset("tiny")


@pytest.fixture()
def tiny_model(tiny_cfg):
    """A freshly initialised tiny DreamActor (seeded)."""
    torch.manual_seed(0)
    return DreamActor.from_config(tiny_cfg)


def random_batch(cfg, batch=2, frames=9, height=32, width=48, refs=2, seed=0):
    """Random model inputs of one clip shape (latent grid from the VAE factors)."""
    g = torch.Generator().manual_seed(seed)
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w = 1 + (frames - 1) // tc, height // sc, width // sc
    c = cfg.dit.latent_channels
    s = cfg.face_encoder.crop_size
    return {
        "noisy_latents": torch.randn(batch, c, t, h, w, generator=g),
        "timesteps": torch.rand(batch, generator=g),
        "ref_latents": torch.randn(batch, c, refs, h, w, generator=g),
        "pose_maps": torch.rand(batch, cfg.pose_encoder.in_channels, frames, height, width, generator=g),
        "face_crops": torch.rand(batch, frames, 3, s, s, generator=g) * 2 - 1,
    }


def forward(model, b: dict, **kwargs):
    """``model`` on a :func:`random_batch`-style dict: its condition fields (and ``cond_latents`` /
    ``cond_mask`` among ``kwargs``) go into one :class:`Conditions`, the rest are passed on."""
    cond = Conditions(b["ref_latents"], b["pose_maps"], b.get("face_crops"), b.get("face_valid"),
                      kwargs.pop("cond_latents", None), kwargs.pop("cond_mask", None))
    return model(b["noisy_latents"], b["timesteps"], cond, **kwargs)


def astronaut_clip(frames=9, size=32, shift=2):
    """(3, T, size, size) video in [-1, 1]: skimage's astronaut, downscaled, panning ``shift`` px a frame."""
    import cv2
    from skimage import data

    img = cv2.resize(data.astronaut(), (size + shift * frames, size + shift * frames), interpolation=cv2.INTER_AREA)
    clip = np.stack([img[:size, k * shift:k * shift + size] for k in range(frames)])
    return torch.from_numpy(clip).permute(3, 0, 1, 2).float() / 127.5 - 1
