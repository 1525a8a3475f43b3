"""Latent cache throughput: the encode pass (clips/s, video-hours per GPU-hour) and the training loader from latents
against the loader from pixels (CPU per sample, one core).

    python bench/latents.py --encode --loader --out bench_latents.json          # dev CPU: tiny VAE for the pass
    python bench/latents.py --encode --model wan1_3b --data prod --frames 121 --video-frames 250 \\
        --override model.vae.arch={} encode.num_gpus=1 encode.num_cpus=8 read.max_actors=6 device=cuda   # one GPU

Both use a dataset made like bench/dataloader.py's (shipped photos moved and given film grain, stored at a
1280 px long side, embedded annotators) unless ``--dataset`` names one.

**Encode**: the pass itself (``preprocess/latents.py``'s ``run``, local Ray) into a fresh cache, at ``--model``'s
VAE and ``--data``'s buckets up to ``--frames`` frames; ``model.vae.arch={}`` is the Wan 2.1 VAE's architecture with
random weights (the cost of the real one, no weights to ship). From the run's summary: clips/s and video-hours per
GPU-hour = encoded video hours / (wall hours x GPUs); with no GPU, per encode actor-hour. Wall time includes Ray's
start and the reading; the encode stage's busy seconds per clip (the VAE alone) are given beside.

**Loader**: the one-core loader of bench/dataloader.py (``num_workers=0``, CPU seconds by stage) at ``--loader-frames``
in the prod 960x640 bucket, prefix sampling from pixels, then from latents. Its cache is written by the pass's own
read stage and writer with the VAE replaced by noise of the VAE's output shape: the loader's cost does not depend on
the values, and any VAE at 960x640 takes hours on this CPU.

**VAE** (``--vae``): the encode stage alone (``preprocess.latents.EncodeStage``, as one encode actor runs it, no Ray,
no reading) on clips of random pixels at ``--vae-size`` with ``--vae-clips-per-call`` clips per call, 8 primary
candidates and 4 references each: the pass's ceiling per GPU, for machines where Ray is not installed.

    python bench/latents.py --vae --model wan1_3b --frames 121 --vae-size 640 960 --override model.vae.arch={} \
        --device cuda --out vae_h200.json

**Noise cache** (``--noise-cache DIR``): only the loader bench's cache (noise latents, the pass's own read stage
and writer) of ``--dataset`` at ``--frames``, with ``--override`` (e.g. other buckets), for a trainer run on a machine
where the pass cannot run (docs/performance.md: the trainer's MFU on cached latents).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dataloader import add_dataset_arguments, dataset_of, run_one_core  # noqa: E402
from models.command_line import compose  # noqa: E402


def encode_bench(dataset: Path, cache: Path, model: str, data: str, frames: int, overrides: list[str]) -> dict:
    """Run the pass into ``cache`` and read its summary."""
    from preprocess.latents import SUMMARY_FILE, run, to_config

    job = to_config(compose("latents", [f"dataset={dataset}", f"cache={cache}", f"model={model}", f"data={data}",
                                        f"data.frames.min={min(frames, 25)}", f"data.frames.max={frames}",
                                        "data.frames.step=4", *overrides]))
    t0 = time.perf_counter()
    code = run(job)
    wall = time.perf_counter() - t0
    s = json.loads((cache / SUMMARY_FILE).read_text())
    gpus = job.encode.num_gpus * job.encode.pool[1]
    devices, per = (gpus, "GPU") if gpus else (job.encode.pool[1], "encode actor")
    clips, hours = s["clips_encoded"], s["video_seconds_encoded"] / 3600
    busy = s["stage_seconds"].get("latent_encode", 0.0)
    out = {"exit": code, "model": model, "data": data, "max_frames": frames, "wall_s": wall, "clips": clips,
           "video_hours": hours, "clips_per_s": clips / wall, "per": per,
           "video_hours_per_device_hour": hours / (wall / 3600 * devices),
           "encode_busy_s_per_clip": busy / max(clips, 1),
           "read_busy_s_per_clip": s["stage_seconds"].get("latent_read", 0.0) / max(clips, 1),
           "video_hours_per_busy_encode_hour": hours / (busy / 3600) if busy > 0 else None,
           "cache_bytes_per_clip": _bytes(cache / "shards") / max(clips, 1),
           "dataset_bytes_per_clip": _bytes(dataset / "shards") / max(s["clips_encoded"], 1)}
    print(f"[bench] encode ({model}, {data}, <= {frames} frames): {clips} clips in {wall:.1f} s: "
          f"{out['clips_per_s']:.3f} clips/s, {out['video_hours_per_device_hour']:.4f} video-hours per {per}-hour "
          f"(VAE busy {out['encode_busy_s_per_clip']:.2f} s per clip, read {out['read_busy_s_per_clip']:.2f} s)",
          flush=True)
    return out


def vae_bench(model: str, frames: int, size: tuple[int, int], clips: int, per_call: int, overrides: list[str],
              device: str) -> dict:
    """Time ``EncodeStage.encode`` on ``clips`` clips of random pixels, ``per_call`` per call (first call untimed)."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from preprocess.latents import EncodeStage, to_config

    job = to_config(compose("latents", ["dataset=/nonexistent", "cache=/nonexistent", f"model={model}",
                                        f"device={device}", *overrides]))
    stage = EncodeStage({"model": job.model, "seed": job.seed, "device": device, "num_threads": os.cpu_count()})
    stage.setup()
    h, w = size
    rng = np.random.default_rng(0)

    def clip(i: int) -> dict:
        x = SimpleNamespace(video=rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8),
                            primaries=rng.integers(0, 256, (8, h, w, 3), dtype=np.uint8),
                            refs=rng.integers(0, 256, (4, h, w, 3), dtype=np.uint8), bucket=(h, w), box=(0, 0, w, h),
                            frames=list(range(frames)), primary_frames=list(range(8)),
                            ref_roles=["yaw_min", "yaw_median", "yaw_max", "half_body"])
        return {"key": f"bench{i:04d}", "inputs": x}

    def sync() -> None:
        if stage.device.type == "cuda":
            torch.cuda.synchronize()

    stage.encode([clip(0) for _ in range(per_call)])  # warm-up (cuDNN autotuning, allocator)
    sync()
    if stage.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, done = [], 0
    while done < clips:
        batch = [clip(done + i) for i in range(per_call)]
        sync()
        t0 = time.perf_counter()
        stage.encode(batch)
        sync()
        times.append(time.perf_counter() - t0)
        assert all("members" in c for c in batch), [c.get("error") for c in batch]
        done += per_call
    per_clip = sum(times) / done
    fps = 25.0  # preprocessing resamples every clip to plan.target_fps (25)
    out = {"model": model, "frames": frames, "size": [h, w], "clips": done, "clips_per_call": per_call,
           "device": str(stage.device), "gpu": torch.cuda.get_device_name() if stage.device.type == "cuda" else None,
           "s_per_clip": per_clip, "clips_per_s": 1 / per_clip,
           "video_hours_per_device_hour": frames / fps / per_clip,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if stage.device.type == "cuda" else None}
    print(f"[bench] VAE encode stage ({model}, {frames} x {h} x {w} + 12 single frames per clip, {per_call} per call, "
          f"{stage.device}): {per_clip:.3f} s per clip, {out['video_hours_per_device_hour']:.2f} video-hours per "
          f"device-hour at {fps:g} fps", flush=True)
    return out


class NoiseVAE:
    """Stands in for the VAE in the loader bench: normal noise of its output shape."""

    def __init__(self, vae_cfg):
        self.cfg = vae_cfg

    def encode(self, x):
        import torch

        tc, sc = self.cfg.temporal_compression, self.cfg.spatial_compression
        b, _, t, h, w = x.shape
        return torch.randn(b, self.cfg.latent_channels, 1 + (t - 1) // tc, h // sc, w // sc)


class _NoLock:
    def check(self) -> None:
        """Nobody else writes the bench's cache."""


def synthetic_cache(dataset: Path, cache: Path, frames: int, overrides: list[str] = ()) -> None:
    """A cache for the prod config (plus ``overrides`` of conf/latents.yaml, e.g. other buckets) at ``frames``
    frames made by the pass's read stage and writer in this process, the VAE replaced by noise (see the module
    doc)."""
    import torch

    from preprocess.latents import SidecarWriter, build_stages, committed_parts, manifest, prepare_cache, to_config
    from preprocess.stage import new_row
    from preprocess.storage import Storage
    from train.data.plan import Framing, Geometry

    job = to_config(compose("latents", [f"dataset={dataset}", f"cache={cache}", "model=wan1_3b", "data=prod",
                                        f"data.frames.min={frames}", f"data.frames.max={frames}", "device=cpu",
                                        *overrides]))
    framing = Framing.of(job.data, Geometry.of_model(job.model))
    parts, fps, info = committed_parts(Storage(str(dataset), create=False))
    storage = Storage(str(cache))
    prepare_cache(storage, manifest(framing, job.model, job.seed, frames), False, parts, "bench")
    read, encode = build_stages(job, framing, info["groups"])
    encode.device, encode.vae = torch.device("cpu"), NoiseVAE(job.model.vae)
    writer = SidecarWriter(storage, parts, _NoLock(), fps)
    for part, keys in parts.items():
        for rows in read.process_batch([new_row(key=part, kind="part", part_keys=keys)]):
            for row in encode.process_batch(rows):
                writer.add(row)
    assert not writer.rows, f"parts left incomplete: {sorted(writer.rows)}"


def loader_bench(dataset: Path, cache: Path, frames: int, samples: int, decoder: str) -> dict:
    """The one-core loader from pixels (prefix sampling) and from latents."""
    import pandas as pd

    from models.config import load_preset

    model_cfg = load_preset("wan1_3b")
    t0 = time.perf_counter()
    synthetic_cache(dataset, cache, frames)
    print(f"[bench] synthetic cache at {frames} frames in {time.perf_counter() - t0:.0f} s", flush=True)
    out = {}
    for name, overrides in (("pixels", ["data.sampling=prefix"]),
                            ("latents", ["data.latents=true", f"data.source.latents={cache}"])):
        r = run_one_core(dataset, frames, samples, model_cfg, decoder, overrides)
        out[name] = r
        print(f"[bench] loader from {name}: {r['cpu_s_per_sample'] * 1000:.0f} ms CPU per sample "
              f"({r['samples_per_core_s']:.2f} samples per core-second) at {r['shape']}", flush=True)
        for k, v in r["stages_cpu_s_per_sample"].items():
            print(f"[bench]   {k:18s} {v * 1000:8.1f} ms CPU per sample", flush=True)
    out["speedup"] = out["pixels"]["cpu_s_per_sample"] / out["latents"]["cpu_s_per_sample"]
    clips = len(pd.read_parquet(dataset / "index.parquet"))
    out["cache_bytes_per_clip"] = _bytes(cache / "shards") / clips
    out["dataset_bytes_per_clip"] = _bytes(dataset / "shards") / clips
    print(f"[bench] loader from latents: {out['speedup']:.2f}x less CPU per sample", flush=True)
    return out


def _bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.tar"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(p)
    p.add_argument("--encode", action="store_true", help="time the pass")
    p.add_argument("--model", default="tiny", help="the pass's model preset (its VAE)")
    p.add_argument("--data", default="local", help="the pass's data config (buckets)")
    p.add_argument("--frames", type=int, default=17, help="the pass's data.frames.max")
    p.add_argument("--override", nargs="*", default=[], help="more overrides of the pass (conf/latents.yaml)")
    p.add_argument("--loader", action="store_true", help="time the loader from latents vs pixels")
    p.add_argument("--loader-frames", type=int, default=73)
    p.add_argument("--samples", type=int, default=12, help="samples timed per loader run")
    p.add_argument("--decoder", default="pyav")
    p.add_argument("--vae", action="store_true", help="time the encode stage alone on random pixels (no Ray)")
    p.add_argument("--vae-size", type=int, nargs=2, default=(640, 960), metavar=("H", "W"))
    p.add_argument("--vae-clips", type=int, default=8)
    p.add_argument("--vae-clips-per-call", type=int, default=1)
    p.add_argument("--device", default="auto", help="--vae's device")
    p.add_argument("--noise-cache", type=Path, help="only write a cache of noise latents (the loader bench's) of "
                   "--dataset at --frames frames with the --override's (buckets) here: for a trainer run on a "
                   "machine where the pass cannot run")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.noise_cache:
        if not args.dataset:
            p.error("--noise-cache needs --dataset")
        dataset = dataset_of(args, args.frames, args.dataset.parent)
        synthetic_cache(dataset, args.noise_cache, args.frames, args.override)
        return {"cache": str(args.noise_cache), "bytes": _bytes(args.noise_cache / "shards")}
    if not (args.encode or args.loader or args.vae):
        p.error("give --encode, --loader and/or --vae, or --noise-cache")
    if args.vae and not (args.encode or args.loader):
        result = {"machine": os.uname().nodename, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                  "vae": vae_bench(args.model, args.frames, tuple(args.vae_size), args.vae_clips,
                                   args.vae_clips_per_call, args.override, args.device)}
        if args.out:
            args.out.write_text(json.dumps(result, indent=2, default=str))
        return result
    tmp = tempfile.TemporaryDirectory(prefix="bench_latents_")
    work = Path(tmp.name)
    dataset = dataset_of(args, max(args.frames, args.loader_frames), work)
    result = {"machine": os.uname().nodename, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.encode:
        result["encode"] = encode_bench(dataset, work / "cache", args.model, args.data, args.frames, args.override)
    if args.loader:
        result["loader"] = loader_bench(dataset, work / "noise_cache", args.loader_frames, args.samples, args.decoder)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
