"""The VAE wrapper on a tiny randomly initialised AutoencoderKLWan (the real class)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.vae import VideoVAE

from .conftest import astronaut_clip


@pytest.fixture(scope="module")
def vae(tiny_cfg):
    torch.manual_seed(0)
    return VideoVAE.from_config(tiny_cfg.vae, None)


def test_shapes_and_compression(vae):
    clip = astronaut_clip(frames=9, size=32)[None]
    z = vae.encode(clip)
    assert z.shape == (1, 16, 3, 4, 4) == (1, 16, *vae.latent_shape(9, 32, 32))
    assert vae.decode(z).shape == clip.shape
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        vae.latent_shape(8, 32, 32)


def test_normalisation_uses_the_vae_statistics(vae):
    ae = vae.autoencoder
    clip = astronaut_clip(frames=5, size=32)[None]
    raw = ae.encode(clip).latent_dist.mean
    mean = torch.tensor(ae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(clip), (raw - mean) / std)
    torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw)


def test_streaming_decode_equals_diffusers_decode(vae):
    torch.manual_seed(1)
    z = torch.randn(1, 16, 4, 4, 6)
    ours = vae.decode(z, out_device="cpu")
    ref = vae.autoencoder.decode(vae.denormalize(z)).sample
    assert ours.shape == (1, 3, 13, 32, 48)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("per_call", [1, 2, 3])
def test_batched_encode_is_per_sample(vae, per_call, monkeypatch):
    """Samples share an encode call up to vae.encode_batch_pixels (samples x height x width); a sample's
    latents do not depend on its batch-mates."""
    clips = torch.stack([astronaut_clip(5, 32, shift=s) for s in (1, 3, 5)])
    alone = torch.cat([vae.encode(c[None]) for c in clips])
    calls = []
    encode = vae.autoencoder.encode
    monkeypatch.setattr(vae.autoencoder, "encode", lambda x: calls.append(len(x)) or encode(x))
    monkeypatch.setattr(vae, "cfg", dataclasses.replace(vae.cfg, encode_batch_pixels=per_call * 32 * 32 + 5))
    torch.testing.assert_close(vae.encode(clips), alone, rtol=1e-5, atol=1e-5)
    assert calls == [per_call] * (3 // per_call) + ([3 % per_call] if 3 % per_call else [])


def test_missing_weights_name_the_setting(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.weights.vae_dir"):
        VideoVAE.from_config(tiny_cfg.vae, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="model.weights.vae_dir is not set"):
        VideoVAE.from_config(tiny_cfg.vae.__class__(**{**tiny_cfg.vae.__dict__, "arch": None}), None)


def test_pretrained_dir_round_trip(vae, tiny_cfg, tmp_path):
    vae.autoencoder.save_pretrained(tmp_path / "vae")
    loaded = VideoVAE.from_config(tiny_cfg.vae, str(tmp_path / "vae"))
    clip = astronaut_clip(frames=5, size=32)[None]
    torch.testing.assert_close(loaded.encode(clip), vae.encode(clip))
