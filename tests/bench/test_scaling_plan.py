"""bench/scaling_plan.py: the arithmetic of docs/scaling.md holds together."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_module():
    spec = importlib.util.spec_from_file_location("scaling_plan", ROOT / "bench" / "scaling_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_of_wan1_3b(plan_module, tmp_path):
    plan = plan_module.main(["--presets", "wan1_3b", "--gpus", "8", "--sp", "1", "2",
                             "--json", str(tmp_path / "p.json")])
    mem = {(r["zero"], r["sp"]): r for r in plan["memory"]}
    params = mem[2, 1]["params_b"] * 1e9
    gib = 2**30
    # ZeRO-2 keeps the bf16 weights whole; ZeRO-3 splits them over the 8 ranks; optimizer + EMA split in both
    assert mem[2, 1]["weights_gib"] == pytest.approx(2 * params / gib)
    assert mem[3, 1]["weights_gib"] == pytest.approx(2 * params / 8 / gib)
    assert mem[2, 1]["optimizer_gib"] == pytest.approx(12 * params / 8 / gib)
    # SP halves the video tokens per GPU (121 frames + 3 replicated references at 640 x 960), so needs no more
    # checkpointed blocks
    assert mem[2, 1]["tokens_per_gpu"] == (31 + 3) * 40 * 60 and mem[2, 2]["tokens_per_gpu"] == 31 * 20 * 60 + 3 * 2400
    assert int(mem[2, 2]["checkpointed"].split()[0]) <= int(mem[2, 1]["checkpointed"].split()[0])
    # ZeRO-3 moves 3/2 of ZeRO-2's bytes; time x GPUs = GPU-days; the paper's 560,000 clips in all
    t = {(r["zero"], r["sp"]): r for r in plan["time"]}
    assert t[3, 1]["zero_comm_gb"] == pytest.approx(1.5 * t[2, 1]["zero_comm_gb"])
    assert t[2, 2]["compute_s"] == pytest.approx(t[2, 1]["compute_s"] / 2, rel=0.05)
    for d in plan["days"]:
        step = t[d["zero"], d["sp"]]["step_s"]
        assert d["steps"] * (8 // d["sp"]) == 560_000
        assert d["gpu_days"] == pytest.approx(d["steps"] * step * 8 / 86400)
    assert (tmp_path / "p.json").stat().st_size > 1000


def test_preprocessing_hours_follow_the_per_frame_costs(plan_module, capsys):
    plan = plan_module.main(["--presets", "wan1_3b", "--gpus", "8", "--sp", "1", "--corpus-hours", "10",
                             "--fps", "25", "--smplx-fit-ms-per-frame", "20", "--head-fit-ms-per-frame", "10",
                             "--networks-ms-per-frame", "10"])
    p = plan["preprocess"]
    # 10 h x 3600 s x 25 fps = 900,000 frames; 20 ms each = 5 GPU-hours, 10 ms 2.5
    assert p["frames"] == 900_000
    assert p["smplx_fit_gpu_hours"] == pytest.approx(5.0) and p["head_fit_gpu_hours"] == pytest.approx(2.5)
    assert p["networks_gpu_hours"] == pytest.approx(2.5)
    # 40 ms a frame at 25 fps: one video-hour per GPU-hour
    assert "together 1.00 source-video-hours per GPU-hour" in capsys.readouterr().out  # main prints the markdown
