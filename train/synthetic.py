"""Made-up training batches without shards, for benches and tests: talking clips whose face and audio agree.

:func:`talking_batch`: each clip has a loudness envelope ``e(t)`` in [0, 1] made of syllable-like bumps (about 4 a
second, as in speech); the audio is a voiced tone (a random pitch and three harmonics) of amplitude ``e(t)``, and
the face crop of frame k is a drawn face whose mouth opens by ``e`` at the frame's centre time. So the face motion
encoder's tokens of the crops are a function of the audio, which the audio stage can learn in a few dozen CPU
steps (tests/train/test_audio_stage.py), and the baselines have a known order: a clip's own audio explains its
mouth; silence (a closed mouth) or another clip's audio does not.
"""
from __future__ import annotations

import numpy as np
import torch

from models.audio_encoder import SAMPLE_RATE
from train.data.batch import DreamActorBatch


def envelope(rng: np.random.Generator, seconds: float, rate_hz: float = 4.0) -> callable:
    """A loudness envelope ``e(t)`` (t in seconds, array) of syllable bumps: Gaussian bumps of random height
    about ``rate_hz`` a second, with pauses."""
    n = max(1, int(np.ceil(seconds * rate_hz)) + 1)
    centres = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / rate_hz
    heights = rng.uniform(0.3, 1.0, n) * (rng.uniform(size=n) > 0.2)  # some syllables silent: pauses
    width = 0.2 / rate_hz  # the mouth closes between syllables

    def e(t: np.ndarray) -> np.ndarray:
        bumps = heights * np.exp(-0.5 * ((np.asarray(t)[..., None] - centres) / width) ** 2)
        return np.clip(bumps.sum(-1), 0.0, 1.0)

    return e


def voiced(rng: np.random.Generator, e, samples: int) -> np.ndarray:
    """(samples,) float32 audio in [-1, 1]: a tone with harmonics at a random pitch, amplitude ``e(t)``, plus a
    little noise."""
    t = np.arange(samples) / SAMPLE_RATE
    f0 = rng.uniform(110.0, 260.0)
    tone = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3, 4))
    x = 0.35 * e(t) * tone / 2.1 + 0.003 * rng.standard_normal(samples)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def face_crop(size: int, opening: float, shade: int) -> np.ndarray:
    """(size, size, 3) uint8: a drawn face, its mouth open by ``opening`` in [0, 1]."""
    import cv2

    img = np.full((size, size, 3), 40, np.uint8)
    c, r = size // 2, size * 0.42
    cv2.ellipse(img, (c, c), (int(r * 0.8), int(r)), 0, 0, 360, (shade, int(shade * 0.8), int(shade * 0.65)), -1)
    for dx in (-1, 1):
        cv2.circle(img, (int(c + dx * r * 0.35), int(c - r * 0.25)), max(1, int(r * 0.09)), (20, 20, 20), -1)
    mouth_h = max(1, int(round(r * (0.04 + 0.3 * opening))))
    cv2.ellipse(img, (c, int(c + r * 0.45)), (int(r * 0.35), mouth_h), 0, 0, 360, (90, 10, 20), -1)
    return img


def talking_batch(crop_size: int, batch: int = 4, frames: int = 17, fps=(25.0,), seed: int = 0,
                  face_dropout: float = 0.0, no_audio_rows: int = 0) -> DreamActorBatch:
    """A loader-shaped batch of ``batch`` talking clips of ``frames`` frames (face crops + audio; no video, no
    maps: the audio stage reads neither). Row b runs at ``fps[b % len(fps)]``; ``face_dropout`` of the frames have
    no face; the last ``no_audio_rows`` rows have no audio (``audio_samples`` 0)."""
    rng = np.random.default_rng(seed)
    rates = np.array([fps[b % len(fps)] for b in range(batch)], np.float32)
    lengths = np.round(frames * SAMPLE_RATE / rates).astype(np.int64)
    audio = np.zeros((batch, int(lengths.max())), np.float32)
    crops = np.zeros((batch, frames, crop_size, crop_size, 3), np.uint8)
    for b in range(batch):
        e = envelope(rng, frames / rates[b])
        audio[b, :lengths[b]] = voiced(rng, e, int(lengths[b]))
        shade = int(rng.integers(150, 230))
        centres = (np.arange(frames) + 0.5) / rates[b]
        crops[b] = np.stack([face_crop(crop_size, float(o), shade) for o in e(centres)])
    if no_audio_rows:
        lengths[batch - no_audio_rows:] = 0
        audio[batch - no_audio_rows:] = 0.0
    valid = rng.uniform(size=(batch, frames)) >= face_dropout
    ones = torch.ones(batch, frames, dtype=torch.bool)
    return DreamActorBatch(
        keys=[f"talking_{seed}_{b}" for b in range(batch)], epoch=torch.zeros(batch, dtype=torch.int64), video=None,
        ref_images=None, ref_valid=torch.ones(batch, 1, dtype=torch.bool),
        face_crops=torch.from_numpy(crops).permute(0, 1, 4, 2, 3).contiguous(), face_valid=torch.from_numpy(valid),
        body_valid=ones, head_valid=ones.clone(), drop_ref=torch.zeros(batch, dtype=torch.bool),
        drop_motion=torch.zeros(batch, dtype=torch.bool), frame_index=torch.arange(frames).repeat(batch, 1),
        fps=torch.from_numpy(rates), crop_transform=torch.eye(3).repeat(batch, 1, 1),
        audio=torch.from_numpy(audio), audio_samples=torch.from_numpy(lengths))


class TalkingLoader:
    """The trainer's loader interface over :func:`talking_batch`: batch ``i`` is made with seed ``seed + i``, and the
    cursor ``i`` is its state, so a resumed run gets the batches an uninterrupted one would."""

    def __init__(self, crop_size: int, seed: int = 0, **kwargs):
        self.crop_size, self.seed, self.kwargs, self.next = crop_size, seed, kwargs, 0

    def __iter__(self):
        while True:
            b = talking_batch(self.crop_size, seed=self.seed + self.next, **self.kwargs)
            self.next += 1
            yield b

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = int(state["next"])

    def skip_counts(self) -> dict[str, int]:
        return {}
