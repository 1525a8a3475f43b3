"""Fixtures of the data-loader tests: one small annotated dataset made by the project's own
preprocessing (embedded annotators) per session, the tiny model preset, and loader configs."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from models.config import load_preset
from preprocess import demo_media
from tests.conftest import compose
from tests.preprocess.helpers import run_cli
from train.data import build_loader, to_config

# (photo, (width, height), motion): three aspect ratios so that several buckets are used
CORPUS = (
    ("astronaut", (128, 96), demo_media.Motion(shift=(12.0, 4.0))),
    ("grace_hopper", (96, 128), demo_media.Motion(scale=(1.0, 1.1))),
    ("camera", (96, 96), demo_media.Motion(shift=(-8.0, 0.0))),
    ("astronaut", (96, 96), demo_media.Motion(rotate=(0.0, 8.0))),
    ("grace_hopper", (128, 96), demo_media.Motion(shift=(0.0, 6.0), flip=True)),
)
N_FRAMES = 34  # two clips of 17 frames per video (plan.max_frames=17)
PREPROCESS = ["annotators=embedded", "plan.min_frames=8", "plan.max_frames=17", "decode.max_side=128",
              "writer.shard_bytes=4096", "ray.progress_bars=false", "progress_interval_s=1000"]
# (writer.shard_bytes=4096: tiny shards, every video gets its own)
DATA = ["data.frames.min=5", "data.frames.max=17", "data.frames.step=4", "data.buckets.token_budget=900",
        "data.shuffle.window_shards=2", "data.shuffle.buffer=4", "data.refs.min=1", "data.refs.max=3"]


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """A preprocess output (index, stats, shards with every annotation group) of 5 short videos.

    Made by ``preprocess/run.py`` in a child process: Ray's threads must not live in this process,
    whose DataLoader workers are forked."""
    root = tmp_path_factory.mktemp("loader_data")
    inputs = root / "in"
    for i, (photo, size, motion) in enumerate(CORPUS):
        frames, _ = demo_media.render_motion(demo_media.load_photo(photo), size, N_FRAMES, motion)
        demo_media.write_video(inputs / f"v{i}.mp4", frames, 25.0)
    out = root / "out"
    r = run_cli([f"input={inputs}", f"output={out}", *PREPROCESS], env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def model_cfg():
    """The tiny model preset: the geometry and renderer the batches are made for."""
    return load_preset("tiny")


@pytest.fixture(scope="session")
def make_cfg(dataset_dir):
    """``make_cfg(*overrides)``: the local data config on the test dataset, with Hydra overrides."""
    def make(*overrides, dataset=None):
        node = compose("data/local", [f"data.source.dataset={dataset or dataset_dir}", *DATA, *overrides])
        return to_config(node.data)
    return make


@pytest.fixture(scope="session")
def make_loader(make_cfg, model_cfg):
    """``make_loader(*overrides, rank=0, world_size=1, seed=0, dataset=None)``."""
    def make(*overrides, rank=0, world_size=1, seed=0, dataset=None, **cfg_fields):
        cfg = make_cfg(*overrides, dataset=dataset)
        if cfg_fields:
            cfg = dataclasses.replace(cfg, **cfg_fields)
        return build_loader(cfg, model_cfg, rank=rank, world_size=world_size, seed=seed)
    return make
