"""bench/annotators_gpu.py --fit-only: one clip alone and several in one fit, side by side, at CPU size."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_fit_bench_reports_one_clip_and_a_batch_of_clips(tmp_path):
    out = tmp_path / "fit.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "annotators_gpu.py"), "--fit-only", "--frames", "8",
                           "--iters", "20", "--clips", "2", "--size", "256", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["clips"] == 1 and r["together"]["clips"] == 2
    assert r["ms_per_frame"] > 0 and r["together"]["ms_per_frame"] > 0
    assert r["speedup"] == r["ms_per_frame"] / r["together"]["ms_per_frame"]
    assert r["mean_px"] < 20 and r["together"]["mean_px"] < 20  # 20 iterations: coarse, but a fit


def test_the_head_fit_bench_reports_one_clip_and_a_batch_of_clips(tmp_path):
    out = tmp_path / "head.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "annotators_gpu.py"), "--head-fit-only", "--frames",
                           "8", "--clips", "2", "--face-size", "tiny", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["clips"] == 1 and r["frames"] == 8 and r["together"]["clips"] == 2
    assert r["speedup"] == r["ms_per_frame"] / r["together"]["ms_per_frame"]
    assert r["median_px"] < 2 and r["together"]["median_px"] < 2  # 0.5 px landmark noise


def test_the_face_networks_have_their_real_sizes():
    """The GPU stand-ins of the face networks (run here on the CPU, once each): ArcFace's IResNet-50 is w600k_r50's
    43.6 M parameters and 6.3 G multiply-adds; the detector is at least det_10g's 13.3 G multiply-adds at 640²."""
    sys.path.insert(0, str(ROOT / "bench"))
    import annotators_gpu_face as face

    nets = face.bench_networks_torch(frames=1, clip_batch=1, device="cpu", iters=1)
    assert set(nets) == {"detection", "detection_batched", "landmarks_106", "landmarks_68", "identity"}
    assert abs(nets["identity"]["mparams"] - 43.6) < 0.1 and abs(nets["identity"]["gflop_per_frame"] - 12.6) < 0.1
    assert nets["detection"]["gflop_per_frame"] >= 2 * 13.3
    assert all(v["ms_per_frame"] > 0 for v in nets.values())
