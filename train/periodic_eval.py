"""The evaluation during training (``train.eval.every``): the held-out scores of ``infer/evaluate.py`` on a fixed
small set, with few sampling steps, from the current weights.

- The set: the first ``train.eval.clips`` clips of the held-out split (``data.split``, role ``heldout``; the
  training loader reads the other side), fixed at the start of the run; with nothing held out
  (``heldout_percent=0``) a fixed set of training clips, said once in the log.
- Every ``every`` steps: latent PSNR and one-step denoising loss of the model, copy-the-reference and
  motion-dropped (``train.evaluate``); pixel PSNR / SSIM as well when a real VAE is configured
  (``model.weights.vae_dir``; a random VAE's pixels mean nothing). Written to ``eval.jsonl`` and TensorBoard
  (``eval/*``), with a strip [ground truth | model] of the first clip.
- Every rank runs the same passes on the same clips (under ZeRO-3 a forward gathers every rank's shards); rank 0
  writes. The training generators are saved before and restored after (also around building the set), so a run
  with the evaluation trains exactly as one without it, and a resume stays exact.
"""
from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch

from models.vae import frames_uint8

from .distributed import rng_state, set_rng_state

log = logging.getLogger(__name__)


def fixed_eval_set(job, is_main: bool, clips: int) -> list:
    """The first ``clips`` clips of the held-out split (``data.split``, role ``heldout``; with nothing held out, of
    the training clips, said once), without condition dropout, read once (call between saving and restoring the
    generators)."""
    from train.data import build_loader

    data = copy.deepcopy(job.data)
    if data.split.heldout_percent > 0:
        data.split.role = "heldout"
    elif is_main:
        log.warning("train.eval: data.split.heldout_percent is 0, nothing is held out: the periodic evaluation "
                    "scores %d fixed training clips", clips)
    data.dropout.ref = data.dropout.motion = 0.0
    data.refs.primary_outside_window = True
    data.workers.num_workers = 0
    data.latents = False  # pixels: the metrics compare decoded frames with the clip's (same plan either way)
    data.shuffle.buffer = 1
    loader = build_loader(data, job.model, rank=0, world_size=1, seed=job.train.seed)
    batches, n = [], 0
    for b in loader:
        if int(b.epoch.max()) > 0 or n >= clips:
            break
        batches.append(b.head(min(b.size, clips - n)))
        n += batches[-1].size
    if not batches:
        raise RuntimeError(f"train.eval: no clip in the evaluation set of {data.source.dataset}")
    return batches


class PeriodicEval:
    """See the module docstring."""

    def __init__(self, job, dist, vae, dtype):
        self.job, self.dist, self.vae, self.dtype = job, dist, vae, dtype
        e = job.train.eval
        self.every, self.steps = e.every, e.steps
        self.pixels = job.model.weights.vae_dir is not None
        state = rng_state()
        try:
            self.batches = fixed_eval_set(job, dist.is_main, e.clips)
        finally:
            set_rng_state(state)

    @torch.no_grad()
    def run(self, model, logger, step: int) -> dict:
        """Score the current weights; returns the record rank 0 wrote."""
        from .evaluate import evaluate_latents

        t0 = time.perf_counter()
        state = rng_state()
        strip, pix = [], {"model": [], "copy_reference": [], "motion_dropped": []}

        def on_batch(batch, gt, out):
            if not strip:
                strip.append(torch.cat([self.vae.decode(gt[:1].float()), self.vae.decode(out["model"][:1].float())],
                                       dim=-1)[0])
            if self.pixels:  # the video metrics library (infer/metrics.py imports nothing of train/)
                from infer.metrics import psnr_frames, ssim_frames

                truth = batch.video_pixels()
                for m, x in out.items():
                    video = self.vae.decode(x.float())
                    for i in range(batch.size):
                        g, v = frames_uint8(truth[i]), frames_uint8(video[i])
                        pix[m].append((psnr_frames(v, g, "clean").mean(), ssim_frames(v, g, "clean").mean()))

        try:
            scores = evaluate_latents(model, self.vae, self.batches, steps=self.steps, seed=self.job.train.seed,
                                      dtype=self.dtype, use_face=self.job.stage.use_face, on_batch=on_batch)
        finally:
            set_rng_state(state)
        s = scores.summary()
        record = {"clips": s["clips"], "seconds": round(time.perf_counter() - t0, 2)}
        for m, v in s["mean_psnr_db"].items():
            record[f"latent_psnr_{m}"] = v
            record[f"denoise_mse_{m}"] = s["denoise_mse"][m]
        for b, v in s["model_minus_baseline_db"].items():
            record[f"model_minus_{b}_db"] = v
        for m, rows in pix.items():
            if rows:
                record[f"pixel_psnr_{m}"] = float(np.mean([r[0] for r in rows]))
                record[f"pixel_ssim_{m}"] = float(np.mean([r[1] for r in rows]))
        if self.dist.is_main:
            logger.scalars(step, record)
            if strip:
                frames = frames_uint8(strip[0])
                logger.image("eval/ground_truth_vs_model", frames[:: max(1, len(frames) // 4)].reshape(
                    -1, *frames.shape[2:]), step)
            log.info("eval at step %d: latent PSNR model %.2f, copy-the-reference %.2f, motion dropped %.2f dB "
                     "(%d clips, %.1f s)", step, record["latent_psnr_model"], record["latent_psnr_copy_reference"],
                     record["latent_psnr_motion_dropped"], record["clips"], record["seconds"])
        return record
