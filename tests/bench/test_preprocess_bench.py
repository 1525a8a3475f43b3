"""bench/preprocess.py composes its config and reads its command line (the whole bench takes minutes: not here)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_preprocess", ROOT / "bench" / "preprocess.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_bench_config_composes_with_its_defaults_and_overrides():
    from models.command_line import compose
    from preprocess.config import to_config

    bench = _bench()
    n, overrides = bench.parse_args(["--videos", "3", "samples.size=96"])
    cfg = to_config(compose("preprocess", [*bench.DEFAULT_OVERRIDES, *overrides]))
    assert n == 3 and cfg.samples.size == 96 and cfg.samples.n_frames == 100
    assert bench.parse_args(["videos=0"]) == (0, [])  # the older spelling


def test_help_prints_the_usage():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "preprocess.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--videos" in out.stdout and "Bounds" in out.stdout


def test_the_pipeline_leg_runs_preprocess_run_py_and_counts_its_frames(tmp_path):
    """The bench's pipeline figure comes from the user's command in its own process (a driver holding the
    stages-alone models measured 0.73 where a clean one measured 0.87 the same hour)."""
    from models.command_line import compose
    from preprocess.config import to_config
    from preprocess.storage import list_inputs
    from tests.preprocess.helpers import ENGINE_OVERRIDES, make_video

    bench = _bench()
    overrides = [o for o in ENGINE_OVERRIDES if not o.startswith(("ray.progress_bars", "progress_interval_s"))]
    cfg = to_config(compose("preprocess", [*bench.DEFAULT_OVERRIDES, *overrides, "ray.num_cpus=2"]))
    inputs = [f for i, photo in enumerate(("astronaut", "camera"))
              for f in list_inputs(str(make_video(tmp_path / f"v{i}.mp4", photo, n=16)))]
    wall, frames, machine = bench.pipeline_run(cfg, inputs, [*overrides, "ray.num_cpus=2"])
    assert frames == 32 and 0 < wall < 300 and machine["busy_cpu_s"] > 0
