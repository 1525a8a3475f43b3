"""Time the trainer's own step on GPUs: ``Trainer.train_step`` (train/trainer.py: the DeepSpeed engine of
train/engine.py, ZeRO-2 or 3, bf16; the flow-matching step of train/step.py; the update guard; the sharded
EMA update), and the trainer's checkpoint save + load (train/checkpoint.py), on synthetic batches of a
realistic clip shape.

    torchrun --nproc_per_node 1 bench/train_step.py --preset wan1_3b --frames 49 --height 480 --width 832 \
        --refs 3 --ckpt-blocks -1 --out bench_train_step.json [--compile] [--checkpoint]

The config is the trainer's own (``conf/train.yaml`` with ``launch=gpu zero=zero2 stage=full``); only the model and
the batches are the bench's: random weights made on the GPU (zero-initialised branches given small values so that no
matmul runs on zeros; under ZeRO-3 the model is built partitioned inside ``deepspeed.zero.Init`` as the trainer
builds it, and the build's host and GPU memory are reported: ``--preset wan14b --zero zero3_offload`` is the one-GPU
check that the 14B model builds and steps), and synthetic batches of precomputed latents (``data.latents=true``: no
VAE; production would precompute them, and the loader's cost is measured by bench/dataloader.py), uint8 pose maps
and face crops, moved to the GPU each step like a loader batch. The phases of each step are timed with the device
synchronized between them (``Trainer.sync_phases``). Reports the median step time, tokens/s, model TFLOP/s and MFU
(models.flops over the device's dense bf16 peak), peak memory, the update guard's verdict per step, and the
checkpoint's size, save and load times.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.dreamactor import DreamActor
from models.partitioned import gathered, numel
from train.data.batch import DreamActorBatch


def _host_rss_gib(peak: bool = False) -> float:
    """This process's resident host memory (or its peak so far), GiB."""
    import resource

    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def shown_norm(guard_norm: float, deepspeed_norm) -> str:
    """The step's gradient norm for the log line: the guard's, or DeepSpeed's (marked) where the guard cannot reach
    the gradient partitions (CPU offload keeps them in the host optimizer), as the trainer logs it."""
    if math.isnan(guard_norm) and deepspeed_norm is not None:
        return f"{float(deepspeed_norm):.4g} (DeepSpeed's)"
    return f"{guard_norm:.4g}"


def synthetic_batch(model: DreamActor, batch: int, frames: int, height: int, width: int, refs: int) -> DreamActorBatch:
    """A loader-shaped batch with precomputed latents (pinned host memory, as the loader delivers it)."""
    cfg = model.cfg
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w, c = 1 + (frames - 1) // tc, height // sc, width // sc, cfg.dit.latent_channels
    s = cfg.face_encoder.crop_size
    g = torch.Generator().manual_seed(0)

    def u8(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)

    b = DreamActorBatch(
        keys=[f"synthetic_{i}" for i in range(batch)], epoch=torch.zeros(batch, dtype=torch.int64),
        video=None, ref_images=None, ref_valid=torch.ones(batch, refs, dtype=torch.bool),
        pose_maps=u8(batch, cfg.pose_encoder.in_channels, frames, height, width), face_crops=u8(batch, frames, 3, s, s),
        face_valid=torch.ones(batch, frames, dtype=torch.bool), body_valid=torch.ones(batch, frames, dtype=torch.bool),
        head_valid=torch.ones(batch, frames, dtype=torch.bool), drop_ref=torch.zeros(batch, dtype=torch.bool),
        drop_motion=torch.zeros(batch, dtype=torch.bool), frame_index=torch.arange(frames).repeat(batch, 1),
        fps=torch.full((batch,), 25.0), crop_transform=torch.eye(3).repeat(batch, 1, 1),
        video_latents=torch.randn(batch, c, t, h, w, generator=g),
        ref_latents=torch.randn(batch, c, refs, h, w, generator=g))
    return b.pin_memory() if torch.cuda.is_available() else b


class SyntheticLoader:
    """The trainer's loader interface over one host batch: a fresh copy of it per step, an empty cursor."""

    def __init__(self, batch: DreamActorBatch):
        self.batch = batch

    def __iter__(self):
        while True:
            yield DreamActorBatch(**{f: getattr(self.batch, f) for f in self.batch.__dataclass_fields__})

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def skip_counts(self) -> dict[str, int]:
        return {}


def shared_out_dir(given: str | None, dist) -> Path:
    """The bench's ``train.out_dir``: ``given``, or a temporary directory made by rank 0 for every rank."""
    if given:
        return Path(given)
    name = [tempfile.mkdtemp(prefix="bench_ckpt_") if dist.is_main else None]
    if dist.world_size > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(name[0])


PHASES = ("guard.before_step", "deepspeed.step", "ema.update")  # the trainer's record_function ranges


def phase_kernels(prof, names=PHASES, top: int = 10) -> str:
    """Per named range of the profiled step: its host time, the device time and number of the kernels launched
    inside it, and its top kernels (the device-side split of the optimizer phase)."""
    out = []
    for ev in prof.events():
        if ev.name not in names or ev.is_async or getattr(ev, "device_type", None) is None or ev.kernels is None:
            continue
        if str(ev.device_type) != "DeviceType.CPU":
            continue
        agg: dict[str, list[float]] = {}
        todo = [ev]
        while todo:
            e = todo.pop()
            todo.extend(e.cpu_children)
            for k in e.kernels:
                a = agg.setdefault(k.name, [0.0, 0])
                a[0] += k.duration
                a[1] += 1
        dev = sum(a[0] for a in agg.values())
        launches = sum(a[1] for a in agg.values())
        out.append(f"{ev.name}: host {ev.cpu_time_total / 1000:.1f} ms, kernels {dev / 1000:.1f} ms in {launches} "
                   "launches")
        for name, (us, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
            out.append(f"    {us / 1000:8.2f} ms  {n:6d}x  {name[:110]}")
    return "\n".join(out)


def _plan_fields(plan) -> dict:
    """The activation checkpointing the step ran: blocks checkpointed, and how many keep only their inputs (full)
    or their attention outputs too (selective)."""
    return {"checkpointed_blocks": plan.blocks, "checkpoint_plan": plan._asdict()}


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
    ap.add_argument("--compile-encoders", default="auto", choices=["auto", "true", "false"],
                    help="train.compile_encoders (auto: as train.compile_blocks)")
    ap.add_argument("--encoder-layout", default="channels_last", choices=["channels_last", "contiguous"],
                    help="the conv encoders' activation layout (the model's default: channels_last)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpoint", action="store_true", help="also time a checkpoint save + load")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="train.out_dir of the bench: the checkpoint goes to <dir>/stage<N>/checkpoints, which "
                         "must hold none yet (default: a temporary directory, deleted at the end)")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of one more step to this file")
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-init", default=None, metavar="PATH",
                    help="only write the bench's weights (random, no zero tensor) as a model.safetensors that a "
                         "trainer run of any stage can start from (stage.init=PATH), then exit")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from train import distributed
    from train.config import to_job
    from train.engine import construction
    from train.trainer import Trainer

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", [f"model={args.preset}", f"launch={args.launch}", f"zero={args.zero}",
                                f"stage={args.stage}", "model.weights.required=false",
                                f"model.dit.activation_checkpointing={args.ckpt_blocks}",
                                f"train.compile_blocks={args.compile}",
                                f"train.compile_encoders={args.compile_encoders}", "train.resume=none",
                                "train.checkpoint.keep=1", "train.sample.every=0", "data.latents=true",
                                # every step's update must be applied: count skipped ones, never stop on them
                                "train.guard.max_consecutive_nonfinite=1000000000", *args.overrides])
    job = to_job(cfg)
    dist = distributed.setup(job.launch, job.train.seed)
    out_dir = shared_out_dir(args.checkpoint_dir, dist)
    job.train.out_dir = job.resolved["train"]["out_dir"] = str(out_dir)
    host_before = _host_rss_gib()
    # ZeRO-3: built partitioned (deepspeed.zero.Init) as the trainer builds it, never whole; otherwise random init
    # straight on the GPU (a real run loads weights on the host)
    with construction(job) if job.zero.stage == 3 else torch.device(dist.device):
        model = DreamActor(job.model)
    for p in model.parameters():  # one parameter whole at a time (a no-op gather outside ZeRO-3)
        with gathered([p], modify=True), torch.no_grad():
            if not p.any():
                p.normal_(0, 0.02)
    build = {"build_host_rss_gib": _host_rss_gib(), "build_host_rss_before_gib": host_before,
             "build_gpu_gib": torch.cuda.memory_allocated() / 2**30 if dist.device.type == "cuda" else None}
    if dist.is_main:
        print(f"model built{' under zero.Init' if job.zero.stage == 3 else ''}: host RSS {host_before:.1f} -> "
              f"{build['build_host_rss_gib']:.1f} GiB" + (f", GPU {build['build_gpu_gib']:.1f} GiB"
                                                          if build["build_gpu_gib"] is not None else ""), flush=True)
    if args.write_init:
        if job.zero.stage == 3 or dist.world_size > 1:
            raise SystemExit("--write-init: one process, ZeRO-2 (the weights whole on this rank)")
        from train.export import write_safetensors

        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_safetensors(Path(args.write_init), weights, {"format": "pt", "weights": "bench-random"})
        print(f"wrote {args.write_init}", flush=True)
        return
    model.pose_encoder.channels_last = model.face_encoder.model.channels_last = args.encoder_layout == "channels_last"
    model.set_stage(job.stage.id)
    host_batch = synthetic_batch(model, args.batch, args.frames, args.height, args.width, args.refs)
    trainer = Trainer(job, dist, model=model, loader=SyntheticLoader(host_batch))
    trainer.sync_phases = True
    engine, it = trainer.engine, iter(trainer.loader)
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, parts, result, health_log = [], [], {}, []
    for i in range(args.warmup + args.steps):
        stats, _, health = trainer.train_step(it, trainer.step + 1)
        s = stats.values
        phases = [s["forward_s"], s["backward_s"], s["optimizer_s"], s["ema_s"]]
        ds_norm = engine.get_global_grad_norm()
        health_log.append({"step": trainer.step, "grad_norm": health.grad_norm,
                           "deepspeed_grad_norm": None if ds_norm is None else float(ds_norm), "finite": health.finite,
                           "applied": health.applied, "bad_groups": health.bad_groups})
        if i >= args.warmup:
            times.append(s["step_s"])
            parts.append(phases)
        if dist.is_main:
            print(f"step {trainer.step}: {s['step_s']:.3f} s (fwd {phases[0]:.3f} bwd {phases[1]:.3f} "
                  f"opt {phases[2]:.3f} ema {phases[3]:.3f}) loss {s['loss_sum'] / s['micro_steps']:.4f} "
                  f"grad norm {shown_norm(health.grad_norm, ds_norm)} "
                  f"update {'applied' if health.applied else 'SKIPPED'}", flush=True)
    med = statistics.median(times)
    world = dist.world_size
    flops, tokens = s["flops"], int(s["tokens"])
    tflops = flops / med / 1e12
    result.update(
        device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, world_size=world, **build,
        peak_host_rss_gib=_host_rss_gib(peak=True),
        args=vars(args),
        params=sum(numel(p) for p in model.parameters()), tokens_per_sample=tokens // args.batch,
        flops_per_step=flops, step_s=med, step_s_all=times,
        forward_backward_step_ema_s=[statistics.median(x) for x in zip(*parts)],
        samples_per_s=args.batch * world / med, tokens_per_s=tokens * world / med, tflops_per_gpu=tflops,
        mfu=tflops / trainer.peak_tflops if trainer.peak_tflops else None, peak_tflops=trainer.peak_tflops,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, date=time.strftime("%Y-%m-%d"),
        **_plan_fields(model.dit.checkpoint_plan(args.batch, tokens // args.batch,
                                                 args.frames * args.height * args.width)),
        activation_budget_gib=None if trainer.activation_budget is None else trainer.activation_budget / 2**30,
        steps=health_log,
        updates="applied" if all(h["applied"] for h in health_log) else
        f"SKIPPED {sum(not h['applied'] for h in health_log)} of {len(health_log)}")
    if args.profile:  # every rank runs the step (collectives); rank 0 writes the tables
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            trainer.train_step(it, trainer.step + 1)
        ka = prof.key_averages()
    if args.profile and dist.is_main:
        kernels = ("\n\nKernels by device time:\n"
                   + ka.table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=110)) if cuda else ""
        Path(args.profile).write_text(
            ka.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40) + "\n\n"
            + ka.table(sort_by="self_cpu_time_total", row_limit=25) + kernels
            + "\n\nThe optimizer phase by range:\n" + phase_kernels(prof))
    if args.checkpoint:
        t0 = time.perf_counter()
        tag_dir = trainer.save()
        if cuda:
            torch.cuda.synchronize()
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in tag_dir.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        trainer.checkpointer.load(tag_dir)
        if cuda:
            torch.cuda.synchronize()
        result.update(checkpoint_save_s=save_s, checkpoint_load_s=time.perf_counter() - t0,
                      checkpoint_gib=size / 2**30)
    distributed.barrier()  # every rank is done with the checkpoint
    if args.checkpoint_dir is None and dist.is_main:
        shutil.rmtree(out_dir, ignore_errors=True)
    if dist.is_main:
        print(json.dumps({k: v for k, v in result.items() if k != "step_s_all"}, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
