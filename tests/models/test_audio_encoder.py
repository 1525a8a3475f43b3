"""The audio encoder (models/audio_encoder.py): the log-mel front end against known signals, frames placed by each
row's frame rate, a time shift of one frame shifting the tokens by one frame, long audio in chunks equal to one
pass, padding that never leaks in, its tokens entering Face Attn exactly as the face motion encoder's, its FLOPs,
and a clear message for a missing pretrained speech model."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models.audio_encoder import (
    FEATURE_STRIDE,
    SAMPLE_RATE,
    AudioEncoder,
    frame_weights,
    frames_with_audio,
    log_mel,
    mel_filterbank,
)
from models.conditions import Conditions
from models.config import ModelConfig, load_preset, preset_data
from models.dreamactor import DreamActor
from models.flops import audio_encoder_flops

from .conftest import random_batch


def _tone(freq: float, seconds: float, amp: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE), dtype=torch.float64) / SAMPLE_RATE
    return (amp * torch.sin(2 * np.pi * freq * t)).float()


def _speechy(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise under a syllable-rate envelope: different at every instant."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    env = 0.5 + 0.5 * torch.sin(2 * np.pi * 3.7 * torch.arange(n) / SAMPLE_RATE)
    return 0.2 * env * torch.randn(n, generator=g)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    cfg = load_preset("tiny")
    return AudioEncoder(cfg.audio_encoder, cfg.dit.dim).eval()


def test_log_mel_of_a_tone_peaks_in_its_band_and_follows_its_loudness():
    n_fft, hop, n_mels = 400, 160, 40
    centres = mel_filterbank(n_fft, n_mels).argmax(0) * SAMPLE_RATE / n_fft  # Hz of each band's peak
    for freq in (300.0, 1000.0, 3000.0):
        mel = log_mel(_tone(freq, 0.5)[None], n_fft, hop, n_mels)[0]
        assert mel.shape == (n_mels, int(0.5 * SAMPLE_RATE) // hop + 1)
        band = int(mel[:, 5:-5].mean(1).argmax())
        assert abs(centres[band] - freq) <= (centres[band + 1] - centres[band - 1]) / 2
    quiet, loud = (log_mel(_tone(1000.0, 0.5, a)[None], n_fft, hop, n_mels)[0] for a in (0.1, 0.2))
    strong = quiet > -2.0  # far above the floor: power x4 is +log(4)
    assert strong.sum() > 50
    torch.testing.assert_close(loud[strong] - quiet[strong], torch.full_like(loud[strong], np.log(4.0)), atol=1e-3,
                               rtol=0)


def test_frames_take_the_features_under_them_at_each_rows_frame_rate():
    n = 200  # 4 s of 50 Hz features
    fps = torch.tensor([25.0, 30.0, 24.0])
    samples = torch.tensor([4 * SAMPLE_RATE, 4 * SAMPLE_RATE, 2 * SAMPLE_RATE])
    w = frame_weights(n, 0.0, samples, fps, 60)
    centre_s = torch.arange(n, dtype=torch.float32) * FEATURE_STRIDE / SAMPLE_RATE
    pooled = w @ centre_s  # the time each frame hears, per row
    for b, rate in enumerate(fps.tolist()):
        covered = frames_with_audio(samples, fps, 60)[b]
        k = torch.arange(60)[covered][1:]  # frame 0 sees the first feature cut at t = 0
        torch.testing.assert_close(pooled[b, k], (k + 0.5) / rate, atol=FEATURE_STRIDE / SAMPLE_RATE / 4, rtol=0)
    has = frames_with_audio(samples, fps, 60)
    assert has[0].all() and has[1].all()  # 60 frames at 25 and 30 fps fit in 4 s
    assert has[2].sum() == 48 and not has[2, 48:].any()  # 2 s at 24 fps: 48 frames, the rest have none
    assert (w[2, 49:].sum(-1) == 0).all()
    assert not frames_with_audio(torch.tensor([0]), fps[:1], 10).any()  # no audio, no frame


def test_shifting_the_audio_by_one_frame_shifts_the_tokens_by_one_frame(encoder):
    audio = _speechy(6.0)
    spf = SAMPLE_RATE // 25  # 640 samples: one frame at 25 fps (two features)
    shifted = torch.cat([torch.zeros(spf), audio])[: len(audio)]
    n = torch.tensor([len(audio)])
    with torch.no_grad():
        a, _ = encoder(audio[None], n, torch.tensor([25.0]), 150)
        b, _ = encoder(shifted[None], n, torch.tensor([25.0]), 150)
    rf = encoder.receptive_field * FEATURE_STRIDE / spf  # frames of context: inner frames see no edge
    k = torch.arange(int(rf) + 2, 148 - int(rf))
    assert len(k) > 20
    torch.testing.assert_close(b[0, k + 1], a[0, k], atol=1e-4, rtol=1e-4)
    assert (b[0, k] - a[0, k]).abs().max() > 1e-2  # not a constant


def test_long_audio_in_chunks_is_one_pass_and_padding_never_leaks(encoder):
    audio = _speechy(8.0, seed=1)[None]
    n = torch.tensor([audio.shape[1]])
    with torch.no_grad():
        whole = encoder.features(audio, n)
        torch.testing.assert_close(encoder.features(audio, n, chunk=97), whole, atol=1e-5, rtol=1e-5)
        # a row padded with garbage past its audio_samples gives the tokens of the row alone
        short = 3 * SAMPLE_RATE + 123
        clean = torch.zeros(2, 4 * SAMPLE_RATE)
        clean[:, :short] = audio[0, :short]
        dirty = clean.clone()
        dirty[1, short:] = torch.randn(dirty.shape[1] - short)
        lengths = torch.tensor([short, short])
        t_clean, has = encoder(clean, lengths, torch.tensor([25.0, 25.0]), 100)
        t_dirty, _ = encoder(dirty, lengths, torch.tensor([25.0, 25.0]), 100)
    assert has.sum(1).tolist() == [75, 75]  # 3.0077 s: the centres of 75 frames at 25 fps
    torch.testing.assert_close(t_dirty[1, has[1]], t_clean[1, has[1]])


def test_audio_tokens_enter_face_attn_exactly_as_the_face_encoders(tiny_cfg):
    torch.manual_seed(0)
    model = DreamActor(tiny_cfg, audio=True).eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised branches (Face Attn's output) given values
            if not p.any():
                p.normal_(0, 0.1)
    b = random_batch(tiny_cfg, frames=9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 3] = False
    cond = Conditions(b["ref_latents"], b["pose_maps"], b["face_crops"], valid)
    with torch.no_grad():
        from_crops = model(b["noisy_latents"], b["timesteps"], cond)
        tokens = model.face_encoder.frame_tokens(b["face_crops"])
        given = cond.replace(face_crops=None, face_tokens=tokens)
        torch.testing.assert_close(model(b["noisy_latents"], b["timesteps"], given), from_crops)
        other = given.replace(face_tokens=tokens + 1.0)
        assert (model(b["noisy_latents"], b["timesteps"], other) - from_crops).abs().max() > 1e-4
    seg = given.pixel_frames(4, 9)  # segments take their frames of the tokens too
    assert torch.equal(seg.face_tokens, tokens[:, 4:9])


def test_flops_are_the_models_own(encoder):
    from torch.utils.flop_counter import FlopCounterMode

    ae = encoder.cfg
    for samples, frames in ((SAMPLE_RATE, 25), (12345, 17)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encoder(torch.randn(2, samples), torch.tensor([samples] * 2), torch.tensor([25.0, 30.0]), frames)
        dim = encoder.head.out_features
        assert counter.get_total_flops() == audio_encoder_flops(ae, dim, 2, samples, frames, attention=False)


def test_every_preset_has_an_audio_encoder_and_old_run_configs_get_it():
    for name in ("tiny", "small", "wan1_3b", "wan14b"):
        ae = load_preset(name).audio_encoder
        assert ae.frontend == "mel" and ae.width % ae.num_heads == 0 and 2 * ae.hop == FEATURE_STRIDE
    data = preset_data("wan1_3b")
    del data["audio_encoder"], data["weights"]["audio_backbone_dir"]  # a run saved before the audio encoder
    assert ModelConfig.from_run_config(data) == load_preset("wan1_3b")


def test_a_pretrained_front_end_without_its_files_names_the_key(tmp_path, tiny_cfg):
    cfg = tiny_cfg.replace(audio_encoder={"frontend": "pretrained"})
    with pytest.raises(FileNotFoundError, match="model.weights.audio_backbone_dir is not set"):
        DreamActor(cfg, audio=True)
    with pytest.raises(FileNotFoundError, match=f"audio_backbone_dir={tmp_path}: no config.json"):
        DreamActor(cfg.replace(weights={"audio_backbone_dir": str(tmp_path)}), audio=True)
    DreamActor(cfg)  # the paper's model does not build the audio encoder


def test_a_pretrained_wav2vec2_front_end(tmp_path, tiny_cfg):
    """``frontend=pretrained`` with a small randomly initialised wav2vec 2.0 saved as transformers does."""
    transformers = pytest.importorskip("transformers")
    w2v = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                      conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    transformers.Wav2Vec2Model(w2v).save_pretrained(tmp_path)
    cfg = dataclasses.replace(tiny_cfg.replace(audio_encoder={"frontend": "pretrained"}),
                              weights=dataclasses.replace(tiny_cfg.weights, audio_backbone_dir=str(tmp_path)))
    model = DreamActor.from_config(cfg, audio=True)
    saved = transformers.Wav2Vec2Model.from_pretrained(tmp_path).state_dict()
    own = model.audio_encoder.frontend.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items() if k in own)
    model.set_stage(4)
    assert not any(p.requires_grad for p in model.audio_encoder.frontend.backbone.parameters())
    tokens, has = model.audio_encoder(_speechy(1.0)[None], torch.tensor([SAMPLE_RATE]), torch.tensor([25.0]), 25)
    assert tokens.shape == (1, 25, tiny_cfg.dit.dim) and has.all()
