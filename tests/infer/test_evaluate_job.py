"""The evaluation job (infer/evaluate.py): self-driven reconstruction on a held-out split of a dataset made by
the project's preprocessing, the model beside both baselines, in latent and pixel space; and folder mode."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tests.infer.test_animate import make_export

ROOT = Path(__file__).resolve().parents[2]
DATA = ["data.buckets.area=4096", "data.buckets.aspect_ratios=[1.0]", "data.frames.min=9", "data.frames.max=9",
        "data.refs.max=2", "data.buckets.token_budget=400"]


def evaluate(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "infer" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_the_heldout_split_is_scored_beside_both_baselines(train_dataset, tmp_path):
    export = make_export(tmp_path / "export")
    out = tmp_path / "eval"
    r = evaluate([f"checkpoint={export}", f"data.source.dataset={train_dataset}", "data.split.heldout_percent=100",
                  "clips=3", "steps=2", f"output={out}", *DATA])
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["clips"] == 3 and rec["split"]["role"] == "heldout" and rec["preset"] == "tiny"
    assert set(rec["latent"]["mean_psnr_db"]) == {"model", "copy_reference", "motion_dropped"}
    for method in ("model", "copy_reference", "motion_dropped"):
        agg = rec["pixel"][method]["aggregate"]
        assert agg["clips"] == 3 and np.isfinite(agg["psnr"]) and np.isfinite(agg["ssim"])
        assert rec["pixel"][method]["mode"] == "paper"  # the default: the DisCo protocol
    table = (out / "metrics.md").read_text()
    assert "| model |" in table and "| copy the reference |" in table and "| motion dropped |" in table
    assert (out / "clips.png").stat().st_size > 0 and (out / "psnr_over_time.png").stat().st_size > 0
    held = json.loads((out / "heldout_videos.json").read_text())
    index = pd.read_parquet(train_dataset / "index.parquet")
    assert set(held["video_keys"]) <= set(index["video_key"])  # recorded, so training can exclude them
    # nothing held out (the local default): the training videos are scored, and the job says so
    r = evaluate([f"checkpoint={export}", f"data.source.dataset={train_dataset}", "clips=1", "steps=1",
                  "pixel_metrics=false", f"output={tmp_path / 'eval0'}", *DATA])
    assert r.returncode == 0 and "no video is held out" in r.stderr + r.stdout, r.stderr[-3000:]
    assert json.loads((tmp_path / "eval0" / "metrics.json").read_text())["split"]["role"] == "train"


def test_folders_of_videos_are_scored_by_name(tmp_path):
    from preprocess.demo_media import write_video

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        gt = rng.integers(0, 255, size=(9, 32, 32, 3), dtype=np.uint8)
        noisy = np.clip(gt.astype(int) + rng.integers(-8, 9, size=gt.shape), 0, 255).astype(np.uint8)
        write_video(tmp_path / "gt" / f"{name}.mp4", gt, 25.0)
        write_video(tmp_path / "gen" / f"{name}.mp4", noisy, 25.0)
    r = evaluate([f"generated={tmp_path / 'gen'}", f"ground_truth={tmp_path / 'gt'}", f"output={tmp_path / 'o'}",
                  "metrics.mode=clean"])
    assert r.returncode == 0, r.stderr[-3000:]
    agg = json.loads((tmp_path / "o" / "metrics.json").read_text())["aggregate"]
    assert agg["clips"] == 2 and 20 < agg["psnr"] < 60
    r = evaluate([f"generated={tmp_path / 'gen'}", f"output={tmp_path / 'o'}"])
    assert r.returncode == 2 and "needs both generated=<dir> and ground_truth=<dir>" in r.stderr
