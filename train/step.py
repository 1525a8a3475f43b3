"""One flow-matching micro-step on a loader batch (paper 3.1, models/flow.py).

The frozen VAE encodes the driving clip and the references (unless the batch carries precomputed
latents); timesteps and noise come from a generator seeded by ``(seed, stage, step, micro-step, rank)``,
so they do not depend on anything a resume could change (and need no saved state); the condition-dropout
flags are the loader's. The loss is ``models.flow.flow_loss`` of the predicted velocity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.flow import add_noise, flow_loss, sample_sigmas, video_tokens
from models.vae import VideoVAE

from .config import TrainJob


def counter_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: distinct tuples give independent streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class MicroStep:
    """What one micro-step did (for throughput accounting)."""

    loss: torch.Tensor  # scalar, fp32, with grad
    samples: float  # of this rank: 1/N of the batch's under N-way sequence parallelism
    tokens: float  # DiT tokens (video + references) of the batch, likewise
    flops: float  # model FLOPs of forward + backward (models.flops), likewise


class FlowMatchingStep:
    """Batch -> loss through the DeepSpeed engine; holds the frozen VAE."""

    def __init__(self, job: TrainJob, vae: VideoVAE, device: torch.device, rank: int, sequence_parallel: int = 1):
        self.job = job
        self.vae = vae
        self.device = device
        self.rank = rank  # the data-parallel rank: the ranks of a sequence-parallel group draw the same noise
        self.sp = sequence_parallel  # ranks sharing each batch: this rank's share of its samples, tokens, FLOPs
        self.dtype = torch.bfloat16 if job.launch.precision == "bf16" else torch.float32
        self.use_face = job.stage.use_face

    def generator(self, step: int, micro: int) -> torch.Generator:
        """The timestep/noise generator of one micro-step of this rank."""
        g = torch.Generator(device=self.device)
        g.manual_seed(counter_seed(self.job.train.seed, self.job.stage.id, step, micro, self.rank))
        return g

    @torch.no_grad()
    def latents(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised fp32 latents of the driving clip (B, C, t, h, w) and of the references (B, C, R, h, w)."""
        if batch.video_latents is not None:
            return batch.video_latents.float(), batch.ref_latents.float()
        x0 = self.vae.encode(batch.video_pixels())
        refs = batch.refs_to_latent_layout(self.vae.encode(batch.ref_pixels()))
        return x0, refs

    def continuation(self, x0: torch.Tensor, g: torch.Generator):
        """Segment continuation (paper 4.1): long videos are made of segments, each started from the last
        latent of the previous one through the DiT's image-to-video channels. A ``train.continuation_prob``
        share of samples gets its own first latent frame there (cond_mask 1 on frame 0), the rest none,
        as for a first segment. Drawn from the micro-step's generator, so resume stays exact."""
        p = self.job.train.continuation_prob
        if p <= 0 or not self.job.model.dit.cond_channels:
            return None, None
        b, t = x0.shape[0], x0.shape[2]
        given = (torch.rand(b, generator=g, device=self.device) < p).float()
        mask = torch.zeros(b, t, device=self.device)
        mask[:, 0] = given
        return x0.to(self.dtype), mask

    def __call__(self, engine, batch, step: int, micro: int) -> MicroStep:
        """Forward the engine on ``batch`` and return the loss (the caller runs backward and step)."""
        model = engine.module
        batch = batch.to(self.device)
        x0, ref = self.latents(batch)
        g = self.generator(step, micro)
        b = x0.shape[0]
        n_video = video_tokens(model, x0)
        sigma = sample_sigmas(model.cfg.flow, b, n_video, device=self.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=torch.float32)
        xt, target = add_noise(x0, noise, sigma)
        cond = batch.conditions(ref, self.dtype, self.use_face)
        cond.cond_latents, cond.cond_mask = self.continuation(x0, g)
        velocity = engine(xt.to(self.dtype), sigma, cond, drop_ref=batch.drop_ref, drop_motion=batch.drop_motion,
                          use_face=self.use_face)
        loss = flow_loss(velocity, target)
        t, (h, w), r = batch.num_frames, batch.resolution, batch.num_refs
        p = model.cfg.dit.patch_size
        tokens = b * (n_video + r * (x0.shape[3] // p[1]) * (x0.shape[4] // p[2]))
        flops = model.flops_per_step(b, t, h, w, r, use_face=self.use_face)
        return MicroStep(loss, b / self.sp, tokens / self.sp, flops / self.sp)


def vae_seed(train_seed: int) -> int:
    """The seed a randomly initialised VAE (presets without weights) is built with: every rank, every restart and the
    latent-cache pass (``preprocess/latents.py seed=``) build the same one from the run's ``train.seed``."""
    return counter_seed(train_seed, 0xAE)


def build_vae(job: TrainJob, device: torch.device) -> VideoVAE:
    """The frozen VAE on ``device`` (a random init of the real architecture for presets without weights,
    seeded so that every rank and every restart gets the same one)."""
    from .distributed import seed_everything

    seed_everything(vae_seed(job.train.seed))
    return VideoVAE.from_config(job.model.vae, job.model.weights.vae_dir).to(device)
