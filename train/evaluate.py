"""Self-driven reconstruction in the VAE's latent space: does the model follow the driving motion?

For each held-out clip the model animates the clip's own references with the clip's own controls (skeleton +
head sphere, face crops); the sampled clean latents are compared with the ground-truth latents of the clip.
Two baselines run on the same clips, references and noise:

- **copy-the-reference**: the primary reference held still for the clip's frames, through the VAE (a model
  that ignores motion and only reproduces the person scores this). Encoded as a still clip rather than the
  reference's one-frame latent repeated: the causal VAE encodes the first frame alone and later frames in
  groups of ``temporal_compression``, so a one-frame latent is a different kind of latent from the later ones
  (with a random VAE, on a clip that is its reference held still, the repeated one-frame latent scores > 20 dB
  below the clip's own latent: a baseline too weak to mean anything);
- **motion dropped**: the same model sampled on its classifier-free-guidance "no motion" branch
  (``models.flow.guided_velocity(motion=False)``): what the model makes of the reference alone.

A model whose motion conditioning works beats both. Beside the sampled latents, a low-variance check of the
same question: the flow-matching loss of one denoising step on the held-out clips at fixed noise levels
(``DENOISE_SIGMAS``, same noise for every method) with the motion conditions and with them dropped (the
copy-the-reference "model" predicts ``noise - reference``); a broken motion path makes the two equal.
Latent PSNR = ``10 log10(range^2 / MSE)`` per clip with
``range`` the ground-truth latent's max - min (one definition for the model and both baselines, so their
differences in dB are ratios of squared errors: 3 dB = half the error). Used by ``bench/learning.py`` (the
learning test) and meant for the periodic evaluation during training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from models.flow import add_noise, flow_loss, sample

METHODS = ("model", "copy_reference", "motion_dropped")
DENOISE_SIGMAS = (0.3, 0.6, 0.9)


def latent_psnr(x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) of (B, ...) latents against ground truth, peak = each sample's range."""
    x, gt = x.float().flatten(1), gt.float().flatten(1)
    mse = (x - gt).square().mean(1).clamp_min(1e-12)
    rng = gt.amax(1) - gt.amin(1)
    return 10 * torch.log10(rng.square() / mse)


@dataclass
class LatentScores:
    """Per-clip latent PSNR of the model and the baselines."""

    keys: list[str] = field(default_factory=list)
    psnr: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    denoise_mse: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})  # per batch

    def mean(self) -> dict[str, float]:
        """Mean PSNR per method."""
        return {m: float(np.mean(v)) if v else math.nan for m, v in self.psnr.items()}

    def margins(self) -> dict[str, float]:
        """Mean dB by which the model beats each baseline."""
        m = self.mean()
        return {b: m["model"] - m[b] for b in METHODS[1:]}

    def denoise_gain(self) -> dict[str, float]:
        """Relative reduction of the one-step denoising loss by the model against each baseline."""
        m = {k: float(np.mean(v)) if v else math.nan for k, v in self.denoise_mse.items()}
        return {b: 1.0 - m["model"] / m[b] for b in METHODS[1:]}

    def summary(self) -> dict:
        """JSON-ready: clips, means, margins and per-clip values."""
        return {"clips": len(self.keys), "mean_psnr_db": self.mean(), "model_minus_baseline_db": self.margins(),
                "denoise_mse": {k: float(np.mean(v)) if v else math.nan for k, v in self.denoise_mse.items()},
                "denoise_gain_vs_baseline": self.denoise_gain(),
                "per_clip": {"keys": self.keys, **self.psnr}}


@torch.no_grad()
def still_reference(vae, batch) -> torch.Tensor:
    """Latents (B, C, t, h, w) of each sample's primary reference held still for the clip's frames."""
    ref = batch.ref_images[:, 0].to(vae.mean.device)  # (B, 3, H, W) uint8
    still = ref[:, :, None].expand(-1, -1, batch.num_frames, -1, -1)
    return vae.encode(still.float().div(127.5).sub(1.0))


def evaluate_latents(model, vae, batches, *, steps: int, seed: int, dtype=torch.float32, use_face: bool = True,
                     guidance_ref: float | None = None, guidance_motion: float | None = None,
                     on_batch=None) -> LatentScores:
    """Score ``model`` and the baselines on loader batches (any device; moved to the model's).
    ``on_batch(batch, ground_truth_latents, {method: latents})`` sees every batch's results (pixel metrics)."""
    device = next(model.parameters()).device
    cfg = model.cfg.flow
    scores = LatentScores()
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            gt = vae.encode(batch.video_pixels())
            ref = batch.refs_to_latent_layout(vae.encode(batch.ref_pixels()))
            cond = batch.conditions(ref, dtype, use_face)
            g = torch.Generator(device=device).manual_seed(seed + i)
            noise = torch.randn(gt.shape, generator=g, device=device)
            kw = dict(steps=steps, guidance_ref=guidance_ref, guidance_motion=guidance_motion, use_face=use_face)
            out = {
                "model": sample(model, noise, cond, cfg, **kw),
                "copy_reference": still_reference(vae, batch),
                "motion_dropped": sample(model, noise, cond, cfg, motion=False, **kw),
            }
            for m, x in out.items():
                scores.psnr[m] += latent_psnr(x, gt).tolist()
            if on_batch is not None:
                on_batch(batch, gt, out)
            scores.keys += list(batch.keys)
            losses = {m: 0.0 for m in METHODS}
            for level in DENOISE_SIGMAS:
                eps = torch.randn(gt.shape, generator=g, device=device)
                sigma = torch.full((gt.shape[0],), level, device=device)
                xt, target = add_noise(gt, eps, sigma)
                for m, drop in (("model", False), ("motion_dropped", True)):
                    v = model(xt.to(dtype), sigma, cond, drop_motion=torch.full_like(sigma, drop, dtype=torch.bool),
                              use_face=use_face)
                    losses[m] += flow_loss(v, target).item() / len(DENOISE_SIGMAS)
                losses["copy_reference"] += flow_loss(eps - out["copy_reference"], target).item() / len(DENOISE_SIGMAS)
            for m, v in losses.items():
                scores.denoise_mse[m].append(v)
    finally:
        model.train(was_training)
    return scores
