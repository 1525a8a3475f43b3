"""Helpers for preprocessing tests: tiny videos and in-process pipeline runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from preprocess import samples
from preprocess.config import to_config
from preprocess.storage import list_inputs
from tests.conftest import ROOT, compose


def make_video(path, photo="astronaut", n=30, size=96, motion=samples.Motion(), fps=25.0) -> Path:
    frames, _ = samples.render_motion(samples.load_photo(photo), (size, size), n, motion)
    return samples.write_video(path, frames, fps)


def make_corpus(d: Path, n_good: int = 3, n_frames: int = 20) -> list[Path]:
    photos = ["astronaut", "grace_hopper", "camera"]
    return [make_video(d / f"good{i}.mp4", photos[i % 3], n=n_frames,
                       motion=samples.Motion(shift=(2.0 * i, 1.0 * i))) for i in range(n_good)]


ENGINE_OVERRIDES = ["annotators=none", "plan.min_frames=8", "plan.max_frames=20", "decode.max_side=96",
                    "ray.progress_bars=false", "progress_interval_s=1000"]


def run_inprocess(input_: str, output: str, extra: list[str] | None = None) -> int:
    from preprocess import pipeline

    cfg = to_config(compose("preprocess", [f"input={input_}", f"output={output}", *ENGINE_OVERRIDES, *(extra or [])]))
    return pipeline.run(cfg, list_inputs(cfg.input))


def run_cli(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    env = dict(kw.pop("env", os.environ), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "preprocess" / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=kw.pop("cwd", ROOT), **kw)


def index_keys(output) -> list[str]:
    import pandas as pd
    return sorted(pd.read_parquet(Path(output) / "index.parquet")["key"])


def failures(output):
    import pandas as pd
    return pd.read_parquet(Path(output) / "failures.parquet")


def tar_members(output) -> dict[str, list[str]]:
    import tarfile
    out = {}
    for t in sorted((Path(output) / "shards").glob("*.tar")):
        with tarfile.open(t) as tf:
            out[t.name] = tf.getnames()
    return out
