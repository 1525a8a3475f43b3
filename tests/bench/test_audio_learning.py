"""bench/audio_learning.py (issue 19's learning figure): what every video says and in whose voice, the held-out split
it chooses (the trainer's own ``data.split``), the calibration that makes the random teacher see the mouth, and (slow)
the whole experiment at CPU size: talking videos through preprocess/run.py, stage 4 through train/run.py, the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.audio_learning import VOICES, calibrate_teacher, choose_split, scripts, token_stats, vocabulary
from models.config import load_preset
from models.dreamactor import DreamActor
from train.audio_step import speech_clip
from train.data.plan import in_split
from train.synthetic import talking_batch

ROOT = Path(__file__).resolve().parents[2]


def test_every_video_says_its_own_sentence_in_one_of_its_persons_voices():
    words = set(vocabulary())
    said = {p: scripts(0, p, 12) for p in VOICES}
    texts = [s["text"] for p in said for s in said[p]]
    assert len(set(texts)) == len(texts)  # held-out videos are sentences never heard in training
    for p, rows in said.items():
        assert {r["voice"] for r in rows} == set(VOICES[p])
        assert all(130 <= r["words_per_minute"] <= 190 for r in rows)
        assert all(w.strip(".").lower() in words for r in rows for w in r["text"].split())
    assert not set(VOICES["grace_hopper"]) & set(VOICES["astronaut"])  # the voice says who speaks
    assert scripts(0, "astronaut", 12) == said["astronaut"] and scripts(1, "astronaut", 12) != said["astronaut"]


def test_the_split_holds_out_the_same_share_of_every_persons_videos(tmp_path):
    rows = [{"key": f"{p[:2]}{k:014x}_{c:04d}", "video_key": f"{p[:2]}{k:014x}", "source": f"/in/{p}_{k:02d}.mp4"}
            for p in VOICES for k in range(10) for c in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "index.parquet")
    split = choose_split(tmp_path, 20.0, 10)
    assert json.loads((tmp_path / "split.json").read_text()) == split
    held = split["heldout_videos"]
    assert sorted(held.values()) == ["astronaut"] * 2 + ["grace_hopper"] * 2 and len(split["train_videos"]) == 16
    for role, videos in (("heldout", held), ("train", split["train_videos"])):  # the loader's split agrees
        cfg = types.SimpleNamespace(heldout_percent=split["heldout_percent"], salt=split["salt"], role=role)
        assert {r["video_key"] for r in rows if in_split(r["key"], cfg)} == set(videos)


def test_the_calibration_makes_the_random_teacher_see_the_mouth():
    """A random face motion encoder with BatchNorm's initial statistics gives every crop nearly the same token; with
    statistics measured on the crops its tokens vary, and within a clip (the mouth opens with the voice). Only the
    BatchNorm statistics change, and they stay frozen afterwards."""
    torch.manual_seed(0)
    encoder = DreamActor(load_preset("tiny")).face_encoder
    crop = encoder.cfg.crop_size
    clips = [c.face_crops[i] for s in range(2) for c in [speech_clip(talking_batch(crop, batch=4, seed=s))]
             for i in range(4)]
    params = {k: v.clone() for k, v in encoder.named_parameters()}
    before = token_stats(encoder, clips)
    calibrate_teacher(encoder, torch.cat(clips), batch=32)
    after = token_stats(encoder, clips)
    assert before["variance"] < 1e-5 * before["mean_square"]
    assert after["variance"] > 0.05 * after["mean_square"] and after["variance_within_clip"] > 0.1 * after["variance"]
    assert all(torch.equal(p, params[k]) for k, p in encoder.named_parameters())
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training and m.momentum == 0.1 for m in norms)
    assert token_stats(encoder, clips) == after  # nothing moves when the teacher is used


@pytest.mark.slow  # ~2 min: espeak-ng, the preprocessing (Ray) and the trainer
def test_the_audio_learning_experiment_runs_end_to_end_at_cpu_size(tmp_path):
    from preprocess import demo_media

    try:
        demo_media.speak("hello")
    except demo_media.SpeechUnavailable as e:
        pytest.skip(f"no speech synthesiser: {e}")
    out = tmp_path / "alearn"
    cmd = [sys.executable, str(ROOT / "bench" / "audio_learning.py"), "--out", str(out), "--launch", "local",
           "--preset", "tiny", "--videos-per-person", "4", "--heldout-percent", "25", "--steps", "20",
           "--eval-every", "10", "--workers", "0", "--lr", "3e-3", "--margin", "100"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["videos"] == {"train": 6, "heldout": 2} and r["steps"] == 20 and r["eval_step"] == 20
    assert r["updates"]["stage4"] == {"nonfinite_steps": 0, "skipped_steps": 0, "all_applied": True}
    assert r["teacher"]["after"]["variance"] > 1e3 * r["teacher"]["before"]["variance"]
    assert [e["step"] for e in json.loads((out / "curve.json").read_text())["eval"]] == [10, 20]
    assert (out / "audio_learning.png").stat().st_size > 10_000
    assert "held-out token MSE" in (out / "results.md").read_text()
