"""train/evaluate.py: the baselines and the metric, on the tiny random VAE."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from models.config import load_preset
from models.vae import VideoVAE
from train.evaluate import latent_psnr, still_reference


def _vae():
    torch.manual_seed(0)
    return VideoVAE.from_config(load_preset("tiny").vae, None)


def test_copy_reference_is_the_reference_held_still_through_the_vae():
    """The baseline of a clip that *is* its reference held still is that clip's latent, frame for frame (a
    repeated one-frame latent is not: the causal VAE encodes later frames in groups)."""
    vae = _vae()
    g = torch.Generator().manual_seed(1)
    refs = torch.randint(0, 256, (2, 3, 3, 32, 32), generator=g, dtype=torch.uint8)  # (B, R, 3, H, W)
    batch = SimpleNamespace(ref_images=refs, num_frames=9)
    still = refs[:, 0, :, None].expand(-1, -1, 9, -1, -1).float().div(127.5).sub(1.0)
    gt = vae.encode(still)
    out = still_reference(vae, batch)
    assert out.shape == gt.shape == (2, 16, 3, 4, 4)
    torch.testing.assert_close(out, gt)
    repeated = vae.encode(still[:, :, :1]).expand_as(gt)
    assert (latent_psnr(repeated, gt) < latent_psnr(out, gt) - 20).all()


def test_latent_psnr_halving_the_error_is_3_db():
    gt = torch.linspace(-1, 1, 64).view(1, 64).repeat(2, 1)
    noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    a, b = latent_psnr(gt + 0.1 * noise, gt), latent_psnr(gt + 0.1 * noise / 2 ** 0.5, gt)
    torch.testing.assert_close(b - a, torch.full((2,), 10 * torch.log10(torch.tensor(2.0)).item()), atol=1e-4, rtol=0)


def test_the_periodic_evaluation_scores_every_rank_and_leaves_training_alone(reference_zero3):
    """``train.eval.every=4`` in the ZeRO-3 reference run (2 ranks: every rank takes part in the sampler's
    forwards): rank 0 wrote the held-out scores at steps 4 and 8; the resume tests compare runs without the
    evaluation against this one bitwise, so it changed nothing of the training."""
    import json
    import math

    rows = [json.loads(line) for line in (reference_zero3 / "stage1" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        assert r["clips"] == 2
        for m in ("model", "copy_reference", "motion_dropped"):
            assert math.isfinite(r[f"latent_psnr_{m}"]) and r[f"denoise_mse_{m}"] > 0
        assert "pixel_psnr_model" not in r  # a random VAE: no pixel metrics
    assert list((reference_zero3 / "stage1" / "tb").iterdir())
