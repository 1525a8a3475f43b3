"""GPU-only checks of the training path (marker ``gpu``; run on a CUDA machine: ``pytest -m gpu tests/models``).

A CPU suite cannot see bf16 / compile / kernel bugs: activation checkpointing around compiled blocks once gave
wrong gradients and then non-finite ones on the GPU only, and DeepSpeed skipped every update without a word.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


VARIANTS = ("eager:0", "eager:2", "eager:-1", "eager:-1:full", "compile:0", "compile:2", "compile:-1",
            "compile:2:full", "compile:-1:full")


def test_gradients_agree_across_compile_and_checkpointing(tmp_path):
    """{eager, compiled} x {no, partial, every block checkpointed} x {selective, full}: steps 1-3 agree with eager /
    no checkpointing within bf16 tolerance, every gradient finite (wan1_3b blocks, 4 of them, 49 x 480 x 832 +
    3 refs)."""
    out = tmp_path / "grads.json"
    cmd = [sys.executable, str(ROOT / "bench" / "grad_agreement.py"), "--preset", "wan1_3b", "--layers", "4",
           "--frames", "49", "--height", "480", "--width", "832", "--refs", "3", "--steps", "3",
           "--variants", *VARIANTS, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(VARIANTS) * 3
    for r in rows:
        assert not r["nonfinite"], r
        assert max(r["rel_diff_vs_ref"].values()) < 0.05, r
    assert proc.returncode == 0


def test_the_trainer_applies_every_update(tmp_path):
    """The trainer's GPU defaults (bf16, ZeRO-2, compiled blocks, automatic checkpointing) on wan1_3b at
    49 x 480 x 832 + 3 refs: every step's gradients finite and every update applied; no checkpointing where
    the activations fit the H200."""
    out = tmp_path / "step.json"
    cmd = ["torchrun", "--nproc_per_node", "1", str(ROOT / "bench" / "train_step.py"), "--preset", "wan1_3b",
           "--frames", "49", "--height", "480", "--width", "832", "--refs", "3", "--steps", "4", "--warmup", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=False,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    r = json.loads(out.read_text())
    assert r["updates"] == "applied", r["steps"]
    assert all(s["finite"] and s["applied"] for s in r["steps"])
    for s in r["steps"]:  # the guard clips (train.guard.owns_clipping): DeepSpeed takes no norm of its own (the
        assert s["deepspeed_grad_norm"] is None and s["grad_norm"] > 0, s  # CPU test_guard compares the two)
    if torch.cuda.get_device_properties(0).total_memory > 120 * 2**30:
        assert r["checkpointed_blocks"] == 0


def _encoder_pass(model, maps, crops):
    """Pose and face encoder outputs and every weight gradient of a scalar of both, in float32."""
    dtype = next(model.parameters()).dtype
    pose, face = model.pose_encoder(maps.to(dtype)), model.face_encoder(crops.to(dtype))
    (pose.float().square().mean() + face.float().square().mean()).backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return {"pose": pose.float(), "face": face.float(), **grads}


def _relative_errors(ref: dict, other: dict) -> dict:
    assert ref.keys() == other.keys() and len(ref) > 50
    for name, t in other.items():
        assert torch.isfinite(t).all(), name
    return {n: ((ref[n] - other[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}


def test_compiled_channels_last_encoders_match_eager_nchw():
    """The trainer's encoders (``compile_encoders``, channels-last activations) against eager NCHW ones with the same
    wan1_3b weights (pose maps of 17 x 240 x 416, 17 face crops of 224 x 224).

    In float32 (TF32 off) they are the same function: outputs and every weight gradient agree to 1e-3. In bf16 the
    two layouts round differently and the face encoder's ~40 BatchNorms amplify it (eager NCHW against eager
    channels-last differ by up to 7% on the smallest gradients, on the CPU too), so a fixed bf16 tolerance says
    nothing: each bf16 variant is compared with the float32 eager result, and the compiled channels-last one must
    be about as close to it as the eager NCHW one is."""
    from models.config import load_preset
    from models.dreamactor import DreamActor

    torch.manual_seed(0)
    cfg = load_preset("wan1_3b")
    maps = torch.rand(1, cfg.pose_encoder.in_channels, 17, 240, 416, device="cuda")
    crops = torch.rand(1, 17, 3, 224, 224, device="cuda") * 2 - 1
    master = DreamActor(cfg).to("cuda")
    state = master.state_dict()

    def variant(dtype, compiled):
        model = DreamActor(cfg).to("cuda", dtype)
        model.load_state_dict(state)
        if compiled:
            model.compile_encoders()
        model.pose_encoder.channels_last = model.face_encoder.model.channels_last = compiled
        return model

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = _encoder_pass(master, maps, crops)
        del master
        fp32 = _relative_errors(ref, _encoder_pass(variant(torch.float32, True), maps, crops))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    worst = max(fp32, key=fp32.get)
    assert fp32[worst] < 1e-3, (worst, fp32[worst])

    eager = _relative_errors(ref, _encoder_pass(variant(torch.bfloat16, False), maps, crops))
    compiled = _relative_errors(ref, _encoder_pass(variant(torch.bfloat16, True), maps, crops))
    for name in ("pose", "face"):
        assert compiled[name] < 0.02, (name, compiled[name])
    ratios = sorted(compiled[n] / max(eager[n], 1e-3) for n in ref)
    assert ratios[len(ratios) // 2] < 1.5, ratios[len(ratios) // 2]
    worse = {n: (compiled[n], eager[n]) for n in ref if compiled[n] > 2 * eager[n] + 0.02}
    assert not worse, worse
