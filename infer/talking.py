"""Animate from a sound file (paper 3.2 and Fig. 3: "facial motion signals being alternatively derivable from speech
inputs"): ``infer/run.py driving_audio=<wav | mp3 | video with audio>``.

- Face: the audio encoder of a stage-4 (``stage=audio``) export turns the speech into one face motion token per
  output frame (:func:`face_tokens_from_audio`), in place of the face motion encoder's tokens of driving faces.
- Body and head: from the driving video when one is given (played forwards and backwards when the audio is longer,
  :func:`pingpong`); else the reference's own pose held still, its head sphere swaying a little (a smooth,
  low-amplitude yaw and pitch: :func:`head_sway`), as a speaking head does (:func:`prepare_still`).
- Length and sound: the output has the audio's duration at the output frame rate (``video.fps``; the driving
  video's rate when there is one, else 25), and carries the audio track.

Audio is read with PyAV (:func:`read_audio`): the first audio stream of any file, resampled to 16 kHz, channels
averaged to mono.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from models.audio_encoder import SAMPLE_RATE
from preprocess.annotators.geometry import rotation_from_ypr, ypr_from_rotation

from .animate import (
    Driving,
    Export,
    InferError,
    Prepared,
    Settings,
    adjusted_joints,
    control_maps,
    prepare,
    prepare_references,
)
from .annotate import Annotations

log = logging.getLogger(__name__)

STILL_FPS = 25.0  # output rate without a driving video, unless video.fps says otherwise
# the fields of the reference's annotations that draw its pose (the still "driving" frames repeat them)
POSE_FIELDS = ("camera_K", "body_joints3d", "body_conf", "hand_joints3d", "hand_conf", "head_rotation", "head_center",
               "head_radius", "head_valid", "subject_box", "subject_valid")


def read_audio(path: str) -> np.ndarray:
    """(S,) float32 mono audio at 16 kHz of the first audio stream of ``path`` (the mean of its channels)."""
    import av

    from preprocess.video import ffmpeg_words

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise InferError(f"driving_audio {path}: the file has no audio stream")
            resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)  # channels kept: averaged below
            parts = [g.to_ndarray() for f in c.decode(c.streams.audio[0]) for g in resampler.resample(f)]
            parts += [g.to_ndarray() for g in resampler.resample(None)]
    except FileNotFoundError:
        raise InferError(f"driving_audio {path}: no such file") from None
    except (av.error.FFmpegError, OSError) as e:
        raise InferError(f"driving_audio {path}: not a readable audio or video file ({ffmpeg_words(e)})") from None
    if not parts:
        raise InferError(f"driving_audio {path}: no audio decodes")
    return np.clip(np.concatenate(parts, axis=1).mean(0), -1.0, 1.0).astype(np.float32)


def num_frames(audio: np.ndarray, fps: float, max_frames: int | None) -> int:
    """Output frames for the audio's duration at ``fps`` (at most ``max_frames``)."""
    n = max(1, int(math.floor(len(audio) / SAMPLE_RATE * fps + 1e-6)))
    return n if max_frames is None else min(n, max_frames)


@torch.no_grad()
def face_tokens_from_audio(exp: Export, audio: np.ndarray, fps: float, n: int, dtype) -> torch.Tensor:
    """(1, n, D) face motion tokens of ``n`` frames at ``fps`` from the audio encoder (long audio in chunks of 30 s
    of features: the same tokens as one pass, models/audio_encoder.py)."""
    model = exp.model
    if model.audio_encoder is None:
        raise InferError(f"{exp.weights_path}: these weights have no audio encoder; driving_audio needs the export "
                         "of the audio stage (torchrun ... train/run.py stage=audio, then checkpoint=<out_dir>/stage4/"
                         "export)")
    device = next(model.parameters()).device
    x = torch.from_numpy(audio)[None].to(device)
    tokens, _ = model.audio_encoder(x, torch.tensor([x.shape[1]], device=device), torch.tensor([fps], device=device),
                                    n, chunk=1500)
    return tokens.to(dtype)


def head_sway(n: int, fps: float, yaw_deg: float, pitch_deg: float, seed: int = 0) -> np.ndarray:
    """(n, 2) yaw and pitch offsets in degrees: each a sum of two slow sines (0.1-0.35 Hz, random phases from
    ``seed``) scaled to peak at most the given amplitude; zero amplitudes hold the head still."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fps
    out = np.zeros((n, 2))
    for j, amp in enumerate((yaw_deg, pitch_deg)):
        f = rng.uniform(0.1, 0.35, 2)
        wave = np.sin(2 * np.pi * f[0] * t + rng.uniform(0, 2 * np.pi)) + 0.5 * np.sin(
            2 * np.pi * f[1] * t + rng.uniform(0, 2 * np.pi))
        out[:, j] = amp * wave / 1.5
    return out


def still_annotations(ref: Annotations, sway: np.ndarray) -> Annotations:
    """The reference's pose in every one of ``len(sway)`` frames, its head rotated by ``sway`` (yaw, pitch)."""
    n = len(sway)
    arrays = {k: np.repeat(ref[k][:1], n, axis=0) for k in POSE_FIELDS if k in ref}
    if "head_rotation" in arrays:
        y, p, r = ypr_from_rotation(ref["head_rotation"][0])
        arrays["head_rotation"] = np.stack([rotation_from_ypr(y + dy, p + dp, r) for dy, dp in sway])
    return Annotations(arrays)


def prepare_still(exp: Export, annotator, reference, n: int, fps: float, s: Settings, sway_deg: tuple[float, float],
                  seed: int) -> Prepared:
    """The reference held in its own pose for ``n`` frames, its head swaying (no driving video)."""
    r = prepare_references(exp, annotator, reference, s)
    drive = still_annotations(r.ann[0], head_sway(n, fps, *sway_deg, seed=seed))
    body, hands = adjusted_joints(drive, r.ann[0], exp.cfg.render.min_confidence, enabled=False)
    maps = control_maps(drive, body, hands, r.transforms[0], r.size, r.radius_px, exp.cfg)
    frames = np.broadcast_to(r.crops[0][1], (n, *r.crops[0][1].shape))  # the side-by-side's "driving" column
    driving = Driving(None, frames, fps, fps, False)
    return Prepared(r.crops, r.ann, driving, drive, r.size, r.transforms[0], maps, r.radius_px, r.transforms)


def pingpong(n_src: int, n: int) -> np.ndarray:
    """``n`` indices into ``n_src`` frames: forwards, then backwards, and again (no jump where it turns)."""
    if n_src <= 1:
        return np.zeros(n, np.int64)
    period = 2 * (n_src - 1)
    k = np.arange(n) % period
    return np.where(k < n_src, k, period - k)


def prepare_driven(exp: Export, annotator, reference, driving_path: str, audio: np.ndarray,
                   s: Settings) -> tuple[Prepared, int]:
    """The driving video's body and head for the audio's duration (played back and forth when shorter); returns the
    preparation and its frame count."""
    prep = prepare(exp, annotator, reference, driving_path, Settings(**{**s.__dict__, "max_frames": None}))
    n = num_frames(audio, prep.driving.fps, s.max_frames)
    idx = pingpong(len(prep.maps), n)
    if n > len(prep.maps):
        log.info("the driving video (%d frames) is shorter than the audio (%d frames at %.3g fps): it plays back and "
                 "forth", len(prep.maps), n, prep.driving.fps)
    d = prep.driving
    driving = Driving(d.path, d.frames[idx], d.fps, d.source_fps, d.has_audio, d.damaged)
    return Prepared(prep.refs, prep.ref_ann, driving, prep.drive_ann, prep.size, prep.transform, prep.maps[idx],
                    prep.ref_radius_px, prep.ref_transforms), n
