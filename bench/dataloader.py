"""Throughput of the training data loader (train/data) at production shapes, per CPU core.

Makes a small production-like dataset with the project's own preprocessing (shipped photos moved and
given film grain, stored at a 1280 px long side, embedded annotators) unless ``--dataset`` names one,
then times the loader in one process (``num_workers=0``: one core, the per-core figures) and with
DataLoader workers (how it scales on this machine), at a fixed clip length (73 frames: the paper's
inference segment) in the 960x640 bucket of the prod config.

    python bench/dataloader.py --frames 73 --samples 24 --workers 0 2 --out bench_dataloader.json

Per-core figures are CPU seconds of the loading process (reading, decoding, crop/resize, rendering,
collation), so they do not depend on what else runs on the machine. ``--step-time`` (seconds per
training step of one GPU, from docs/performance.md) turns them into the cores per GPU that keep the
data wait under 2% of the step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.command_line import compose  # noqa: E402

# (photo, motion) of the source videos; all 3:2 so that every clip lands in the 960x640 bucket
SOURCES = (("astronaut", dict(shift=(80.0, 20.0))), ("grace_hopper", dict(scale=(1.0, 1.15))),
           ("camera", dict(shift=(-60.0, 0.0), rotate=(0.0, 6.0))), ("astronaut", dict(flip=True, shift=(-50.0, 0.0))))


def make_dataset(inputs: Path, out: Path, n_videos: int, n_frames: int, min_frames: int, size: tuple[int, int],
                 grain: float) -> Path:
    """Source videos from shipped photos (+ temporal grain, so the bitrate is not that of a still), then
    ``preprocess`` with the embedded annotators at a 1280 px long side."""
    from preprocess import demo_media, pipeline
    from preprocess.config import to_config
    from preprocess.storage import list_inputs

    g = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n_videos):
        photo, motion = SOURCES[i % len(SOURCES)]
        frames, _ = demo_media.render_motion(demo_media.load_photo(photo), size, n_frames, demo_media.Motion(**motion))
        for f in frames:  # in place, one frame at a time in float32: a whole clip of float64 grain is GBs at 1280 px
            f[:] = np.clip(f + g.standard_normal(f.shape, dtype=np.float32) * grain, 0, 255)
        demo_media.write_video(inputs / f"v{i}.mp4", frames, 25.0)
        print(f"[bench] source video {i + 1}/{n_videos} ({n_frames} frames at {size[0]}x{size[1]}) "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    cfg = to_config(compose("preprocess", [
        f"input={inputs}", f"output={out}", "annotators=embedded", "decode.max_side=1280",
        f"plan.min_frames={min_frames}", f"plan.max_frames={max(n_frames, 2 * min_frames - 1)}",
        "ray.progress_bars=false", "progress_interval_s=1000"]))
    t = time.perf_counter()
    code = pipeline.run(cfg, list_inputs(cfg.input))
    print(f"[bench] preprocessed {n_videos} videos x {n_frames} frames in {time.perf_counter() - t:.0f} s "
          f"(exit {code})", flush=True)
    import ray
    ray.shutdown()
    return out


class StageTimer:
    """CPU seconds spent in named functions, by wrapping them where the loader looks them up."""

    def __init__(self):
        self.cpu = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, module, name: str, label: str):
        fn = getattr(module, name)

        def timed(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.cpu[label] += time.process_time() - t
                self.calls[label] += 1
        setattr(module, name, timed)


def data_config(dataset: Path, frames: int, workers: int, decoder: str = "decord", overrides=()):
    from train.data import to_config

    return to_config(compose("data/prod", [
        f"data.source.dataset={dataset}", f"data.frames.min={frames}", f"data.frames.max={frames}",
        f"data.workers.num_workers={workers}", "data.workers.pin_memory=false",
        f"data.workers.decoder={decoder}", *overrides]).data)


def run_one_core(dataset: Path, frames: int, n_samples: int, model_cfg, decoder: str, overrides=()) -> dict:
    """The loader in this process only: CPU seconds per sample, by stage (``overrides``: more data.* settings)."""
    import cv2
    import torch

    from models import render
    from train.data import build_loader
    from train.data import dataset as ds_mod
    from train.data import sample as sample_mod
    from train.data import source as source_mod

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    timer = StageTimer()
    timer.wrap(sample_mod, "decode_frames", f"decode ({decoder})")
    timer.wrap(sample_mod, "resize_crop", "crop + resize")
    timer.wrap(render, "render_skeleton_map", "skeleton map")
    timer.wrap(render, "render_head_sphere_map", "head-sphere map")
    timer.wrap(ds_mod, "collate", "collate")
    timer.wrap(ds_mod._WindowReader, "get", "tar read")
    timer.wrap(source_mod, "load_shard_meta", "shard stats")
    loader = build_loader(data_config(dataset, frames, 0, decoder, overrides), model_cfg, seed=0)
    it = iter(loader)
    first = next(it)  # warm-up: imports, first shard open
    shape = dict(frames=first.num_frames, height=first.resolution[0], width=first.resolution[1], refs=first.num_refs)
    timer.cpu.clear()
    timer.calls.clear()
    n = frames_video = frames_face = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while n < n_samples:
        b = next(it)
        n += b.size
        frames_video += b.size * (b.num_frames + 1)  # + the primary reference frame
        frames_face += 0 if b.face_crops is None else b.size * b.num_frames
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"samples": n, "cpu_s": cpu, "wall_s": wall, "shape": shape,
            "samples_per_core_s": n / cpu, "cpu_s_per_sample": cpu / n,
            "video_frames_per_core_s": frames_video / cpu,
            "decoded_frames_per_core_s": (frames_video + frames_face) / cpu,
            "stages_cpu_s_per_sample": {k: v / n for k, v in sorted(timer.cpu.items(), key=lambda kv: -kv[1])},
            "skips": loader.skip_counts()}


def run_workers(dataset: Path, frames: int, n_samples: int, workers: int, model_cfg, decoder: str) -> dict:
    """Wall-clock samples/s of one rank's loader with ``workers`` DataLoader workers."""
    from train.data import build_loader

    loader = build_loader(data_config(dataset, frames, workers, decoder), model_cfg, seed=0)
    it = iter(loader)
    for _ in range(workers):  # warm-up: every worker has started
        next(it)
    n, t = 0, time.perf_counter()
    while n < n_samples:
        n += next(it).size
    wall = time.perf_counter() - t
    return {"workers": workers, "samples": n, "wall_s": wall, "samples_per_s": n / wall}


def stored_bitrate(dataset: Path) -> dict:
    """Mean bytes per frame of the stored clips (video.mp4 / face.mp4) and the stored frame size."""
    import tarfile

    import pandas as pd

    from preprocess import schema

    tar = sorted((dataset / "shards").glob("*.tar"))[0]
    sizes = defaultdict(list)
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            for f in ("video", "face"):
                if m.name.endswith("." + schema.field(f).member):
                    sizes[f].append(m.size)
    index = pd.read_parquet(dataset / "index.parquet")
    n = float(index["n_frames"].mean())
    fps = float(index["fps"].mean())
    return {"clip_size": f"{int(index['width'].iloc[0])}x{int(index['height'].iloc[0])}",
            "clip_frames": n, "video_mbit_s": float(np.mean(sizes["video"])) * 8 / (n / fps) / 1e6,
            "face_mbit_s": float(np.mean(sizes["face"])) * 8 / (n / fps) / 1e6}


def cores_per_gpu(cpu_s_per_sample: float, samples_per_step: float, step_time_s: float, wait: float = 0.02) -> dict:
    """Loader cores one GPU needs so the data wait stays under ``wait`` of the step.

    In steady state K workers deliver K / (cpu_s_per_sample * samples_per_step) batches per second; with
    prefetched batches queued the wait is zero as long as that beats 1 / step_time. Budgeting the
    workers for (1 - wait) of the step keeps the wait under ``wait`` even when a batch is slower than
    average by that fraction; one more core runs the training process's own loader thread (pinning,
    host-to-device copy)."""
    per_batch = cpu_s_per_sample * samples_per_step
    workers = math.ceil(per_batch / (step_time_s * (1 - wait)))
    return {"cpu_s_per_batch": per_batch, "step_time_s": step_time_s, "workers": workers, "cores": workers + 1}


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the dataset a bench reads: ``--dataset``, or the one :func:`make_dataset` makes."""
    p.add_argument("--dataset", type=Path, help="a preprocess output to read; made there if it has no index "
                   "(default: made in a temporary directory)")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--video-frames", type=int, default=100)
    p.add_argument("--size", default="1280x854", help="source video WxH (3:2 lands in the 960x640 bucket)")
    p.add_argument("--grain", type=float, default=3.0, help="std of the temporal grain added to the source")


def dataset_of(args, min_frames: int, tmp_dir: Path) -> Path:
    """``--dataset``, made first (there, or in ``tmp_dir``) when it has no index: clips of at least ``min_frames``."""
    dataset = args.dataset or tmp_dir / "out"
    if not (dataset / "index.parquet").exists():
        w, h = (int(x) for x in args.size.split("x"))
        make_dataset(dataset.with_name(dataset.name + "_in"), dataset, args.videos, args.video_frames, min_frames,
                     (w, h), args.grain)
    return dataset


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_dataset_arguments(p)
    p.add_argument("--frames", type=int, default=73, help="clip length of every batch")
    p.add_argument("--samples", type=int, default=24, help="samples timed per run")
    p.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="0: the one-core run; n: n workers")
    p.add_argument("--model", default="wan1_3b", help="model preset (geometry, renderer)")
    p.add_argument("--decoders", nargs="+", default=["decord", "pyav"], help="one-core runs per decoder; "
                   "the worker runs use the first")
    p.add_argument("--step-time", type=float, default=None, help="s per training step of one GPU (docs/performance.md)")
    p.add_argument("--samples-per-step", type=float, default=None, help="clips per GPU step (default: the batch size)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    from models.config import load_preset

    model_cfg = load_preset(args.model)
    tmp = tempfile.TemporaryDirectory(prefix="bench_dataloader_")
    dataset = dataset_of(args, args.frames, Path(tmp.name))
    result = {"machine": os.uname().nodename, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
              "frames": args.frames, "model": args.model, "stored": stored_bitrate(dataset), "runs": []}
    result["one_core"] = {}
    for w in args.workers:
        if w == 0:
            for dec in args.decoders:
                r = run_one_core(dataset, args.frames, args.samples, model_cfg, dec)
                result["one_core"][dec] = r
                print(f"[bench] one core, {dec}: {r['samples_per_core_s']:.3f} samples/s, "
                      f"{r['video_frames_per_core_s']:.1f} video frames/s, "
                      f"{r['decoded_frames_per_core_s']:.1f} decoded frames/s (video + face) at "
                      f"{r['shape']}", flush=True)
                for k, v in r["stages_cpu_s_per_sample"].items():
                    print(f"[bench]   {k:18s} {v * 1000:8.1f} ms CPU per sample", flush=True)
        else:
            r = run_workers(dataset, args.frames, args.samples, w, model_cfg, args.decoders[0])
            result["runs"].append(r)
            print(f"[bench] {w} workers ({args.decoders[0]}): {r['samples_per_s']:.3f} samples/s wall", flush=True)
    if args.step_time and result["one_core"]:
        per_step = args.samples_per_step or 1.0
        result["cores_per_gpu"] = {dec: cores_per_gpu(r["cpu_s_per_sample"], per_step, args.step_time)
                                   for dec, r in result["one_core"].items()}
        print(f"[bench] cores per GPU at {args.step_time} s/step, {per_step} clips/step: {result['cores_per_gpu']}")
    print(json.dumps(result["stored"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
