"""What a denoising pass is conditioned on: the one carrier between a batch and :meth:`DreamActor.forward`.

Built by the data side (``train.data.DreamActorBatch.conditions``) or by hand (inference, benches, tests);
consumed by the model, the sampler (:mod:`models.flow`) and the evaluation. Layouts (B = batch; T = 1 + 4k
pixel frames, t = 1 + k latent frames; H, W pixels = 8 h, 8 w; R reference images):

- ``ref_latents`` (B, 16, R, h, w) the references, each VAE-encoded as a single frame
- ``pose_maps`` (B, 6, T, H, W) float in [0, 1]: [skeleton ; head sphere] from :mod:`models.render`
- ``face_crops`` (B, T, 3, 224, 224) RGB in [-1, 1]; ``face_valid`` (B, T) optional
- ``face_tokens`` (B, T, D) per-frame face motion tokens given directly (from the audio encoder) instead of
  face crops; optional
- ``cond_latents`` (B, 16, t, h, w) + ``cond_mask`` (B, t): latent frames given as Wan-I2V conditioning
  (segment continuation: the previous segment's last latent as frame 0); optional

The classifier-free-guidance dropout flags are not conditions but choices of the pass: they stay arguments
of the model call.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Conditions:
    """The conditions of a whole batch (see the module docstring for the layouts)."""

    ref_latents: torch.Tensor
    pose_maps: torch.Tensor
    face_crops: torch.Tensor | None = None
    face_valid: torch.Tensor | None = None
    cond_latents: torch.Tensor | None = None
    cond_mask: torch.Tensor | None = None
    face_tokens: torch.Tensor | None = None

    def repeat(self, n: int) -> Conditions:
        """The same conditions for ``n`` stacked copies of the batch."""
        return self._map(lambda x: torch.cat([x] * n))

    def samples(self, index) -> Conditions:
        """The conditions of some samples (``index``: a slice, indices or a mask over the batch)."""
        return self._map(lambda x: x[index])

    def pixel_frames(self, start: int, stop: int) -> Conditions:
        """Pixel frames [start, stop) of the per-frame controls (pose maps, face crops or tokens), padded by repeating
        the last frame where ``stop`` runs past them; continuation latents are dropped (they are per segment)."""
        def take(x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            if x is None:
                return None
            idx = torch.arange(start, stop, device=x.device).clamp(max=x.shape[dim] - 1)
            return x.index_select(dim, idx)

        return Conditions(self.ref_latents, take(self.pose_maps, 2), take(self.face_crops, 1), take(self.face_valid, 1),
                          face_tokens=take(self.face_tokens, 1))

    def replace(self, **changes) -> Conditions:
        """A copy with some fields replaced."""
        return dataclasses.replace(self, **changes)

    def _map(self, fn) -> Conditions:
        return Conditions(**{f.name: None if (x := getattr(self, f.name)) is None else fn(x)
                             for f in dataclasses.fields(self)})
