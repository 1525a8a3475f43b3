"""bench/audio.py on the CPU with the tiny preset: ``--help``, and a short run that reports every figure of the GPU
runs (the trainer's stage-4 step through DeepSpeed, the encoder's training and inference throughput)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.train.conftest import env, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_audio_bench_reports_its_three_figures(tmp_path):
    bench = str(ROOT / "bench" / "audio.py")
    usage = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert usage.returncode == 0 and "--infer-seconds" in usage.stdout
    out = tmp_path / "audio.json"
    cmd = [sys.executable, bench, "--preset", "tiny", "--launch", "local", "--frames", "9", "--batch", "2", "--steps",
           "2", "--warmup", "1", "--infer-seconds", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
                          env=dict(env(), MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    step = r["stage_step"]
    assert step["step_s"] > 0 and len(step["step_s_all"]) == 2 and len(step["losses"]) == 3
    assert step["flops_per_step"] > 0 and step["audio_seconds_per_s"] > 0 and step["frames_per_s"] > 0
    assert len(step["forward_backward_optimizer_ema_s"]) == 4 and step["updates"] == "applied"
    assert r["encoder_train"]["audio_seconds_per_s"] > 0 and r["encoder_infer"]["realtime_factor"] > 0
    assert r["audio_encoder_params"] > 0 and "step 3: " in proc.stdout
