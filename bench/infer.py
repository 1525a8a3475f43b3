"""Time the animation job's model part (infer/animate.py): segments sampled with dual CFG, then the VAE decode.

Two steps, so the GPU machine needs no annotator (MediaPipe) installed:

    # 1. on any machine: annotate + draw the controls of a driving clip at the output size (the real steps 2-5)
    python bench/infer.py prepare --frames 121 --height 480 --width 832 --out /tmp/drive121.npz
    # 2. on the GPU: a random-weights model of the preset (the VAE a random Wan 2.1 VAE of the real architecture),
    #    sample + decode the whole clip; seconds per output frame and peak memory
    python bench/infer.py sample --preset wan1_3b --prepared /tmp/drive121.npz --json bench_infer.json

``sample`` runs the paper's defaults (segments of 73 frames, 50 steps, dual CFG 2.5: 3 model passes per step)
unless ``--steps`` / ``--segment-frames`` say otherwise, in bf16 on CUDA.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def prepare(args) -> dict:
    """Annotate a generated driving clip and a shipped reference photo; save the controls, face crops and the
    reference crop at the output size."""
    import cv2

    from infer import animate as A
    from infer.annotate import Annotator
    from models.command_line import compose
    from models.config import load_preset
    from preprocess import demo_media

    tmp = Path(args.out).with_suffix("")
    tmp.mkdir(parents=True, exist_ok=True)
    ref = tmp / "reference.png"
    cv2.imwrite(str(ref), cv2.cvtColor(demo_media.load_photo("grace_hopper"), cv2.COLOR_RGB2BGR))
    side = max(args.height, args.width)
    frames, _ = demo_media.render_motion(demo_media.load_photo("astronaut"), (side, side), args.frames,
                                         demo_media.Motion(shift=(side * 0.1, 0.0), scale=(1.0, 1.1)))
    drive = demo_media.write_video(tmp / "driving.mp4", frames, 25.0)
    cfg = load_preset(args.preset)
    exp = A.Export(None, None, cfg, Path("-"), "-", args.height * args.width)
    annotator = Annotator(compose("infer").annotators)
    t0 = time.perf_counter()
    prep = A.prepare(exp, annotator, str(ref), str(drive),
                     A.Settings(height=args.height, width=args.width, max_frames=args.frames))
    seconds = time.perf_counter() - t0
    faces, valid = A.face_tensor(prep.drive_ann, cfg.face_encoder.crop_size)
    np.savez_compressed(args.out, maps=prep.maps, reference=prep.refs[0][1], faces=faces.numpy().astype(np.float16),
                        face_valid=valid.numpy(), fps=prep.driving.fps)
    out = {"frames": len(prep.maps), "size": prep.size, "annotate_and_draw_s": round(seconds, 2), "file": args.out}
    print(json.dumps(out))
    return out


def random_export(preset: str, device: torch.device, dtype: torch.dtype):
    """A model of ``preset`` with random weights (zero-initialised branches given small values) and a random Wan
    2.1 VAE of the real architecture, as an :class:`infer.animate.Export`."""
    import dataclasses

    from infer.animate import Export
    from models.config import load_preset
    from models.dreamactor import DreamActor
    from models.vae import VideoVAE

    cfg = load_preset(preset)
    if cfg.weights.vae_dir is None and cfg.vae.arch is None:
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, arch={}))  # diffusers' defaults = Wan 2.1
    with torch.device(device):
        model = DreamActor.from_config(cfg, load_weights=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    model.to(dtype).eval()
    torch.manual_seed(0)
    vae = VideoVAE.from_config(cfg.vae, cfg.weights.vae_dir).to(device)
    return Export(model, vae, cfg, Path("-"), "-", 0)


def sample(args) -> dict:
    """Sample + decode the prepared clip; timings per phase, seconds per output frame, peak memory."""
    from infer import animate as A
    from models.conditions import Conditions
    from models.render import maps_to_tensor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = np.load(args.prepared)
    exp = random_export(args.preset, device, dtype)
    n = int(len(data["maps"]))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    ref = A.pixels(data["reference"][None]).to(device)
    ref_lat = exp.vae.encode(ref).permute(2, 1, 0, 3, 4)
    faces = torch.from_numpy(data["faces"]).to(device, dtype)
    cond = Conditions(ref_lat.to(dtype), maps_to_tensor(data["maps"])[None].to(device, dtype), faces,
                      torch.from_numpy(data["face_valid"]).to(device))
    s = A.Settings(steps=args.steps, segment_frames=args.segment_frames)
    total = A.total_steps(exp, n, s)
    steps_done = [0]

    def tick():
        steps_done[0] += 1
        if steps_done[0] % 10 == 0:
            print(f"  step {steps_done[0]}/{total} at {time.perf_counter() - t0:.1f} s", flush=True)

    video = A.sample_video(exp, cond, n, s, progress=tick)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    out = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "frames": n, "size": list(video.shape[1:3]), "total_steps": total,
           "segment_frames": s.segment_frames or exp.cfg.flow.segment_frames,
           "sampling_steps": s.steps or exp.cfg.flow.sample_steps, "seconds": round(seconds, 2),
           "seconds_per_output_frame": round(seconds / n, 3),
           "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
           "mean_level": float(video.mean()), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--preset", default="wan1_3b", help="for the face-crop size")
    p.add_argument("--frames", type=int, default=121)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--out", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--preset", default="wan1_3b")
    s.add_argument("--prepared", required=True)
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's, 50)")
    s.add_argument("--segment-frames", type=int, default=None, help="default: the preset's, 73")
    s.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    (prepare if args.cmd == "prepare" else sample)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
