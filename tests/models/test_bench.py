"""The step benchmark runs end to end (on the CPU, tiny preset) and reports FLOP-based throughput."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_step_bench_runs(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "model_step.py"), "--preset", "tiny", "--device", "cpu",
           "--dtype", "float32", "--frames", "5", "--height", "32", "--width", "32", "--refs", "1", "--steps", "1",
           "--warmup", "1",
           "--variants", "auto:0", "auto:-1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert [r["checkpointed_blocks"] for r in results] == [0, -1]
    for r in results:
        assert r["step_s"] > 0 and r["flops_per_step"] > 0
        assert abs(r["tflops"] * 1e12 * r["step_s"] - r["flops_per_step"]) < 1e-3 * r["flops_per_step"]
    assert "TFLOP/s" in proc.stdout
