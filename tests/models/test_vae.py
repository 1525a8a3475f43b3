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


def _sensitivity(encode, clip: torch.Tensor, seed: int = 0) -> list[float]:
    """Change of each latent frame (relative to its variance) when every frame after the first is replaced by noise."""
    g = torch.Generator().manual_seed(seed)
    other = clip.clone()
    other[:, :, 1:] = torch.rand(other[:, :, 1:].shape, generator=g) * 2 - 1
    z, z2 = encode(clip), encode(other)
    return [float((z2 - z)[:, :, t].square().mean() / z[:, :, t].var()) for t in range(z.shape[2])]


def test_a_random_wan_vae_hardly_sees_frames_after_the_first(vae):
    """Why runs without pretrained weights use the patch autoencoder: a random init of the Wan VAE encodes frames
    1-16 into latents that barely move when those frames change (the first frame dominates them)."""
    clip = astronaut_clip(frames=17, size=32)[None]
    rel = _sensitivity(vae.encode, clip)
    assert rel[0] == 0 and max(rel[1:3]) < 0.1, rel


def test_the_patch_autoencoder_sees_every_frame_and_inverts_its_own_latents(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg.vae, kind="patch", arch=None)
    vae = VideoVAE.from_config(cfg, None)
    clip = astronaut_clip(frames=17, size=32)[None]
    z = vae.encode(clip)
    assert z.shape == (1, 16, 5, 4, 4)
    rel = _sensitivity(vae.encode, clip)
    assert rel[0] == 0 and min(rel[1:]) > 0.3, rel  # each latent frame is its own frames' summary
    # a latent frame is the picture of its frames' mean: a clip held still gives the same latent at every time
    still = clip[:, :, :1].expand_as(clip).contiguous()
    zs = vae.autoencoder.encode(still).latent_dist.mean
    assert torch.allclose(zs, zs[:, :, :1].expand_as(zs), atol=1e-5)
    # decode is the inverse on the patterns' span: a decoded clip re-encodes to its latents
    y = vae.decode(z * 0.2)
    assert y.shape == clip.shape
    assert torch.allclose(vae.encode(y), z * 0.2, atol=1e-4)
    # a pixel shift of one latent cell shifts the latents by one cell (position is kept)
    shifted = torch.roll(clip, 8, dims=-1)
    assert torch.allclose(vae.encode(shifted)[..., 1:], z[..., :-1], atol=1e-4)
    # its low-pass reconstruction beats each 8 x 8 cell's mean colour (the patterns above the DC term carry detail)
    cell_mean = torch.nn.functional.avg_pool3d(clip, (1, 8, 8)).repeat_interleave(8, -1).repeat_interleave(8, -2)
    assert (vae.decode(z) - clip).square().mean() < 0.8 * (cell_mean - clip).square().mean()


def test_the_patch_autoencoder_refuses_weights_and_tiling(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg.vae, kind="patch", arch=None)
    with pytest.raises(ValueError, match="kind=patch takes no weights"):
        VideoVAE.from_config(cfg, str(tmp_path))
    with pytest.raises(ValueError, match="no tiling"):
        VideoVAE.from_config(dataclasses.replace(cfg, tiling=True), None)
    with pytest.raises(ValueError, match="model.vae.kind='vq'"):
        dataclasses.replace(cfg, kind="vq")
