"""The micro-batch the loader yields: exactly what ``DreamActor.forward`` (models/dreamactor.py) and the
VAE need, named in the paper's words (sections 3.1-3.4).

All samples of a batch share one bucket (H, W), one clip length T and one reference count R. Pixel
tensors travel as uint8 (4x less worker-to-trainer traffic and pinned memory); :meth:`DreamActorBatch.conditions`
turns them into the model's float layouts on the device (one :class:`models.conditions.Conditions`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from models.conditions import Conditions
from models.vae import pixels_to_vae


@dataclass
class DreamActorBatch:
    """B clips of one bucket. Shapes: B batch, T frames, H x W bucket pixels, R references.

    ============== ========================== ======= =================================================
    key            shape                      dtype   meaning
    ============== ========================== ======= =================================================
    keys           list of B str                      clip keys (``preprocess.schema.clip_key``)
    epoch          (B,)                       int64   epoch of the sample's window
    video          (B, 3, T, H, W)            uint8   driving clip V_D = the target video, RGB
    ref_images     (B, R, 3, H, W)            uint8   references I_R: [primary ; yaw-sorted / half-body]
    ref_valid      (B, R)                     bool    False: slot repeats the primary (sample had fewer)
    skeleton_maps  (B, 3, T, H, W)            uint8   skeleton map of every frame (models.render)
    head_sphere_maps (B, 3, T, H, W)          uint8   head-sphere map of every frame (models.render)
    pose_maps      (B, 6, T, H, W)            uint8   None from the loader; a caller may give the concatenated
                                                      maps instead of the two above (synthetic batches)
    face_crops     (B, T, 3, 224, 224)        uint8   face crops of the driving frames; None if not loaded
    face_valid     (B, T)                     bool    a face was found in the frame
    body_valid     (B, T)                     bool    the main subject (body) was found in the frame
    head_valid     (B, T)                     bool    head parameters (sphere) exist for the frame
    drop_ref       (B,)                       bool    CFG dropout of the reference condition
    drop_motion    (B,)                       bool    CFG dropout of the motion condition (pose + face)
    frame_index    (B, T)                     int64   frames of the stored clip that were sampled
    fps            (B,)                       float32 frame rate of the sampled frames
    crop_transform (B, 3, 3)                  float32 stored-clip pixels -> bucket pixels (models.render)
    video_latents  (B, C, t, h, w)            float16 VAE latents from the latent cache (None when pixels are used;
                                                      then ``video`` and ``ref_images`` are None)
    ref_latents    (B, C, R, h, w)            float16 cached reference latents (None likewise)
    audio          (B, S)                     float32 mono 16 kHz audio in [-1, 1] under the T sampled frames
                                                      (sample 0 = the start of frame 0; T / fps[b] seconds);
                                                      S = max_b round(T * 16000 / fps[b]), zero-padded; None
                                                      when not loaded
    audio_samples  (B,)                       int64   valid samples of each row of ``audio`` (0: no audio)
    ============== ========================== ======= =================================================

    ``video`` and the maps are stored channel-last (``torch.channels_last_3d``: each pixel's channels
    together, as decoded and drawn), so the loader never transposes hundreds of MB on the CPU; copies to
    the GPU keep that format, and convolutions accept it.

    ``cursor`` and ``skips`` are the loader's bookkeeping (where the batch came from, samples skipped
    since the previous batch of the same worker); the trainer does not need them.
    """

    keys: list[str]
    epoch: torch.Tensor
    video: torch.Tensor | None
    ref_images: torch.Tensor | None
    ref_valid: torch.Tensor
    face_crops: torch.Tensor | None
    face_valid: torch.Tensor
    body_valid: torch.Tensor
    head_valid: torch.Tensor
    drop_ref: torch.Tensor
    drop_motion: torch.Tensor
    frame_index: torch.Tensor
    fps: torch.Tensor
    crop_transform: torch.Tensor
    skeleton_maps: torch.Tensor | None = None
    head_sphere_maps: torch.Tensor | None = None
    pose_maps: torch.Tensor | None = None
    video_latents: torch.Tensor | None = None
    ref_latents: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_samples: torch.Tensor | None = None
    cursor: dict = field(default_factory=dict)
    skips: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- shape

    @property
    def size(self) -> int:
        """Clips in the batch (B)."""
        return len(self.keys)

    @property
    def _maps(self) -> torch.Tensor:
        return self.skeleton_maps if self.pose_maps is None else self.pose_maps

    @property
    def num_frames(self) -> int:
        """Frames per clip (T)."""
        return int(self._maps.shape[2])

    @property
    def resolution(self) -> tuple[int, int]:
        """Bucket (H, W) in pixels."""
        return int(self._maps.shape[3]), int(self._maps.shape[4])

    def pose_map_tensor(self) -> torch.Tensor:
        """(B, 6, T, H, W) uint8: [skeleton ; head sphere], the pose encoder's input (paper 3.2), built on the
        batch's device (move the batch first)."""
        if self.pose_maps is not None:
            return self.pose_maps
        return torch.cat([self.skeleton_maps, self.head_sphere_maps], dim=1)

    @property
    def num_refs(self) -> int:
        """References per clip (R)."""
        return int(self.ref_valid.shape[1])

    # ---------------------------------------------------------------- moving

    def _tensors(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                yield f.name, v

    def pin_memory(self) -> DreamActorBatch:
        """Pin every tensor (called by the DataLoader's pin-memory thread)."""
        for name, v in self._tensors():
            setattr(self, name, v.pin_memory())
        return self

    def head(self, n: int) -> DreamActorBatch:
        """The first ``n`` clips (a new batch sharing the tensors' storage)."""
        out = replace(self, keys=self.keys[:n])
        for name, v in self._tensors():
            setattr(out, name, v[:n])
        return out

    def to(self, device, non_blocking: bool = True) -> DreamActorBatch:
        """Move every tensor to ``device`` (in place; returns self)."""
        for name, v in self._tensors():
            setattr(self, name, v.to(device, non_blocking=non_blocking))
        return self

    # ---------------------------------------------------------------- model layouts

    def video_pixels(self, dtype=torch.float32) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1]: the VAE's input for the target latents."""
        return pixels_to_vae(self.video, dtype)

    def ref_pixels(self, dtype=torch.float32) -> torch.Tensor:
        """(B * R, 3, 1, H, W) in [-1, 1]: each reference as a one-frame clip for the VAE; the latents
        reshape to ``ref_latents`` (B, C, R, h, w) with :meth:`refs_to_latent_layout`."""
        b, r, c, h, w = self.ref_images.shape
        return pixels_to_vae(self.ref_images.reshape(b * r, c, 1, h, w), dtype)

    def refs_to_latent_layout(self, z: torch.Tensor) -> torch.Tensor:
        """(B * R, C, 1, h, w) latents of :meth:`ref_pixels` -> (B, C, R, h, w)."""
        br, c, _, h, w = z.shape
        return z.reshape(self.size, br // self.size, c, h, w).permute(0, 2, 1, 3, 4)

    def conditions(self, ref_latents: torch.Tensor, dtype=torch.float32, use_face: bool = True) -> Conditions:
        """The model's conditions in its layouts: ``ref_latents`` (B, C, R, h, w) from the VAE or the
        precomputed latents, ``pose_maps`` in [0, 1], ``face_crops`` in [-1, 1] with ``face_valid`` (none when
        ``use_face`` is False or the batch has no crops). The dropout flags (``drop_ref``, ``drop_motion``)
        are the batch's own fields, passed beside them."""
        face = use_face and self.face_crops is not None
        return Conditions(ref_latents.to(dtype), self.pose_map_tensor().to(dtype).div_(255.0),
                          self.face_crops.to(dtype).div_(127.5).sub_(1.0) if face else None,
                          self.face_valid if face else None)
