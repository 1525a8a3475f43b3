"""Shared fixtures: a local Ray for the whole session, and a small dataset written by the project's own
preprocessing command (the trainer's, the evaluation's and the animation's tests read it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def compose(config_name: str = "preprocess", overrides: list[str] | None = None):
    """The Hydra config a command line would produce (``models.command_line.compose``)."""
    from models.command_line import compose as compose_config

    return compose_config(config_name, overrides)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) shared by every test that runs a pipeline in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="dreamactor", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """Shards from the project's preprocessing command (embedded annotators, built-in sample videos: three
    50-frame clips cut into 6 clips), as ``python preprocess/run.py`` writes them with no input."""
    root = tmp_path_factory.mktemp("train_data")
    out = root / "preprocess"
    cmd = [sys.executable, str(ROOT / "preprocess" / "run.py"), f"output={out}", f"samples.dir={root / 'samples'}",
           "samples.size=128", "samples.n_frames=50", "samples.megamind=false", "max_videos=3",
           "plan.min_frames=13", "plan.max_frames=25"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["dataset_clips"] >= 4
    return out


@pytest.fixture(scope="session")
def audio_dataset(tmp_path_factory) -> Path:
    """A preprocess output (engine fields only) of the small videos with sound of
    ``tests.preprocess.helpers.AUDIO_CORPUS``: beeps at known frames, a video without sound, a track that starts
    late, one with undecodable packets. Made in a child process (the loader tests fork DataLoader workers)."""
    from tests.preprocess.helpers import AUDIO_PREPROCESS, make_audio_corpus, run_cli

    root = tmp_path_factory.mktemp("audio_data")
    inputs = make_audio_corpus(root / "in")
    out = root / "out"
    r = run_cli([f"input={inputs}", f"output={out}", *AUDIO_PREPROCESS], env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out
