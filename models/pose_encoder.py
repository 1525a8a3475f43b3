"""Pose encoder E_p (paper 3.2): [skeleton ; head-sphere] maps -> features on the VAE latent grid.

Each frame goes through a 2D conv stack that compresses space by the VAE's spatial factor (one stride-2
stage per factor of 2). Time is compressed the way the causal VAE does it: the first frame alone,
then groups of ``temporal_compression`` frames; the first frame's features are repeated in front so
every latent frame sees a full group, stacked along channels and mixed by a conv. The output is
concatenated with the noisy latent along channels and projected to the noise tokens (``DiT.pose_embed``).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PoseEncoderConfig


class PoseEncoder(nn.Module):
    """(B, in_channels, T, H, W) maps in [0, 1] -> (B, out_channels, 1 + (T-1)/tc, H/s, W/s).

    ``channels_last`` (default): the per-frame convs run on NHWC activations, the layout cuDNN's convolutions use
    on GPUs, so no NCHW <-> NHWC conversion runs around each of them (the full-resolution stage is the widest
    tensor of the whole model outside the DiT). The result is the same function (tests/models/test_encoders.py).
    """

    channels_last = True

    def __init__(self, cfg: PoseEncoderConfig, temporal_compression: int, spatial_compression: int):
        super().__init__()
        ch = list(cfg.channels)
        if 2 ** (len(ch) - 1) != spatial_compression:
            raise ValueError(f"pose_encoder.channels needs {int(math.log2(spatial_compression)) + 1} entries "
                             f"(one full-resolution stage + one per 2x of the VAE's {spatial_compression}x)")
        self.tc = temporal_compression
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        for c_in, c_out in itertools.pairwise(ch):
            self.down.append(nn.ModuleList([nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                                            nn.Conv2d(c_out, c_out, 3, padding=1)]))
        self.temporal = nn.Conv3d(ch[-1] * self.tc, cfg.out_channels, (1, 3, 3), padding=(0, 1, 1))
        self.conv_out = nn.Conv3d(cfg.out_channels, cfg.out_channels, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Encode control maps; T must be 1 + k * temporal_compression."""
        b, c, t, h, w = maps.shape
        if (t - 1) % self.tc:
            raise ValueError(f"pose maps have {t} frames; need 1 + k*{self.tc} (the VAE's causal layout)")
        x = maps.to(self.conv_in.weight.dtype)
        if self.channels_last:  # one copy straight into (B*T, H, W, C) memory, seen as NCHW with NHWC strides
            x = x.permute(0, 2, 3, 4, 1).reshape(b * t, h, w, c).permute(0, 3, 1, 2)
        else:
            x = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.silu(self.conv_in(x))
        for down, conv in self.down:
            x = F.silu(conv(F.silu(down(x))))
        x = x.reshape(b, t, *x.shape[1:])
        x = torch.cat([x[:, :1].expand(-1, self.tc - 1, -1, -1, -1), x], dim=1)
        x = x.reshape(b, (t + self.tc - 1) // self.tc, self.tc * x.shape[2], *x.shape[3:]).transpose(1, 2)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.conv_out(F.silu(self.temporal(x)))
