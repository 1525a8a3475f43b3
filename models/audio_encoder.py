"""Audio encoder E_a (paper 3.2: "an audio-driven encoder capable of mapping speech signals to face motion
tokens"): speech -> one face motion token per video frame, in the token space of the face motion encoder
(:mod:`models.face_encoder`), so that Face Attn takes either and a portrait can talk from a sound file.

Rows of 16 kHz mono audio in [-1, 1] (``SAMPLE_RATE``), each under a clip of T frames at its own frame rate:

1. Front end, 50 Hz features: a log-mel spectrogram computed in torch (``n_fft`` Hann windows every ``hop``
   samples, ``n_mels`` HTK mel bands, in fp32) and two 1-D convolutions, the second of stride 2
   (``frontend=mel``); or the hidden states of a wav2vec 2.0 / HuBERT model loaded with ``transformers`` from
   ``weights.audio_backbone_dir``, kept frozen, projected to ``width`` (``frontend=pretrained``).
2. Conformer blocks (Gulati et al. 2020): feed-forward halves around self-attention limited to
   +-``context_s`` seconds and a depthwise convolution. No absolute position anywhere: the encoder is the same
   at every offset, so a minute of speech at inference behaves like the training clips, and
   :meth:`AudioEncoder.forward` encodes long audio in chunks whose results are exactly those of one pass.
3. Frame pooling (:func:`frame_weights`): frame k of row b spans ``[k, k + 1) / fps[b]`` seconds; it averages
   the features overlapping that span, weighted by the overlap. Rows of different frame rates share the
   encoder, and frame k of the tokens lies under frame k of the video.
4. Head: LayerNorm + Linear to the token width (``dit.dim``).

Output: frame tokens (B, T, dim), the per-frame tokens that :meth:`FaceMotionEncoder.latent_layout` puts into
the VAE's temporal layout (exactly as the face motion encoder's), and (B, T) bool: the frame has audio under it
(``audio_samples`` covers the frame's centre). A row with ``audio_samples == 0`` has none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.schema import AUDIO_RATE as SAMPLE_RATE  # the batch's audio rate (DreamActorBatch.audio)

from .config import AudioEncoderConfig

FEATURE_STRIDE = 320  # samples per 50 Hz feature: 2 mel hops of 160, or the wav2vec 2.0 / HuBERT conv stack
MEL_FLOOR = 1e-5  # log(mel + floor): silence is a finite constant


@dataclass
class SpeechClip:
    """The audio stage's input: B rows of audio under clips of ``num_frames`` frames (train.data's batch fields)."""

    audio: torch.Tensor  # (B, S) float mono at SAMPLE_RATE in [-1, 1]; sample 0 = the start of frame 0
    audio_samples: torch.Tensor  # (B,) int64 valid samples per row (0: no audio)
    fps: torch.Tensor  # (B,) frame rate of the clip's frames
    num_frames: int  # T
    face_crops: torch.Tensor | None = None  # (B, T, 3, S, S) in [-1, 1]: the teacher's input
    face_valid: torch.Tensor | None = None  # (B, T) bool


class AudioTokens(NamedTuple):
    """The audio stage's output (a tuple: DeepSpeed hooks the tensors of a forward's tuple output)."""

    pred: torch.Tensor  # (B, T, dim) the audio encoder's frame tokens
    target: torch.Tensor | None  # (B, T, dim) the face motion encoder's frame tokens of the clip's face crops
    mask: torch.Tensor  # (B, T) bool: frames that count (audio under the frame, and a face when there is a target)


# ----------------------------------------------------------------------------- 1. the front end


def hz_to_mel(f: float) -> float:
    """HTK mel scale."""
    return 2595.0 * math.log10(1.0 + f / 700.0)


@lru_cache(maxsize=8)
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK mel filters, fp32 on the CPU (not a buffer: DeepSpeed's bf16 would
    round it)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    lo, mid, hi = hz[:-2], hz[1:-1], hz[2:]
    up = (freqs[:, None] - lo) / (mid - lo)
    down = (hi - freqs[:, None]) / (hi - mid)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


def log_mel(audio: torch.Tensor, n_fft: int, hop: int, n_mels: int) -> torch.Tensor:
    """(B, S) audio -> (B, n_mels, S // hop + 1) natural-log mel power; frame n is centred on sample n * hop
    (zero padding at both ends). Always fp32, whatever the autocast or module dtype."""
    x = audio.float()
    with torch.autocast(x.device.type, enabled=False):
        window = torch.hann_window(n_fft, device=x.device, dtype=torch.float32)
        spec = torch.stft(x, n_fft, hop, window=window, center=True, pad_mode="constant", return_complex=True)
        power = spec.real.square() + spec.imag.square()  # (B, n_fft // 2 + 1, frames)
        mel = torch.einsum("bfn,fm->bmn", power, mel_filterbank(n_fft, n_mels).to(x.device))
        return torch.log(mel + MEL_FLOOR)


class MelFrontEnd(nn.Module):
    """Log-mel spectrogram (100 Hz) -> two convolutions, the second of stride 2 -> (B, N, width) at 50 Hz.

    Feature m is centred on sample ``m * FEATURE_STRIDE`` (offset 0)."""

    offset = 0.0

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        if 2 * cfg.hop != FEATURE_STRIDE:
            raise ValueError(f"model.audio_encoder.hop must be {FEATURE_STRIDE // 2} (50 Hz features), got {cfg.hop}")
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.width, 3, padding=1)
        self.conv2 = nn.Conv1d(cfg.width, cfg.width, 3, stride=2, padding=1)

    def forward(self, audio: torch.Tensor, audio_samples: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, N, width), N = ceil((S // hop + 1) / 2). Samples past ``audio_samples`` are zeroed."""
        c = self.cfg
        audio = audio * valid_mask(audio_samples, audio.shape[1]).to(audio.dtype)
        # a fixed affine keeps loudness in the features (a per-frame norm would remove it): mouth opening needs it
        mel = (log_mel(audio, c.n_fft, c.hop, c.n_mels) + 5.0) / 5.0
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        return F.gelu(self.conv2(x)).transpose(1, 2)


class PretrainedFrontEnd(nn.Module):
    """A frozen wav2vec 2.0 / HuBERT (``transformers.AutoModel`` of ``weights.audio_backbone_dir``): its last
    hidden states (50 Hz: feature m covers samples [320 m, 320 m + 400), centre 320 m + 200) -> Linear to width.

    The architecture comes from the directory's ``config.json`` when the model is built; the weights are loaded by
    :meth:`load_weights` (``DreamActor.load_pretrained``), or arrive with an export of a trained model."""

    offset = 200.0

    def __init__(self, cfg: AudioEncoderConfig, backbone_dir: str | None):
        super().__init__()
        from .partitioned import whole_construction

        self.dir = _backbone_dir(backbone_dir)
        transformers = _transformers()
        config = transformers.AutoConfig.from_pretrained(str(self.dir))
        with whole_construction():  # wav2vec 2.0's weight-normed conv cannot be built partitioned under ZeRO-3
            self.backbone = transformers.AutoModel.from_config(config)
        self.backbone.requires_grad_(False)
        self.proj = nn.Linear(config.hidden_size, cfg.width)

    def load_weights(self) -> None:
        """The backbone's pretrained weights from its directory (one module at a time: may be ZeRO-3 partitioned)."""
        from .partitioned import assign, state_shapes

        loaded = _transformers().AutoModel.from_pretrained(str(self.dir)).state_dict()
        own = state_shapes(self.backbone)
        missing = [k for k in own if k not in loaded or tuple(loaded[k].shape) != own[k]]
        if missing:
            raise KeyError(f"model.weights.audio_backbone_dir={self.dir}: the weights lack or misshape {missing[:5]}")
        assign(self.backbone, loaded, own)

    def train(self, mode: bool = True):
        """The frozen backbone stays in eval mode (no dropout, no masking of time steps)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, audio: torch.Tensor, audio_samples: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, N, width); each row normalised to zero mean and unit variance over its valid samples
        (what wav2vec 2.0's feature extractor does)."""
        mask = valid_mask(audio_samples, audio.shape[1]).to(torch.float32)
        x = audio.float() * mask
        n = mask.sum(1, keepdim=True).clamp(min=1.0)
        mean = x.sum(1, keepdim=True) / n
        var = ((x - mean) * mask).square().sum(1, keepdim=True) / n
        x = (x - mean) / torch.sqrt(var + 1e-7) * mask
        dtype = next(self.backbone.parameters()).dtype
        with torch.no_grad():
            h = self.backbone(x.to(dtype), attention_mask=mask.long()).last_hidden_state
        return self.proj(h.to(self.proj.weight.dtype))


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("model.audio_encoder.frontend=pretrained needs the transformers package (pip install "
                          "transformers); frontend=mel needs nothing more") from None
    return transformers


def _backbone_dir(path: str | None) -> Path:
    if path is None:
        raise FileNotFoundError("model.audio_encoder.frontend=pretrained but model.weights.audio_backbone_dir is not "
                                "set: pass e.g. model.weights.audio_backbone_dir=/ckpt/wav2vec2-base-960h (a "
                                "transformers directory with config.json and the weights), or frontend=mel")
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.weights.audio_backbone_dir={p}: no config.json there; it must be a "
                                "transformers wav2vec 2.0 / HuBERT directory (config.json + model.safetensors or "
                                "pytorch_model.bin), e.g. facebook/wav2vec2-base-960h saved with save_pretrained")
    return p


def valid_mask(audio_samples: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: sample index < audio_samples of its row."""
    return torch.arange(length, device=audio_samples.device)[None] < audio_samples[:, None]


def num_features(samples: int) -> int:
    """50 Hz features of ``samples`` samples (the mel front end's count; a pretrained one may give fewer)."""
    return (samples // (FEATURE_STRIDE // 2) + 1 + 1) // 2


# ----------------------------------------------------------------------------- 2. Conformer


class FeedForward(nn.Module):
    """LayerNorm -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.SiLU(),
                                 nn.Linear(mult * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, width) -> (B, N, width)."""
        return self.net(x)


class ConvModule(nn.Module):
    """Conformer convolution: pointwise + GLU, depthwise over time, a per-step LayerNorm (BatchNorm in the paper;
    batch or sequence statistics would make a step depend on far-away audio), SiLU, pointwise. Padded steps are
    zeroed before the depthwise convolution so they never leak in."""

    def __init__(self, width: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.pointwise1 = nn.Conv1d(width, 2 * width, 1)
        self.depthwise = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=width)
        self.norm2 = nn.LayerNorm(width)
        self.pointwise2 = nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, N, width), valid (B, N) -> (B, N, width)."""
        h = F.glu(self.pointwise1(self.norm(x).transpose(1, 2)), dim=1)
        h = h * valid[:, None].to(h.dtype)
        h = F.silu(self.norm2(self.depthwise(h).transpose(1, 2)))
        return self.pointwise2(h.transpose(1, 2)).transpose(1, 2)


class ConformerBlock(nn.Module):
    """Macaron block: x + FF/2, + local self-attention, + convolution, + FF/2, LayerNorm."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        w = cfg.width
        self.heads = cfg.num_heads
        self.ff1 = FeedForward(w, cfg.ffn_mult)
        self.norm_attn = nn.LayerNorm(w)
        self.qkv = nn.Linear(w, 3 * w)
        self.out = nn.Linear(w, w)
        self.conv = ConvModule(w, cfg.conv_kernel)
        self.ff2 = FeedForward(w, cfg.ffn_mult)
        self.norm_out = nn.LayerNorm(w)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, N, width); ``attn_mask`` (B, 1, N, N) bool (True: may attend); ``valid`` (B, N)."""
        x = x + 0.5 * self.ff1(x)
        q, k, v = self.qkv(self.norm_attn(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.out(a.transpose(1, 2).flatten(2))
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x)


def local_attention_mask(valid: torch.Tensor, reach: int) -> torch.Tensor:
    """(B, 1, N, N) bool: query i may attend key j when |i - j| <= reach and j is valid (and always itself, so
    that no row is empty)."""
    n = valid.shape[1]
    idx = torch.arange(n, device=valid.device)
    band = (idx[:, None] - idx[None]).abs() <= reach
    return ((band[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=valid.device))[:, None]


# ----------------------------------------------------------------------------- 3. frames


def frame_weights(num_features: int, offset: float, audio_samples: torch.Tensor, fps: torch.Tensor,
                  num_frames: int) -> torch.Tensor:
    """(B, T, N) pooling weights: how many samples feature m (centred on ``offset + m * FEATURE_STRIDE``, one
    stride wide, cut at the row's last valid sample) shares with frame k of row b (``[k, k + 1) * rate / fps[b]``),
    normalised over m; a frame that no feature reaches has none."""
    dev = audio_samples.device
    m = torch.arange(num_features, device=dev, dtype=torch.float64)
    f0 = (offset + (m - 0.5) * FEATURE_STRIDE)[None].clamp(min=0.0)  # (1, N)
    f1 = torch.minimum((offset + (m + 0.5) * FEATURE_STRIDE)[None], audio_samples[:, None].double())  # (B, N)
    spf = SAMPLE_RATE / fps.double()  # samples per frame, (B,)
    k = torch.arange(num_frames, device=dev, dtype=torch.float64)
    s0, s1 = k[None] * spf[:, None], (k[None] + 1) * spf[:, None]  # (B, T)
    overlap = (torch.minimum(s1[:, :, None], f1[:, None]) - torch.maximum(s0[:, :, None], f0[:, None])).clamp(min=0)
    return (overlap / overlap.sum(-1, keepdim=True).clamp(min=1e-9)).float()


def frames_with_audio(audio_samples: torch.Tensor, fps: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, T) bool: the audio covers the frame's centre (no audio, ``audio_samples == 0``: no frame)."""
    k = torch.arange(num_frames, device=audio_samples.device, dtype=torch.float64)
    centre = (k[None] + 0.5) * SAMPLE_RATE / fps.double()[:, None]
    return centre < audio_samples.double()[:, None]


# ----------------------------------------------------------------------------- the encoder


class AudioEncoder(nn.Module):
    """16 kHz audio (B, S) -> frame tokens (B, T, token_dim) + (B, T) audio-present mask; see the module docstring."""

    def __init__(self, cfg: AudioEncoderConfig, token_dim: int, backbone_dir: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.frontend = MelFrontEnd(cfg) if cfg.frontend == "mel" else PretrainedFrontEnd(cfg, backbone_dir)
        self.blocks = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, token_dim)
        self.reach = max(1, round(cfg.context_s * SAMPLE_RATE / FEATURE_STRIDE))  # features each side

    @property
    def receptive_field(self) -> int:
        """Features each side that can change one output feature of the Conformer stack."""
        return self.cfg.num_layers * (self.reach + self.cfg.conv_kernel // 2)

    def load_pretrained(self) -> None:
        """The pretrained backbone's weights (``frontend=pretrained``); nothing for ``mel``."""
        if isinstance(self.frontend, PretrainedFrontEnd):
            self.frontend.load_weights()

    def features(self, audio: torch.Tensor, audio_samples: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(B, N, width) Conformer features at 50 Hz. ``chunk``: run the Conformer over windows of this many
        features, each with ``receptive_field`` features of context on both sides (the same result as one pass,
        with attention memory bounded by the window: for long audio at inference)."""
        x = self.frontend(audio, audio_samples)
        valid = torch.arange(x.shape[1], device=x.device)[None] * FEATURE_STRIDE + self.frontend.offset
        valid = valid < audio_samples[:, None]
        n = x.shape[1]
        if chunk is None or n <= chunk:
            return self._blocks(x, valid)
        rf, parts = self.receptive_field, []
        for start in range(0, n, chunk):
            lo, hi = max(0, start - rf), min(n, start + chunk + rf)
            out = self._blocks(x[:, lo:hi], valid[:, lo:hi])
            parts.append(out[:, start - lo:start - lo + min(chunk, n - start)])
        return torch.cat(parts, dim=1)

    def _blocks(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = local_attention_mask(valid, self.reach)
        for block in self.blocks:
            x = block(x, mask, valid)
        return self.norm(x)

    def forward(self, audio: torch.Tensor, audio_samples: torch.Tensor, fps: torch.Tensor, num_frames: int,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Frame tokens (B, T, token_dim) of ``audio`` (B, S) under T = ``num_frames`` frames at ``fps`` (B,), and
        (B, T) bool: the frame has audio under it. ``audio_samples`` (B,): valid samples per row."""
        audio_samples = audio_samples.to(audio.device)
        feats = self.features(audio, audio_samples, chunk)
        w = frame_weights(feats.shape[1], self.frontend.offset, audio_samples, fps.to(audio.device), num_frames)
        tokens = self.head(torch.bmm(w.to(feats.dtype), feats))
        return tokens, frames_with_audio(audio_samples, fps.to(audio.device), num_frames)
