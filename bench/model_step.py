"""Time one training step (forward + backward) of a DreamActor preset on one GPU.

Random weights (every zero-initialised branch given small random values, so no matmul runs on zeros),
bf16 parameters as under DeepSpeed bf16, all groups trainable (stage 3) with face tokens. Reports the
median step time over CUDA events, peak memory, achieved TFLOP/s from ``DreamActor.flops_per_step``
and MFU against a peak you pass (H100 SXM dense bf16: 989 TFLOP/s).

    python bench/model_step.py --preset wan1_3b --frames 49 --height 480 --width 832 --refs 3 \
        --variants cudnn:-1 flash:-1 cudnn:20 cudnn:0 --out bench_model_step.json

A variant is ``backend:checkpointed_blocks`` (-1 = every block, 0 = none), optionally ``:compile`` and ``:full``
(checkpointed blocks keep only their inputs; default: the preset's ``checkpoint_policy``, selective).
Needs only torch and PyYAML (no diffusers or Hydra).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.conditions import Conditions
from models.config import load_preset
from models.dreamactor import DreamActor
from models.flow import add_noise, flow_loss


def make_inputs(model: DreamActor, batch: int, frames: int, height: int, width: int, refs: int, device):
    """Random inputs of the given clip shape, in the model's dtype where the loader would give floats."""
    cfg = model.cfg
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w = 1 + (frames - 1) // tc, height // sc, width // sc
    c = cfg.dit.latent_channels
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, c, t, h, w, device=device, generator=g)
    noise = torch.randn(batch, c, t, h, w, device=device, generator=g)
    sigma = torch.rand(batch, device=device, generator=g)
    xt, target = add_noise(x0, noise, sigma)
    s = cfg.face_encoder.crop_size
    dt = next(model.parameters()).dtype
    cond = Conditions(
        torch.randn(batch, c, refs, h, w, device=device, generator=g).to(dt),
        torch.rand(batch, cfg.pose_encoder.in_channels, frames, height, width, device=device, generator=g).to(dt),
        (torch.rand(batch, frames, 3, s, s, device=device, generator=g) * 2 - 1).to(dt))
    return {"noisy_latents": xt.to(dt), "timesteps": sigma, "target": target, "cond": cond}


def step(model, inp, use_face: bool = True) -> torch.Tensor:
    """Forward + backward of the flow-matching loss."""
    cond = inp["cond"] if use_face else inp["cond"].replace(face_crops=None)
    v = model(inp["noisy_latents"], inp["timesteps"], cond, use_face=use_face)
    loss = flow_loss(v, inp["target"])
    loss.backward()
    return loss


def build(args, spec: str, device):
    """The model of one variant ``backend:checkpointed_blocks[:compile][:full]``, bf16, no zero weights, stage set."""
    backend, ckpt, *rest = spec.split(":")
    if device.type != "cuda" and backend in ("cudnn", "flash", "efficient"):
        backend = "auto"
    order = ("cudnn", "flash", "efficient", "math")  # the named backend first, the others as fallbacks
    backends = () if backend == "auto" else (backend,) + tuple(b for b in order if b != backend)
    dit = {"attention_backends": backends, "activation_checkpointing": int(ckpt)}
    if "full" in rest:
        dit["checkpoint_policy"] = "full"
    cfg = load_preset(args.preset).replace(dit=dit)
    torch.manual_seed(0)
    with torch.device(device):
        model = DreamActor(cfg)
    model = model.to(getattr(torch, args.dtype))
    with torch.no_grad():  # no matmul on zeros
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    if "compile" in rest:
        model.compile_blocks()
    model.train()
    model.set_stage(1 if args.no_face else 3)
    info = {"variant": spec, "backend": backend, "checkpointed_blocks": int(ckpt), "compile": "compile" in rest,
            "checkpoint_policy": cfg.dit.checkpoint_policy,
            "stage": 1 if args.no_face else 3}
    return model, info


def run_variant(args, spec: str, device) -> dict:
    """Build the model for one variant and time it."""
    model, result = build(args, spec, device)
    use_face = not args.no_face
    inp = make_inputs(model, args.batch, args.frames, args.height, args.width, args.refs, device)
    flops = model.flops_per_step(args.batch, args.frames, args.height, args.width, args.refs, use_face=use_face)
    result["params"] = model.num_parameters()
    result["flops_per_step"] = flops
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    try:
        t0 = time.time()
        for _ in range(args.warmup):
            step(model, inp, use_face)
            model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        result["warmup_s"] = time.time() - t0
        times = []
        for _ in range(args.steps):
            times.append(_timed(functools.partial(step, model, inp, use_face), cuda))
            model.zero_grad(set_to_none=True)
        med = statistics.median(times)
        result.update(step_s=med, step_s_all=times, peak_mem_gib=peak(),
                      tflops=flops / med / 1e12, mfu=flops / med / 1e12 / args.peak_tflops)
    except torch.OutOfMemoryError as e:
        result.update(error="OOM", detail=str(e).splitlines()[0], peak_mem_gib=peak())
    del model, inp
    if cuda:
        torch.cuda.empty_cache()
    return result


_KERNEL_KINDS = (  # (kind, substrings of CUDA kernel names), first match wins
    ("attention", ("fmha", "flash", "cudnn_generated", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
    ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad")),
)


def profile_step(args, spec: str, device) -> dict:
    """Device time of one step by kernel kind and the top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    model, _ = build(args, spec, device)
    inp = make_inputs(model, args.batch, args.frames, args.height, args.width, args.refs, device)
    use_face = not args.no_face
    step(model, inp, use_face)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(model, inp, use_face)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, e.count, us / 1e3))
    total = sum(r[2] for r in rows)
    kinds = {}
    for name, _, ms in rows:
        low = name.lower()
        kind = next((k for k, subs in _KERNEL_KINDS if any(x in low for x in subs)), "other (elementwise, norms)")
        kinds[kind] = kinds.get(kind, 0.0) + ms
    top = sorted(rows, key=lambda r: -r[2])[:25]
    del model, inp
    torch.cuda.empty_cache()
    return {"variant": spec, "device_ms": total, "by_kind_ms": kinds,
            "top": [{"kernel": n[:140], "calls": c, "ms": ms} for n, c, ms in top]}


def _timed(fn, cuda: bool) -> float:
    """Seconds one call of ``fn`` takes on the device (CUDA events) or the host clock."""
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


@torch.no_grad()
def backend_agreement(args, device, backends=("cudnn", "flash", "efficient")) -> dict:
    """Relative difference of one forward under each backend vs. the first (same weights and inputs)."""
    cfg = load_preset(args.preset).replace(dit={"activation_checkpointing": 0})
    torch.manual_seed(0)
    with torch.device(device):
        model = DreamActor(cfg)
    model = model.to(torch.bfloat16).eval()
    for p in model.parameters():
        if not p.any():
            p.normal_(0, 0.02)
    inp = make_inputs(model, 1, 9, args.height, args.width, args.refs, device)
    outs, errors = {}, {}
    for b in backends + ("math",):
        for blk in model.dit.blocks:
            blk.backends = (b,)  # this backend only: a shape it cannot run raises
        try:
            outs[b] = model(inp["noisy_latents"], inp["timesteps"], inp["cond"]).float()
        except RuntimeError as e:
            errors[b] = str(e).splitlines()[0][:200]
    ref = outs.get("math")
    diffs = {b: float((o - ref).norm() / ref.norm()) for b, o in outs.items()} if ref is not None else {}
    return {"rel_l2_vs_math": diffs, "errors": errors}


def main() -> None:
    """Parse arguments, run the variants, print a table, write JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan1_3b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--variants", nargs="+", default=["cudnn:-1"])
    ap.add_argument("--agreement", action="store_true", help="also compare SDPA backends' outputs (9 frames)")
    ap.add_argument("--no-face", action="store_true", help="stage 1: no face tokens, face parts frozen")
    ap.add_argument("--profile", default=None, help="variant to profile one step of, by kernel kind")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", help="parameter dtype (bfloat16 as under DeepSpeed bf16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "args": vars(args),
            "date": time.strftime("%Y-%m-%d")}
    results = []
    if args.agreement:
        info["backend_rel_diff"] = backend_agreement(args, device)
        print("backend agreement:", info["backend_rel_diff"], flush=True)
    for spec in args.variants:
        r = run_variant(args, spec, device)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "step_s_all"}), flush=True)
        if args.out:  # after every variant, so a run cut short still leaves its results
            Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))
    if args.profile:
        info["profile"] = prof = profile_step(args, args.profile, device)
        if args.out:
            Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))
        print(f"\nprofile of {args.profile}: {prof['device_ms']:.0f} ms of kernels")
        for kind, ms in sorted(prof["by_kind_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<28}{ms:>9.0f} ms {ms / prof['device_ms']:>6.1%}")
        for row in prof["top"][:12]:
            print(f"  {row['ms']:>8.1f} ms {row['calls']:>5}x  {row['kernel'][:90]}")
    print(f"\n{info['device']}, torch {info['torch']}, {args.preset}, batch {args.batch}, {args.frames}x{args.height}x"
          f"{args.width} + {args.refs} refs, {args.dtype} fwd+bwd, stage {1 if args.no_face else 3}")
    print(f"{'variant':<22}{'step s':>9}{'peak GiB':>10}{'TFLOP/s':>9}{'MFU':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<22}{r['error']:>9}{r['peak_mem_gib']:>10.1f}")
        else:
            print(f"{r['variant']:<22}{r['step_s']:>9.3f}{r['peak_mem_gib']:>10.1f}{r['tflops']:>9.0f}{r['mfu']:>7.1%}")


if __name__ == "__main__":
    main()
