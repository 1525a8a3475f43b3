"""Flow matching: noising and target, timestep sampling, Euler sampler, dual CFG, long-video segments."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from models.flow import (
    Conditions,
    add_noise,
    decode_segments,
    generate_long,
    guided_velocity,
    sample,
    sample_sigmas,
    sampling_sigmas,
    segment_plan,
    shift_sigmas,
    stitch_latents,
    timestep_shift,
)

from .conftest import random_batch


def test_noising_and_velocity_target():
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    xt, v = add_noise(x0, noise, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.5 * (x0[1] + noise[1]))
    torch.testing.assert_close(v, noise - x0)
    # Moving along the target velocity from x_t by -sigma lands on the data.
    torch.testing.assert_close(xt - sigma.view(-1, 1, 1) * v, x0)


def test_timestep_sampling_logit_normal_and_shift(tiny_cfg):
    cfg = tiny_cfg.flow
    assert timestep_shift(cfg, cfg.shift_ref_tokens) == cfg.shift
    assert timestep_shift(cfg, 4 * cfg.shift_ref_tokens) == pytest.approx(2 * cfg.shift)
    s = sample_sigmas(cfg, 20000, cfg.shift_ref_tokens, generator=torch.Generator().manual_seed(0))
    assert 0 < s.min() and s.max() < 1
    # Unshifted logit-normal has median 0.5; the shift moves it to shift * 0.5 / (1 + (shift - 1) * 0.5).
    want = cfg.shift * 0.5 / (1 + (cfg.shift - 1) * 0.5)
    assert float(s.median()) == pytest.approx(want, abs=0.01)
    lo = sample_sigmas(cfg, 20000, cfg.shift_ref_tokens // 16, generator=torch.Generator().manual_seed(0))
    assert lo.median() < s.median()  # fewer tokens, less noise
    sig = sampling_sigmas(10, 3.0)
    assert sig[0] == 1 and sig[-1] == 0 and (sig[1:] < sig[:-1]).all()
    torch.testing.assert_close(shift_sigmas(torch.tensor([0.25]), 1.0), torch.tensor([0.25]))


class PointModel(torch.nn.Module):
    """The exact velocity field of a one-point data distribution x0: v(x, s) = (x - x0) / s."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0
        self.dit = type("D", (), {"cfg": type("C", (), {"patch_size": (1, 2, 2)})})()

    def forward(self, x, sigma, *args, **kwargs):
        return (x - self.x0) / sigma.view(-1, 1, 1, 1, 1)


def test_euler_sampler_integrates_the_flow(tiny_cfg):
    x0 = torch.randn(1, 16, 2, 4, 4)
    cond = Conditions(torch.zeros(1, 16, 1, 4, 4), torch.zeros(1, 6, 5, 32, 32))
    out = sample(PointModel(x0), torch.randn_like(x0), cond, tiny_cfg.flow, steps=5, guidance_ref=1, guidance_motion=1)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)  # straight paths: Euler is exact


def test_guidance_one_is_the_conditional_prediction(tiny_model):
    b = random_batch(tiny_model.cfg, batch=2)
    cond = Conditions(b["ref_latents"], b["pose_maps"], b["face_crops"])
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        guided = guided_velocity(tiny_model, b["noisy_latents"], sigma, cond, 1.0, 1.0)
        direct = tiny_model(b["noisy_latents"], sigma.expand(2), cond)
    torch.testing.assert_close(guided, direct)


def test_dual_guidance_formula(tiny_model):
    with torch.no_grad():
        for p in tiny_model.parameters():  # make the conditions matter
            if not p.any():
                p.normal_(0, 0.1)
    b = random_batch(tiny_model.cfg, batch=1)
    cond = Conditions(b["ref_latents"], b["pose_maps"], b["face_crops"])
    x, sigma = b["noisy_latents"], torch.tensor([0.4])
    args = (x, sigma, cond)
    no, yes = torch.tensor([False]), torch.tensor([True])
    with torch.no_grad():
        v_rm = tiny_model(*args)
        v_r = tiny_model(*args, drop_motion=yes)
        v_0 = tiny_model(*args, drop_ref=yes, drop_motion=yes)
        assert (v_rm - v_r).abs().max() > 1e-4 and (v_r - v_0).abs().max() > 1e-4
        want = v_0 + 2.5 * (v_r - v_0) + 2.5 * (v_rm - v_r)
        torch.testing.assert_close(guided_velocity(tiny_model, x, sigma, cond, 2.5, 2.5), want, atol=1e-5, rtol=1e-5)
        want_r1 = v_r + 3.0 * (v_rm - v_r)
        torch.testing.assert_close(guided_velocity(tiny_model, x, sigma, cond, 1.0, 3.0), want_r1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_model(*args, drop_ref=no, drop_motion=no), v_rm)


def test_segment_plan():
    assert segment_plan(73, 73, 4) == [(0, 73)]
    assert segment_plan(145, 73, 4) == [(0, 73), (72, 145)]
    assert segment_plan(150, 73, 4) == [(0, 73), (72, 145), (144, 153)]
    for n in (1, 10, 73, 100, 300):
        plan = segment_plan(n, 73, 4)
        assert plan[0][0] == 0 and plan[-1][1] >= n and plan[-1][1] - n < 4
        assert all(a[1] - 1 == b[0] for a, b in itertools.pairwise(plan))  # one shared frame (one latent)
        assert all((stop - start - 1) % 4 == 0 and stop - start <= 73 for start, stop in plan)
    with pytest.raises(ValueError):
        segment_plan(100, 72, 4)


def test_long_video_segments_share_the_seam_latent(tiny_model):
    from models.vae import VideoVAE

    cfg = tiny_model.cfg.replace(flow={"segment_frames": 9})
    frames = 22  # segments of 9, 9 and 9 (padded) frames: (0, 9), (8, 17), (16, 25)
    b = random_batch(cfg, batch=1, frames=frames + 3, height=16, width=16)
    cond = Conditions(b["ref_latents"], b["pose_maps"], b["face_crops"])
    segs = generate_long(tiny_model, cond, cfg.flow, frames, steps=2, generator=torch.Generator().manual_seed(0))
    assert [s.shape[2] for s in segs] == [3, 3, 3]
    for prev, nxt in itertools.pairwise(segs):
        assert torch.equal(nxt[:, :, 0], prev[:, :, -1])
    assert stitch_latents(segs).shape[2] == 7
    torch.manual_seed(0)
    vae = VideoVAE.from_config(cfg.vae, None)
    video = decode_segments(vae, segs, frames)
    assert video.shape == (1, 3, frames, 16, 16)
    assert math.isfinite(float(video.abs().sum()))
