"""The loader's audio (schema 3): each batch row is the audio of its sampled frames, aligned to the first one, with
beeps at known source frames landing on the right sample whatever window and stride the plan draws; older datasets
load without audio, and ``data.audio=true`` refuses them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess import schema
from preprocess.audio import decode_flac
from tests.conftest import compose
from tests.preprocess.helpers import AUDIO_BEEPS_S, AUDIO_CORPUS, BEEP_HZ, BEEP_S, beep_onsets
from tests.train.data.helpers import meta, npy, read_dataset, take
from train.data import build_loader, to_config
from train.data.config import DataConfigError
from train.data.sample import audio_window
from train.data.source import dataset_audio

V1_DATASET = Path(__file__).parents[2] / "preprocess" / "fixtures" / "dataset_before_consolidation"
ALIGN = 48  # samples: 3 ms at 16 kHz
# the audio dataset holds engine fields only; windows of 5-13 frames out of its 25-frame clips
AUDIO_DATA = ["data.source.require_groups=[]", "data.face_crops=false", "data.frames.min=5", "data.frames.max=13",
              "data.frames.step=4", "data.buckets.token_budget=900", "data.shuffle.window_shards=1",
              "data.shuffle.buffer=4", "data.workers.num_workers=0"]


def loader(dataset, model_cfg, *overrides):
    cfg = to_config(compose("data/local", [f"data.source.dataset={dataset}", *AUDIO_DATA, *overrides]).data)
    return build_loader(cfg, model_cfg, seed=0)


@pytest.mark.parametrize("target_fps", ["null", "12.5"], ids=["every_frame", "every_other_frame"])
def test_beeps_land_on_their_sample_in_every_window(audio_dataset, model_cfg, target_fps):
    """Rows start at the first sampled frame (mid-clip windows) and cover T / fps s, at the clip's rate or with every
    other frame (12.5 fps): each beep of the source starts within 3 ms of where its frame puts it, nothing else sounds,
    clips without audio are silent rows with audio_samples 0, and S is the longest row of the batch."""
    stored = read_dataset(audio_dataset)
    status = {k: meta(m)["audio_status"] for k, m in stored.items()}
    checked = {"beeps": 0, "quiet": 0, "no_audio": 0, "mid_clip": 0, "past_end": 0}
    for batch in take(loader(audio_dataset, model_cfg, f"data.frames.target_fps={target_fps}"), 16):
        t = batch.frame_index.shape[1]
        want_len = [int(round(t * schema.AUDIO_RATE / float(f))) for f in batch.fps]
        assert batch.audio.dtype == torch.float32 and batch.audio_samples.dtype == torch.int64
        assert batch.audio.shape == (batch.size, max(want_len))
        for b, key in enumerate(batch.keys):
            row, n = batch.audio[b].numpy(), int(batch.audio_samples[b])
            assert not row[want_len[b]:].any() and not row[n:].any()
            if status[key] != schema.AUDIO_OK:
                assert n == 0 and not row.any()
                checked["no_audio"] += 1
                continue
            m = stored[key]
            ts = npy(m, "timestamps")
            f0 = int(batch.frame_index[b, 0])
            start = ts[f0]  # the row's sample 0: the start of the first sampled frame
            clip_audio = decode_flac(m["audio.flac"])
            assert n == min(want_len[b], len(clip_audio) - int(round((start - ts[0]) * schema.AUDIO_RATE)))
            checked["mid_clip"] += f0 > 0
            checked["past_end"] += n < want_len[b]
            expected = []  # beeps that start (or are sounding) in the row, away from its valid end
            for s in AUDIO_BEEPS_S:
                a, e = (s - start) * schema.AUDIO_RATE, (s + BEEP_S - start) * schema.AUDIO_RATE
                if e > ALIGN and a < n - ALIGN:
                    expected.append(max(round(a), 0))
            got = [g for g in beep_onsets(row[:n]) if g < n - ALIGN]
            assert len(got) == len(expected) and all(abs(g - e) <= ALIGN for g, e in zip(got, expected)), \
                (key, f0, got, expected)
            checked["beeps" if expected else "quiet"] += 1
    assert checked["beeps"] >= 4 and checked["quiet"] >= 1 and checked["no_audio"] >= 4 and checked["mid_clip"] >= 4
    if target_fps != "null":
        assert checked["past_end"] >= 1  # a row of 12.5 fps frames can run past the clip's last frame


def test_audio_travels_with_the_batch_and_can_be_turned_off(audio_dataset, model_cfg):
    batch = take(loader(audio_dataset, model_cfg), 1)[0]
    head = batch.head(1)
    assert head.audio.shape == (1, batch.audio.shape[1]) and head.audio_samples.shape == (1,)
    moved = batch.to("cpu")
    assert moved.audio is not None and moved.audio_samples is not None
    off = take(loader(audio_dataset, model_cfg, "data.audio=false"), 1)[0]
    assert off.audio is None and off.audio_samples is None
    assert off.keys == batch.keys and torch.equal(off.video, batch.video)


def test_a_dataset_from_before_audio_loads_without_it_and_true_refuses_it(tmp_path, model_cfg):
    """The committed version-1 dataset: ``auto`` loads it with no audio fields; ``true`` names why it cannot."""
    data = ["data.frames.min=5", "data.frames.max=9", "data.frames.step=4", "data.workers.num_workers=0",
            "data.face_crops=false"]
    old = loader(V1_DATASET, model_cfg, *data)
    batch = take(old, 1)[0]
    assert batch.audio is None and batch.audio_samples is None and batch.video is not None
    with pytest.raises(DataConfigError, match=r"data.audio=true.*schema_version 1, before clips kept their audio"):
        loader(V1_DATASET, model_cfg, *data, "data.audio=true")


def test_dataset_audio_counts_the_clips_with_audio(tmp_path, audio_dataset):
    """What ``auto`` and ``true`` decide on: the clips whose index row says ``ok``; none when no clip has audio."""
    cfg = to_config(compose("data/local", [f"data.source.dataset={audio_dataset}"]).data).source
    n, why = dataset_audio(cfg)
    assert n == sum(s == "ok" for _, _, statuses in AUDIO_CORPUS.values() for s in statuses) and why == ""
    quiet = tmp_path / "quiet"
    shutil.copytree(audio_dataset, quiet)
    import pandas as pd

    index = pd.read_parquet(quiet / "index.parquet")
    index["audio_status"] = "no_audio_stream"
    index.to_parquet(quiet / "index.parquet")
    cfg = to_config(compose("data/local", [f"data.source.dataset={quiet}"]).data).source
    assert dataset_audio(cfg) == (0, f"none of its {len(index)} clips has audio (audio_status no_audio_stream: "
                                     f"{len(index)})")
    info = json.loads((quiet / "dataset.json").read_text())
    (quiet / "dataset.json").write_text(json.dumps({**info, "schema_version": 2}))
    assert dataset_audio(cfg)[0] == 0
    shards = to_config(compose("data/local", [f"data.source.shards=[{quiet}/shards/*.tar]",
                                              "data.source.dataset=null"]).data).source
    assert dataset_audio(shards) == (None, "")  # unknown: auto loads it, clips without audio get empty rows


def test_audio_window_cuts_and_resamples_a_driving_waveform():
    """Inference's helper: a 44.1 kHz stereo int16 waveform with beeps at 0.4 s and 1.2 s, cut for 10 frames at
    12.5 fps from 0.32 s: 0.8 s at 16 kHz, the first beep 80 ms in, the second past the window, zeros past the end."""
    rate = 44100
    t = np.arange(int(1.5 * rate)) / rate
    x = np.zeros_like(t)
    for s in AUDIO_BEEPS_S:
        on = (t >= s) & (t < s + 0.1)
        x[on] = 0.5 * np.sin(2 * np.pi * BEEP_HZ * (t[on] - s))
    stereo = (np.stack([x, x]) * 32767).astype(np.int16)  # (C, N)
    row = audio_window(stereo, rate, 0.32, 10, 12.5)
    assert row.dtype == np.float32 and row.shape == (12800,)
    assert [abs(o - 1280) <= ALIGN for o in beep_onsets(row)] == [True]
    assert abs(np.abs(row).max() - 0.5) < 0.05
    tail = audio_window(x.astype(np.float32), rate, 1.1, 25, 25.0)  # 1.1 .. 2.1 s: the wave ends at 1.5 s
    assert tail.shape == (16000,) and [abs(o - 1600) <= ALIGN for o in beep_onsets(tail)] == [True]
    assert not tail[int(0.41 * 16000):].any()
    same = audio_window(np.arange(32000, dtype=np.int16), schema.AUDIO_RATE, 0.5, 5, 25.0)
    assert np.array_equal(same, np.arange(8000, 11200, dtype=np.float32) / 32768)
