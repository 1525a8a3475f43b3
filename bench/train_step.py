"""Time the trainer's own step on GPUs: the DeepSpeed engine of train/engine.py (ZeRO-2 or 3, bf16), the
flow-matching step of train/step.py, the sharded EMA update, and a checkpoint save + load through
train/checkpoint.py, on synthetic batches of a realistic clip shape.

    torchrun --nproc_per_node 1 bench/train_step.py --preset wan1_3b --frames 49 --height 480 --width 832 \
        --refs 3 --ckpt-blocks -1 --out bench_train_step.json [--compile] [--checkpoint]

The config is the trainer's own (``conf/train.yaml`` with ``launch=gpu zero=zero2 stage=full``); only the
batch is synthetic: precomputed latents (the VAE does not run: production would precompute them, and
the loader's cost is measured by bench/dataloader.py), uint8 pose maps and face crops, moved to the GPU
each step like a loader batch. Random weights (zero-initialised branches given small values so that no
matmul runs on zeros). Reports the median step time, tokens/s, model TFLOP/s and MFU (models.flops over
the device's dense bf16 peak), peak memory, and the checkpoint's size, save and load times.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.dreamactor import DreamActor  # noqa: E402
from train.data.batch import DreamActorBatch  # noqa: E402


def synthetic_batch(model: DreamActor, batch: int, frames: int, height: int, width: int, refs: int) -> DreamActorBatch:
    """A loader-shaped batch with precomputed latents (pinned host memory, as the loader delivers it)."""
    cfg = model.cfg
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w, c = 1 + (frames - 1) // tc, height // sc, width // sc, cfg.dit.latent_channels
    s = cfg.face_encoder.crop_size
    g = torch.Generator().manual_seed(0)
    u8 = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)  # noqa: E731
    b = DreamActorBatch(
        keys=[f"synthetic_{i}" for i in range(batch)], epoch=torch.zeros(batch, dtype=torch.int64),
        video=None, ref_images=None, ref_valid=torch.ones(batch, refs, dtype=torch.bool),
        pose_maps=u8(batch, cfg.pose_encoder.in_channels, frames, height, width), face_crops=u8(batch, frames, 3, s, s),
        face_valid=torch.ones(batch, frames, dtype=torch.bool), body_valid=torch.ones(batch, frames, dtype=torch.bool),
        head_valid=torch.ones(batch, frames, dtype=torch.bool), drop_ref=torch.zeros(batch, dtype=torch.bool),
        drop_motion=torch.zeros(batch, dtype=torch.bool), frame_index=torch.arange(frames).repeat(batch, 1),
        fps=torch.full((batch,), 25.0), crop_transform=torch.eye(3).repeat(batch, 1, 1),
        video_latents=torch.randn(batch, c, t, h, w, generator=g), ref_latents=torch.randn(batch, c, refs, h, w, generator=g))
    return b.pin_memory() if torch.cuda.is_available() else b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan1_3b")
    ap.add_argument("--launch", default="gpu", help="gpu | local (a CPU smoke run of this script)")
    ap.add_argument("--zero", default="zero2")
    ap.add_argument("--stage", default="full", help="pose | face | full")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--ckpt-blocks", default="auto",
                    help="DiT blocks under activation checkpointing: auto (the trainer's policy), -1 all, 0 none, N")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                    help="train.compile_blocks (auto: on for CUDA + ZeRO-2, the trainer's default)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpoint", action="store_true", help="also time a checkpoint save + load")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of one more step to this file")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from train import distributed
    from train.checkpoint import Checkpointer
    from train.config import to_job
    from train.ema import ShardedEMA
    from train.engine import initialize, set_activation_budget
    from train.guard import UpdateGuard
    from train.metrics import device_peak_tflops
    from train.step import FlowMatchingStep

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", [f"model={args.preset}", f"launch={args.launch}", f"zero={args.zero}", f"stage={args.stage}",
                                "model.weights.required=false", f"model.dit.activation_checkpointing={args.ckpt_blocks}",
                                f"train.compile_blocks={args.compile}", *args.overrides])
    job = to_job(cfg)
    dist = distributed.setup(job.launch, job.train.seed)
    with torch.device(dist.device):  # random init straight on the GPU (a real run loads weights on the host)
        model = DreamActor(job.model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model.set_stage(job.stage.id)
    if job.train.compile_blocks:
        model.compile_blocks()
    engine = initialize(model, job)
    named = dict(engine.module.named_parameters())
    trainable = [(n, p) for n, p in named.items() if p.requires_grad]
    ema = ShardedEMA(trainable, job.train.ema.decay, dist.rank)
    # the trainer's guard: every step's update must be applied (a figure from skipped updates is no figure)
    guard = UpdateGuard(engine, trainable, max_consecutive=10**9, world_size=dist.world_size)
    budget = set_activation_budget(engine, job, dist)
    step_fn = FlowMatchingStep(job, vae=None, device=dist.device, rank=dist.rank)
    host_batch = synthetic_batch(model, args.batch, args.frames, args.height, args.width, args.refs)
    peak = device_peak_tflops(job.launch.peak_tflops, dist.device)
    cuda = dist.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, parts, result, health_log = [], [], {}, []
    for i in range(args.warmup + args.steps):
        sync()
        t = [time.perf_counter()]
        batch = DreamActorBatch(**{f: getattr(host_batch, f) for f in host_batch.__dataclass_fields__}).to(dist.device)
        out = step_fn(engine, batch, i + 1, 0)
        sync()
        t.append(time.perf_counter())
        engine.backward(out.loss)
        sync()
        t.append(time.perf_counter())
        health = guard.before_step(i + 1)
        engine.step()
        guard.after_step(health)
        sync()
        t.append(time.perf_counter())
        ds_norm = engine.get_global_grad_norm()
        health_log.append({"step": i + 1, "grad_norm": health.grad_norm,
                           "deepspeed_grad_norm": None if ds_norm is None else float(ds_norm), "finite": health.finite,
                           "applied": health.applied, "bad_groups": health.bad_groups})
        if health.applied:
            ema.update()
        sync()
        t.append(time.perf_counter())
        if i >= args.warmup:
            times.append(t[4] - t[0])
            parts.append([t[k + 1] - t[k] for k in range(4)])
        if dist.is_main:
            print(f"step {i + 1}: {t[4] - t[0]:.3f} s (fwd {t[1] - t[0]:.3f} bwd {t[2] - t[1]:.3f} "
                  f"opt {t[3] - t[2]:.3f} ema {t[4] - t[3]:.3f}) loss {out.loss.item():.4f} "
                  f"grad norm {health.grad_norm:.4g} update {'applied' if health.applied else 'SKIPPED'}", flush=True)
    med = statistics.median(times)
    world = dist.world_size
    tflops = out.flops / med / 1e12
    result.update(
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, world_size=world, args=vars(args),
        params=sum(p.numel() for p in model.parameters()), tokens_per_sample=out.tokens // args.batch,
        flops_per_step=out.flops, step_s=med, step_s_all=times,
        forward_backward_step_ema_s=[statistics.median(x) for x in zip(*parts)],
        samples_per_s=args.batch * world / med, tokens_per_s=out.tokens * world / med, tflops_per_gpu=tflops,
        mfu=tflops / peak if peak else None, peak_tflops=peak,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, date=time.strftime("%Y-%m-%d"),
        checkpointed_blocks=model.dit.checkpointed_blocks(args.batch, out.tokens // args.batch,
                                                          args.frames * args.height * args.width),
        activation_budget_gib=None if budget is None else budget / 2**30, steps=health_log,
        updates="applied" if all(h["applied"] for h in health_log) else
        f"SKIPPED {sum(not h['applied'] for h in health_log)} of {len(health_log)}")
    if args.profile and dist.is_main:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            batch = DreamActorBatch(**{f: getattr(host_batch, f) for f in host_batch.__dataclass_fields__}).to(dist.device)
            out = step_fn(engine, batch, 10_000, 0)
            engine.backward(out.loss)
            engine.step()
            ema.update()
            sync()
        ka = prof.key_averages()
        Path(args.profile).write_text(
            ka.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40) + "\n\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=25))
    if args.checkpoint:
        root = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
        ck = Checkpointer(root / "checkpoints", dist, keep=1)
        t0 = time.perf_counter()
        tag_dir = ck.save(engine, args.warmup + args.steps, {"rng": distributed.rng_state(), "ema": ema.state_dict()},
                          {"data": {}, "step": 0}, job.resolved, {"stage": job.stage.id, "model": job.model.name,
                                                                  "zero_stage": job.zero.stage})
        sync()
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        ck.load(engine, tag_dir, universal=False)
        ema.load_shard_files([tag_dir / "trainer" / f"rank_{dist.rank:05d}.pt"])
        sync()
        result.update(checkpoint_save_s=save_s, checkpoint_load_s=time.perf_counter() - t0,
                      checkpoint_gib=size / 2**30)
        if args.checkpoint_dir is None and dist.is_main:
            shutil.rmtree(root, ignore_errors=True)
    if dist.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
