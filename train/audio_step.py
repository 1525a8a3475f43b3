"""Stage 4 (``stage=audio``, paper 3.2's audio-driven encoder): one micro-step of the audio encoder learning the
face motion tokens, and its held-out token error against two baselines.

The frozen face motion encoder (+ its MLP) turns the clip's face crops into one token per frame: the teacher.
The audio encoder (models/audio_encoder.py) turns the clip's audio into one token per frame. The loss is their
mean squared difference over the frames that have a face (``face_valid``) and audio under them (a row with
``audio_samples == 0`` has none). No DiT, no VAE, no noise: the step draws nothing random, so a resume is exact
without a generator to restore. The DiT never runs in this stage: whether the audio tokens drive it as the face's
tokens do follows from matching them (the DiT was trained on the teacher's tokens in stages 2-3).

Metrics (:func:`token_errors`; logged by :class:`AudioEval` every ``train.eval.every`` steps, ``eval.jsonl``):
the token MSE and cosine similarity of the model and of two baselines, ``silence`` (the audio zeroed: what the
encoder predicts without speech) and ``shuffled`` (every clip given the next clip's audio: speech, but not this
face's). A model that learned the face from the voice beats both.
"""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F

from models.audio_encoder import AudioTokens, SpeechClip
from models.flops import audio_stage_flops

from .step import MicroStep

log = logging.getLogger(__name__)


def speech_clip(batch, dtype=torch.float32, audio: torch.Tensor | None = None,
                audio_samples: torch.Tensor | None = None) -> SpeechClip:
    """The audio stage's input of a loader batch (on its device): its audio (or ``audio`` / ``audio_samples`` given
    instead, for the baselines), frame rates, and face crops in [-1, 1] with ``face_valid``."""
    if batch.audio is None or batch.audio_samples is None:
        raise RuntimeError("stage audio: the batch has no audio (batch.audio is None): the loader must load the clips' "
                           "audio (stage.use_audio=true) from shards written with it")
    if batch.face_crops is None:
        raise RuntimeError("stage audio: the batch has no face crops (data.face_crops must be true)")
    return SpeechClip(batch.audio.float() if audio is None else audio,
                      batch.audio_samples if audio_samples is None else audio_samples, batch.fps.float(),
                      int(batch.face_crops.shape[1]), batch.face_crops.to(dtype).div(127.5).sub(1.0), batch.face_valid)


def token_loss(out: AudioTokens) -> torch.Tensor:
    """Mean squared error between the audio encoder's and the teacher's tokens over the frames of ``out.mask``
    (fp32; 0 with gradients through the prediction when no frame counts, so every rank still runs backward)."""
    err = (out.pred.float() - out.target.float()).square().mean(-1)
    m = out.mask.float()
    return (err * m).sum() / m.sum().clamp(min=1.0)


def token_sums(out: AudioTokens) -> torch.Tensor:
    """(3,) fp64 [sum of squared errors, sum of cosine similarities, frames] over ``out.mask`` (for averages over
    batches)."""
    m = out.mask
    p, t = out.pred.float()[m], out.target.float()[m]
    return torch.stack([(p - t).square().mean(-1).sum(), F.cosine_similarity(p, t, dim=-1).sum(),
                        torch.tensor(float(m.sum()), device=p.device)]).double()


def silenced(clip: SpeechClip) -> SpeechClip:
    """The clip with its audio zeroed (same length: every frame still counts)."""
    return dataclasses.replace(clip, audio=torch.zeros_like(clip.audio))


def shuffled(clips: list[SpeechClip]) -> list[SpeechClip]:
    """Every row of every clip given the audio of the next row over all of them (cyclically), cut or zero-padded to
    its own length: real speech, of another clip."""
    rows = [(c.audio[i], int(c.audio_samples[i])) for c in clips for i in range(c.audio.shape[0])]
    rows = rows[1:] + rows[:1]
    out = []
    for c in clips:
        audio, samples = torch.zeros_like(c.audio), torch.zeros_like(c.audio_samples)
        for i in range(c.audio.shape[0]):
            a, n = rows.pop(0)
            n = min(n, c.audio.shape[1])
            audio[i, :n] = a[:n]
            samples[i] = n
        out.append(dataclasses.replace(c, audio=audio, audio_samples=samples))
    return out


@torch.no_grad()
def token_errors(model, clips: list[SpeechClip]) -> dict[str, float]:
    """Token MSE and cosine similarity of ``model`` (a DreamActor with an audio encoder, or anything taking
    ``speech=``) on ``clips``, and of the silence and shuffled-audio baselines: ``{frames, mse_model, cos_model,
    mse_silence, ...}``. The frames that count are the clip's own (a face, and its own audio under the frame) for
    every variant."""
    own = [model(speech=c) for c in clips]
    rec = {"frames": int(sum(int(o.mask.sum()) for o in own))}
    for name, variant in (("model", None), ("silence", [silenced(c) for c in clips]), ("shuffled", shuffled(clips))):
        total = torch.zeros(3, dtype=torch.float64)
        for i, o in enumerate(own):
            pred = o.pred if variant is None else model(speech=variant[i]).pred
            total += token_sums(AudioTokens(pred, o.target, o.mask)).cpu()
        rec[f"mse_{name}"] = float(total[0]) / max(rec["frames"], 1)
        rec[f"cos_{name}"] = float(total[1]) / max(rec["frames"], 1)
    return rec


class AudioTokenStep:
    """Batch -> token loss through the DeepSpeed engine (stage 4); the trainer's step function for ``stage=audio``."""

    def __init__(self, job, device: torch.device):
        self.job, self.device = job, device
        self.dtype = torch.bfloat16 if job.launch.precision == "bf16" else torch.float32

    def __call__(self, engine, batch, step: int, micro: int) -> MicroStep:
        """Forward the engine on ``batch`` (``speech=``: the model's audio pass) and return the loss."""
        model = getattr(engine, "module", engine)
        batch = batch.to(self.device)
        clip = speech_clip(batch, self.dtype)
        loss = token_loss(engine(speech=clip))
        b, s = clip.audio.shape
        flops = audio_stage_flops(model.cfg, b, s, clip.num_frames)
        return MicroStep(loss, float(b), float(b * clip.num_frames), float(flops))


class AudioEval:
    """Every ``train.eval.every`` steps of stage 4: :func:`token_errors` on a fixed held-out set (as
    :class:`train.periodic_eval.PeriodicEval` chooses it), written to ``eval.jsonl`` and TensorBoard (``eval/*``).
    Every rank runs the passes (ZeRO-3 gathers in them); rank 0 writes."""

    def __init__(self, job, dist, dtype, batches: list | None = None):
        """``batches``: the fixed set (default: chosen from the held-out split, the generators left as they were)."""
        from .distributed import rng_state, set_rng_state
        from .periodic_eval import fixed_eval_set

        self.job, self.dist, self.dtype = job, dist, dtype
        self.batches = batches
        if batches is None:
            state = rng_state()
            try:
                self.batches = fixed_eval_set(job, dist.is_main, job.train.eval.clips)
            finally:
                set_rng_state(state)

    @torch.no_grad()
    def run(self, model, logger, step: int) -> dict:
        """Score the current weights; returns the record."""
        t0 = time.perf_counter()
        clips = [speech_clip(b.to(self.dist.device), self.dtype) for b in self.batches]
        rec = token_errors(model, clips)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        if self.dist.is_main:
            logger.scalars(step, rec)
            log.info("eval at step %d: token MSE model %.4g, silence %.4g, shuffled audio %.4g (%d frames, %.1f s)",
                     step, rec["mse_model"], rec["mse_silence"], rec["mse_shuffled"], rec["frames"], rec["seconds"])
        return rec
