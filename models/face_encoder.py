"""Face motion encoder E_f + MLP (paper 3.2): face crops -> one motion vector per frame -> face motion tokens.

The encoder is PD-FGC's motion encoder (Wang et al., CVPR 2023; the paper initialises E_f from it): a
FAN hourglass backbone (``FAN_use``) giving a 512-d feature, and heads for eyes (6), emotion (30) and
mouth (512). The motion vector is ``[eye ; emotion ; mouth]`` (548-d), the identity-free expression part;
PD-FGC's head-pose head is not used (head pose is carried by the head sphere).

Module names follow PD-FGC-inference's ``FanEncoder`` so its weights load as they are.

Expected weights file (``weights.pdfgc_path``): PD-FGC-inference's ``motion_model.pth``, a torch pickle
(or .safetensors) of a state dict with keys ``model.*`` (the FAN backbone, e.g.
``model.m0.b2_plus_1.conv3.weight``, ``model.fc.weight`` (512, 784)), ``to_mouth.{0,2,3}.*``,
``to_eye.{0,2,3}.*``, ``eye_embed.1.*`` (6, 512), ``to_emo.{0,2,3}.*``, ``emo_embed.1.*`` (30, 512).
Keys of the unused heads (``to_headpose``, ``headpose_embed``, ``mouth_embed``) and wrappers
(``module.``, ``net_motion.`` prefixes, a ``state_dict`` entry) are accepted and ignored.

Inputs: (B, T, 3, 224, 224) RGB in [-1, 1] (PD-FGC's convention). BatchNorm statistics and the
hourglass dropout stay in eval mode during training: face batches are small and ranks see different faces.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import FaceEncoderConfig
from .partitioned import assign, state_shapes

EYE_DIM, EMO_DIM = 6, 30
_PDFGC_PREFIXES = ("model.", "to_mouth.", "to_eye.", "eye_embed.", "to_emo.", "emo_embed.")


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's pre-activation residual block: three 3x3 convs of out/2, out/4, out/4 channels, concatenated."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv3x3(c_in, c_out // 2)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out // 2), _conv3x3(c_out // 2, c_out // 4)
        self.bn3, self.conv3 = nn.BatchNorm2d(c_out // 4), _conv3x3(c_out // 4, c_out - c_out // 2 - c_out // 4)
        self.downsample = None
        if c_in != c_out:
            self.downsample = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(True), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual of the concatenated conv outputs."""
        o1 = self.conv1(F.relu(self.bn1(x)))
        o2 = self.conv2(F.relu(self.bn2(o1)))
        o3 = self.conv3(F.relu(self.bn3(o2)))
        res = x if self.downsample is None else self.downsample(x)
        return torch.cat([o1, o2, o3], 1) + res


class HourGlass(nn.Module):
    """FAN hourglass of ``depth`` levels (max-pool down, bilinear up)."""

    def __init__(self, depth: int, c: int):
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)
        for level in range(depth, 0, -1):
            self.add_module(f"b1_{level}", ConvBlock(c, c))
            self.add_module(f"b2_{level}", ConvBlock(c, c))
            self.add_module(f"b3_{level}", ConvBlock(c, c))
        self.add_module("b2_plus_1", ConvBlock(c, c))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up1 = self.dropout(self._modules[f"b1_{level}"](x))
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        low = self._level(level - 1, low) if level > 1 else self._modules["b2_plus_1"](low)
        low = self._modules[f"b3_{level}"](low)
        return up1 + F.interpolate(low, size=up1.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All levels."""
        return self._level(self.depth, x)


class FANBackbone(nn.Module):
    """PD-FGC's ``FAN_use``: stem, one hourglass, 68 heatmaps -> stride-2 conv -> fc to a 512-d feature.

    ``channels_last`` (default): the convs, BatchNorms and pooling run on NHWC activations (cuDNN's native layout on
    GPUs: no conversion kernels around each conv); the same function."""

    channels_last = True

    def __init__(self, width: float, crop_size: int):
        super().__init__()
        c64, c128, c256 = (max(4, round(c * width)) for c in (64, 128, 256))
        self.feat_dim = max(8, round(512 * width))
        self.conv1 = nn.Conv2d(3, c64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(c64)
        self.conv2 = ConvBlock(c64, c128)
        self.conv3 = ConvBlock(c128, c128)
        self.conv4 = ConvBlock(c128, c256)
        self.m0 = HourGlass(4, c256)
        self.top_m_0 = ConvBlock(c256, c256)
        self.conv_last0 = nn.Conv2d(c256, c256, 1)
        self.bn_end0 = nn.BatchNorm2d(c256)
        self.l0 = nn.Conv2d(c256, 68, 1)
        self.bn5 = nn.BatchNorm2d(68)
        self.conv6 = nn.Conv2d(68, 1, 3, stride=2, padding=1)
        self.fc = nn.Linear((crop_size // 8) ** 2, self.feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, feat_dim)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        x = self.l0(F.relu(self.bn_end0(self.conv_last0(x))))
        x = self.conv6(F.relu(self.bn5(x)))
        return self.fc(F.relu(x.flatten(1)))


def _head(d: int) -> nn.Sequential:
    """PD-FGC's ``to_*`` feature head."""
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.BatchNorm1d(d), nn.Linear(d, d))


class FaceMotionEncoder(nn.Module):
    """Face crops (B, T, 3, S, S) in [-1, 1] -> face motion tokens (B * t, group, token_dim) for Face Attn.

    t = 1 + (T - 1) / group latent frames; each latent frame gets the tokens of the ``group`` pixel frames
    it covers (the first latent frame: frame 0 repeated, as the causal VAE does).
    """

    def __init__(self, cfg: FaceEncoderConfig, token_dim: int, group: int):
        super().__init__()
        self.cfg = cfg
        self.group = group
        self.model = FANBackbone(cfg.width, cfg.crop_size)
        d = self.model.feat_dim
        self.to_mouth = _head(d)
        self.to_eye, self.eye_embed = _head(d), nn.Sequential(nn.ReLU(), nn.Linear(d, EYE_DIM))
        self.to_emo, self.emo_embed = _head(d), nn.Sequential(nn.ReLU(), nn.Linear(d, EMO_DIM))
        self.motion_dim = EYE_DIM + EMO_DIM + d
        self.mlp = nn.Sequential(nn.Linear(self.motion_dim, cfg.mlp_hidden), nn.SiLU(),
                                 nn.Linear(cfg.mlp_hidden, token_dim))
        self.no_face = nn.Parameter(torch.zeros(token_dim))  # token of frames without a detected face
        self.slot_embed = nn.Parameter(torch.randn(group, token_dim) * 0.02)  # position inside a latent frame
        self.train()  # applies the frozen-BatchNorm rule from the start

    def train(self, mode: bool = True):
        """Train mode everywhere except BatchNorm statistics and dropout of the pretrained encoder."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)):
                m.eval()
        return self

    def motion_vectors(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, motion_dim): PD-FGC's [eye ; emotion ; mouth] expression features."""
        f = self.model(crops.to(self.model.conv1.weight.dtype))
        return torch.cat([self.eye_embed(self.to_eye(f)), self.emo_embed(self.to_emo(f)), self.to_mouth(f)], -1)

    def frame_tokens(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) crops -> (B, T, token_dim): E_f + MLP, one token per frame (what the audio encoder learns
        to produce, models/audio_encoder.py)."""
        b, t = crops.shape[:2]
        return self.mlp(self.motion_vectors(crops.flatten(0, 1))).unflatten(0, (b, t))

    def latent_layout(self, tokens: torch.Tensor, face_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame tokens (B, T, token_dim), from face crops or from audio, in the VAE's temporal layout for Face
        Attn: (B * t, group, token_dim); ``face_valid`` (B, T) False puts the no-face token in a frame."""
        t = tokens.shape[1]
        if (t - 1) % self.group:
            raise ValueError(f"face motion tokens of {t} frames; need 1 + k*{self.group}")
        if face_valid is not None:
            tokens = torch.where(face_valid[..., None].bool(), tokens, self.no_face.to(tokens.dtype))
        tokens = torch.cat([tokens[:, :1].expand(-1, self.group - 1, -1), tokens], dim=1)
        tokens = tokens.unflatten(1, (-1, self.group)) + self.slot_embed.to(tokens.dtype)
        return tokens.flatten(0, 1)

    def forward(self, crops: torch.Tensor, face_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Face motion tokens grouped per latent frame; ``face_valid`` (B, T) marks frames with a face."""
        t = crops.shape[1]
        if (t - 1) % self.group:
            raise ValueError(f"face crops have {t} frames; need 1 + k*{self.group}")
        return self.latent_layout(self.frame_tokens(crops), face_valid)


def load_pdfgc_weights(encoder: FaceMotionEncoder, path: str | Path) -> None:
    """Load PD-FGC motion-encoder weights (format in the module docstring) into ``encoder``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"PD-FGC weights not found at {path}. Download motion_model.pth of PD-FGC-inference "
            "(github.com/Dorniwang/PD-FGC-inference) and set model.weights.pdfgc_path to it, or set it to null "
            "to start the face motion encoder from random weights.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "net_motion", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "net_motion."):
            k = k.removeprefix(prefix)
        if k.startswith(_PDFGC_PREFIXES):
            clean[k] = v
    own = {k: v for k, v in state_shapes(encoder).items()
           if k.startswith(_PDFGC_PREFIXES) and not k.endswith("num_batches_tracked")}
    missing = sorted(set(own) - set(clean))
    if missing:
        raise KeyError(f"{path}: not a PD-FGC motion encoder state dict, missing {len(missing)} keys, "
                       f"e.g. {missing[:5]}")
    bad = [k for k in own if tuple(clean[k].shape) != own[k]]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:5]} (face_encoder.width must be 1.0 and crop_size 224 "
                         "to load PD-FGC weights)")
    assign(encoder, clean, own)  # one module at a time: the encoder may be partitioned by ZeRO-3
