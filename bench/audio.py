"""Throughput of the audio stage (``stage=audio``, train/audio_step.py) and of the audio encoder, on CPU or CUDA.

    python bench/audio.py --preset wan1_3b --batch 4 --frames 121 --out bench_audio.json          # one GPU
    torchrun --nproc_per_node 8 bench/audio.py --preset wan14b --zero zero3 --out bench_audio.json  # a node
    python bench/audio.py --preset tiny --launch local --frames 17 --steps 2 --warmup 1          # a CPU smoke run

Three figures, each after ``--warmup`` untimed repetitions (median of ``--steps``):

1. ``encoder_train``: the audio encoder alone (models/audio_encoder.py), forward + backward on ``--batch`` rows of
   ``--frames`` frames at ``--fps`` (bf16 weights on CUDA, as DeepSpeed runs it): audio seconds per second, FLOP/s.
2. ``encoder_infer``: the encoder's forward on ``--infer-seconds`` of audio in one row, as inference encodes a sound
   file (chunked, models/audio_encoder.py): the real-time factor (audio seconds per wall second).
3. ``stage_step``: the trainer's own step (``Trainer.train_step``: the DeepSpeed engine of the real config with
   ``stage=audio``, the frozen face motion encoder as the teacher on the clips' face crops, the guard, the EMA) on
   made-up talking clips (train/synthetic.py; one host batch, moved to the device every step like a loader batch);
   the whole model is built (random weights, on the device) so memory is the real stage's. Clips, frames and audio
   seconds per second, model TFLOP/s per device and MFU (models.flops.audio_stage_flops), peak memory, and the
   phases of a step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones."""
    out = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def bench_encoder(cfg, device: torch.device, batch: int, frames: int, fps: float, infer_seconds: float, warmup: int,
                  steps: int) -> dict:
    """Figures 1 and 2 (the module docstring)."""
    from models.audio_encoder import SAMPLE_RATE, AudioEncoder
    from models.flops import audio_encoder_flops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    enc = AudioEncoder(cfg.audio_encoder, cfg.dit.dim, cfg.weights.audio_backbone_dir).to(device, dtype)
    samples = round(frames * SAMPLE_RATE / fps)
    audio = 0.1 * torch.randn(batch, samples, device=device)
    n = torch.full((batch,), samples, device=device)
    rate = torch.full((batch,), fps, device=device)

    def train_pass():
        tokens, _ = enc(audio, n, rate, frames)
        tokens.float().square().mean().backward()

    t_train = statistics.median(timed(train_pass, device, warmup, steps))
    flops = 3 * audio_encoder_flops(cfg.audio_encoder, cfg.dit.dim, batch, samples, frames)
    long = 0.1 * torch.randn(1, int(infer_seconds * SAMPLE_RATE), device=device)
    n_long = torch.tensor([long.shape[1]], device=device)
    n_frames = int(infer_seconds * fps)

    def infer_pass():
        with torch.no_grad():
            enc(long, n_long, torch.tensor([fps], device=device), n_frames, chunk=1500)

    t_infer = statistics.median(timed(infer_pass, device, min(warmup, 1), max(1, steps // 2)))
    return {
        "audio_encoder_params": sum(p.numel() for p in enc.parameters()),
        "encoder_train": {"batch": batch, "frames": frames, "fps": fps, "step_s": t_train,
                          "audio_seconds_per_s": batch * samples / SAMPLE_RATE / t_train,
                          "tflops": flops / t_train / 1e12},
        "encoder_infer": {"audio_seconds": infer_seconds, "wall_s": t_infer,
                          "realtime_factor": infer_seconds / t_infer},
    }


def bench_stage(args, device_kind: str) -> tuple[dict, object, object]:
    """Figure 3 (the module docstring); every rank runs it, rank 0 reports. Returns (figures, dist, job)."""
    from bench.train_step import SyntheticLoader, shared_out_dir
    from models.command_line import compose
    from models.dreamactor import AUDIO_STAGE, DreamActor
    from train import distributed
    from train.config import to_job
    from train.synthetic import talking_batch
    from train.trainer import Trainer

    cfg = compose("train", [f"model={args.preset}", f"launch={args.launch}", f"zero={args.zero}", "stage=audio",
                            "model.weights.required=false", "train.resume=none", "train.checkpoint.keep=1",
                            "train.eval.every=0", "train.guard.max_consecutive_nonfinite=1000000000", *args.overrides])
    job = to_job(cfg)
    dist = distributed.setup(job.launch, job.train.seed)
    out_dir = shared_out_dir(None, dist)
    job.train.out_dir = job.resolved["train"]["out_dir"] = str(out_dir)
    with torch.device(dist.device):  # random init straight on the device (a real run loads weights on the host)
        model = DreamActor(job.model, audio=True)
    model.set_stage(AUDIO_STAGE)
    host = talking_batch(job.model.face_encoder.crop_size, batch=args.batch, frames=args.frames, fps=(args.fps,),
                         seed=dist.rank)
    if dist.device.type == "cuda":
        host = host.pin_memory()
    trainer = Trainer(job, dist, model=model, loader=SyntheticLoader(host))
    trainer.sync_phases = True
    it = iter(trainer.loader)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, phases, losses, applied = [], [], [], []
    for i in range(args.warmup + args.steps):
        stats, _, health = trainer.train_step(it, trainer.step + 1)
        s = stats.values
        losses.append(s["loss_sum"] / s["micro_steps"])
        applied.append(bool(health.applied))
        if i >= args.warmup:
            times.append(s["step_s"])
            phases.append([s["forward_s"], s["backward_s"], s["optimizer_s"], s["ema_s"]])
        if dist.is_main:
            print(f"step {trainer.step}: {s['step_s']:.4f} s, loss {losses[-1]:.5f}, update "
                  f"{'applied' if health.applied else 'SKIPPED'}", flush=True)
    med, world = statistics.median(times), dist.world_size
    seconds = args.frames / args.fps
    tflops = s["flops"] / med / 1e12
    result = {
        "world_size": world, "zero": job.zero.stage, "batch_per_rank": args.batch, "frames": args.frames,
        "fps": args.fps, "step_s": med, "step_s_all": times,
        "forward_backward_optimizer_ema_s": [statistics.median(x) for x in zip(*phases)],
        "clips_per_s": args.batch * world / med, "frames_per_s": args.batch * args.frames * world / med,
        "audio_seconds_per_s": args.batch * seconds * world / med, "flops_per_step": s["flops"],
        "tflops_per_device": tflops, "mfu": tflops / trainer.peak_tflops if trainer.peak_tflops else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device_kind == "cuda" else None,
        "losses": losses,
        # the update guard's verdict on every step (warm-up included): a figure of skipped updates measures nothing
        "updates": "applied" if all(applied) else f"SKIPPED {applied.count(False)} of {len(applied)}",
    }
    distributed.barrier()
    if dist.is_main:
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)
    return result, dist, job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan1_3b", help="tiny | small | wan1_3b | wan14b")
    ap.add_argument("--launch", default=None, help="gpu | local (default: gpu when CUDA is visible, else local)")
    ap.add_argument("--zero", default="zero2", help="zero2 | zero3 | ...: the stage step's DeepSpeed config")
    ap.add_argument("--batch", type=int, default=4, help="clips per rank per step")
    ap.add_argument("--frames", type=int, default=121, help="frames per clip (1 + 4k)")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--infer-seconds", type=float, default=60.0, help="audio of the inference figure")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--skip-stage", action="store_true", help="only the encoder figures (no DeepSpeed)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides of conf/train.yaml")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    args.launch = args.launch or ("gpu" if cuda else "local")
    device_kind = "cuda" if args.launch == "gpu" else "cpu"

    from models.config import load_preset

    result = {"device": torch.cuda.get_device_name() if device_kind == "cuda" else "cpu", "torch": torch.__version__,
              "preset": args.preset, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    dist = None
    if not args.skip_stage:
        result["stage_step"], dist, job = bench_stage(args, device_kind)
        device = dist.device
        cfg = job.model
    else:
        device = torch.device("cuda" if device_kind == "cuda" else "cpu")
        cfg = load_preset(args.preset)
    main_rank = dist is None or dist.is_main
    if main_rank:
        result.update(bench_encoder(cfg, device, args.batch, args.frames, args.fps, args.infer_seconds, args.warmup,
                                    args.steps))
        print(json.dumps({k: v for k, v in result.items() if k != "args"}, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    if dist is not None:
        from train import distributed

        distributed.barrier()
        distributed.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
