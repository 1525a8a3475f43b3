"""The pretrained 3D causal video VAE (paper 3.1): Wan 2.1's VAE through diffusers' ``AutoencoderKLWan``.

16 latent channels, 4x temporal and 8x spatial compression, causal in time: T = 1 + 4k frames give
1 + k latent frames (the first frame is encoded alone). Latents are normalised per channel with the
VAE's ``latents_mean`` / ``latents_std`` (``z = (mu - mean) / std``); the model only sees normalised
latents. Encoding uses the posterior mean (deterministic, so latents can be cached).

Long clips: encoding runs through diffusers' causal cache one 4-frame chunk at a time, as many samples
per call as ``vae.encode_batch_pixels`` allows (samples x height x width: memory does not grow with
frames); decoding streams one latent frame at a time through the same cache and writes each decoded chunk
straight into the output (optionally on another device, e.g. the CPU), so GPU memory does not grow
with the clip length. Large frames can use diffusers' spatial tiling (``vae.tiling``).

Without pretrained weights (``vae.kind=patch``): :class:`PatchAutoencoder`, a fixed linear autoencoder of the same
layout. A randomly initialised Wan VAE is no stand-in for a trained one: its latents hardly depend on any frame but the
first (replacing frames 1-16 of a 17-frame clip with noise moves latent frames 1-4 by 0.3-8% of their variance,
changing frame 0 moves them by 40-70%: ``tests/models/test_vae.py``), so motion after the first frame is invisible to
a model trained in its latent space.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .config import VAEConfig

# (colour, y, x) frequencies of PatchAutoencoder's 16 channels: 8 of luma, 4 of each chroma axis (colour axes
# Y = R+G+B, C1 = R-G, C2 = R+G-2B: orthogonal); every pattern is constant over the frames of its latent frame.
PATCH_CHANNELS = ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 0, 2), (0, 2, 0), (0, 1, 2), (0, 2, 1),
                  (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
                  (2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1))
_COLOURS = ((1.0, 1.0, 1.0), (1.0, -1.0, 0.0), (1.0, 1.0, -2.0))


class PatchAutoencoder(nn.Module):
    """A fixed linear video autoencoder with the Wan VAE's layout: 16 channels, causal, the first frame alone and then
    4 frames per latent frame, 8 x 8 pixels per latent cell. Each channel is the least-squares amplitude of one
    low-frequency pattern (a colour axis x a DCT-II cosine in y and x: ``PATCH_CHANNELS``, constant in time) in its
    3 x (1 | 4) x 8 x 8 block of pixels; the patterns are orthogonal, so decoding sums them back (a low-pass
    reconstruction). A latent frame is thus the low-pass picture of its frames' mean, the first frame's alone
    (patterns that change within the 4 frames were tried: at normalised unit variance they are mostly noise, a
    quarter of the latent that no model can predict).

    For runs without pretrained VAE weights (the learning test): unlike a random init of the Wan VAE, every latent
    frame is a faithful summary of its own frames, where the person is and how it moves within them. Its interface is
    the part of diffusers' ``AutoencoderKLWan`` that :class:`VideoVAE` uses."""

    def __init__(self, latent_channels: int = 16, temporal: int = 4, spatial: int = 8,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None):
        super().__init__()
        if latent_channels != len(PATCH_CHANNELS):
            raise ValueError(f"the patch autoencoder has {len(PATCH_CHANNELS)} latent channels, config says "
                             f"{latent_channels}")
        self.temporal, self.spatial = temporal, spatial
        for name, frames in (("first", 1), ("rest", temporal)):
            basis = self.patterns(frames, spatial)  # (C, 3, frames, s, s): decoding sums these
            norm = basis.flatten(1).square().sum(1).view(-1, 1, 1, 1, 1)
            self.register_buffer(f"synthesis_{name}", basis)
            self.register_buffer(f"analysis_{name}", basis / norm)  # least-squares amplitude of each pattern
        self.config = SimpleNamespace(z_dim=latent_channels, patch_size=None,
                                      latents_mean=list(latents_mean or [0.0] * latent_channels),
                                      latents_std=list(latents_std or [1.0] * latent_channels))
        self.use_tiling = False

    @staticmethod
    def patterns(frames: int, side: int) -> torch.Tensor:
        """The channels' pixel patterns over a 3 x frames x side x side block."""
        cos = lambda f: torch.cos(math.pi * (torch.arange(side, dtype=torch.float64) + 0.5) * f / side)  # noqa: E731
        out = [torch.einsum("c,t,y,x->ctyx", torch.tensor(_COLOURS[c], dtype=torch.float64),
                            torch.ones(frames, dtype=torch.float64), cos(fy), cos(fx)) for c, fy, fx in PATCH_CHANNELS]
        return torch.stack(out).float()

    def enable_tiling(self):
        raise ValueError("model.vae.tiling: the patch autoencoder works cell by cell and needs no tiling")

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> ``.latent_dist.mean`` (B, C, 1 + k, H / 8, W / 8), raw amplitudes."""
        s, tc = self.spatial, self.temporal
        z = [F.conv3d(x[:, :, :1], self.analysis_first.to(x.dtype), stride=(1, s, s))]
        if x.shape[2] > 1:
            z.append(F.conv3d(x[:, :, 1:], self.analysis_rest.to(x.dtype), stride=(tc, s, s)))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat(z, 2)))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        """Raw amplitudes (B, C, t, h, w) -> ``.sample`` (B, 3, 1 + 4(t-1), 8h, 8w) in [-1, 1]."""
        s, tc = self.spatial, self.temporal
        x = [F.conv_transpose3d(z[:, :, :1], self.synthesis_first.to(z.dtype), stride=(1, s, s))]
        if z.shape[2] > 1:
            x.append(F.conv_transpose3d(z[:, :, 1:], self.synthesis_rest.to(z.dtype), stride=(tc, s, s)))
        return SimpleNamespace(sample=torch.cat(x, 2).clamp(-1.0, 1.0))


def build_autoencoder(cfg: VAEConfig, vae_dir: str | None):
    """An ``AutoencoderKLWan``: pretrained from ``vae_dir``, or randomly initialised from ``cfg.arch``; with
    ``cfg.kind == "patch"`` the :class:`PatchAutoencoder` (``cfg.arch``: its ``latents_mean`` / ``latents_std``; a
    preset's Wan architecture keys there are for ``kind=wan`` and unused)."""
    if cfg.kind == "patch":
        if vae_dir is not None:
            raise ValueError(f"model.vae.kind=patch takes no weights, but model.weights.vae_dir={vae_dir} is set: "
                             "set model.vae.kind=wan to use them")
        arch = dict(cfg.arch or {})
        return PatchAutoencoder(cfg.latent_channels, cfg.temporal_compression, cfg.spatial_compression,
                                arch.get("latents_mean"), arch.get("latents_std"))
    from diffusers import AutoencoderKLWan

    dtype = getattr(torch, cfg.dtype)
    if vae_dir is not None:
        path = Path(vae_dir)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no Wan VAE at {path} (expected config.json + diffusion_pytorch_model.safetensors). Point "
                "model.weights.vae_dir at the 'vae' folder of a Wan 2.1 diffusers checkpoint, e.g. "
                "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae.")
        vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype)
    elif cfg.arch is not None:
        vae = AutoencoderKLWan(**cfg.arch)
        if dtype != torch.float32:
            vae = vae.to(dtype)
    else:
        raise FileNotFoundError(
            "model.weights.vae_dir is not set: point it at the 'vae' folder of a Wan 2.1 diffusers checkpoint "
            "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae).")
    if vae.config.z_dim != cfg.latent_channels:
        raise ValueError(f"VAE has {vae.config.z_dim} latent channels, config says {cfg.latent_channels}")
    return vae


def vae_identity(cfg: VAEConfig, vae_dir: str | None, seed: int) -> dict:
    """What decides the latents a VAE computes, for a latent cache to be checked against: the sha256 of its weight
    files (``vae_dir``), or for a randomly initialised one (the tiny preset) its architecture and the run seed it is
    built from (``train.step.vae_seed``). The compute dtype is not part of it (a cache records it beside)."""
    if cfg.kind == "patch":
        return {"patch": {"channels": [list(c) for c in PATCH_CHANNELS], "arch": dict(cfg.arch or {})}}
    if vae_dir is None:
        return {"random_init": {"arch": None if cfg.arch is None else dict(cfg.arch), "seed": int(seed)}}
    files = sorted(p for p in Path(vae_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {vae_dir}")
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            h.update(p.name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return {"weights_sha256": h.hexdigest(), "files": [p.name for p in files]}


def pixels_to_vae(pixels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 pixels -> the VAE's [-1, 1] input (a new tensor); :func:`frames_uint8` is the inverse."""
    return pixels.to(dtype).div_(127.5).sub_(1.0)


def frames_uint8(video: torch.Tensor):
    """Pixels (3, T, H, W) in [-1, 1] (the VAE's range) -> a (T, H, W, 3) uint8 numpy array."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()


def _dtype(ae: nn.Module) -> torch.dtype:
    """The compute dtype of an autoencoder (its first parameter's, or buffer's)."""
    return next(itertools.chain(ae.parameters(), ae.buffers())).dtype


class VideoVAE(nn.Module):
    """Frozen wrapper: pixels in [-1, 1] (B, 3, T, H, W) <-> normalised latents (B, C, t, h, w)."""

    def __init__(self, autoencoder, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        if cfg.tiling:
            self.autoencoder.enable_tiling()
        shape = (1, -1, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(autoencoder.config.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(autoencoder.config.latents_std).view(shape), persistent=False)

    @classmethod
    def from_config(cls, cfg: VAEConfig, vae_dir: str | None) -> VideoVAE:
        """Build from the model config and the configured weights directory."""
        return cls(build_autoencoder(cfg, vae_dir), cfg)

    def train(self, mode: bool = True):
        """The VAE is always frozen."""
        return super().train(False)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (t, h, w) of a clip; frames must be 1 + k * temporal_compression."""
        tc, sc = self.cfg.temporal_compression, self.cfg.spatial_compression
        if (frames - 1) % tc or height % sc or width % sc:
            raise ValueError(f"clip {frames}x{height}x{width} must have 1 + k*{tc} frames and sides divisible by {sc}")
        return 1 + (frames - 1) // tc, height // sc, width // sc

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> model latents."""
        return (z - self.mean.to(z)) / self.std.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Model latents -> raw VAE latents."""
        return z * self.std.to(z) + self.mean.to(z)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised posterior-mean latents (B, C, t, h, w) in float32."""
        self.latent_shape(*video.shape[2:])
        ae = self.autoencoder
        dtype = _dtype(ae)
        per_call = max(1, self.cfg.encode_batch_pixels // (video.shape[-2] * video.shape[-1]))
        out = []
        for chunk in video.split(per_call):
            moments = ae.encode(chunk.to(dtype)).latent_dist.mean
            out.append(self.normalize(moments.float()))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, out_device: torch.device | str | None = None) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> video (B, 3, 1 + (t-1)*tc, H, W) float32 in [-1, 1]."""
        ae = self.autoencoder
        dtype = _dtype(ae)
        b, _, t, h, w = latents.shape
        tc, sc = self.cfg.temporal_compression, self.cfg.spatial_compression
        out_device = latents.device if out_device is None else out_device
        video = torch.empty(b, 3, 1 + (t - 1) * tc, h * sc, w * sc, device=out_device)
        for i, z in enumerate(latents.split(1)):
            z = self.denormalize(z.float()).to(dtype)
            if ae.use_tiling or ae.config.patch_size is not None or not hasattr(ae, "decoder"):
                video[i] = ae.decode(z).sample[0].float().to(out_device)
                continue
            self._decode_streaming(z, video[i])
        return video

    def _decode_streaming(self, z: torch.Tensor, out: torch.Tensor) -> None:
        """Decode one sample latent frame by latent frame through the causal cache (diffusers' own loop)."""
        ae = self.autoencoder
        ae.clear_cache()
        x = ae.post_quant_conv(z)
        pos = 0
        for i in range(z.shape[2]):
            ae._conv_idx = [0]
            chunk = ae.decoder(x[:, :, i:i + 1], feat_cache=ae._feat_map, feat_idx=ae._conv_idx, first_chunk=i == 0)
            chunk = chunk.clamp(-1.0, 1.0)[0]
            out[:, pos:pos + chunk.shape[1]] = chunk.float().to(out.device)
            pos += chunk.shape[1]
        ae.clear_cache()
        if pos != out.shape[1]:
            raise RuntimeError(f"decoded {pos} frames, expected {out.shape[1]}")
