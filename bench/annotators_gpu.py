"""The production annotators of ``annotators=full`` on whatever device is present, milliseconds per frame, and the
whole stack's source-video-hours per device-hour (25 fps): body (person detection, whole-body keypoints, SMPL-X fit)
here, face/head (SCRFD detection, landmarks, ArcFace, 3DMM fit) from ``bench/annotators_gpu_face.py``.

    python bench/annotators_gpu.py [--frames 121] [--size 512] [--iters 300] [--clips 1] [--mmpose-config PATH] \
        [--face-size full|tiny] [--fit-only] [--json OUT]

* detection: the body backend (MediaPipe Pose, the embedded default; it gives the subject boxes), on the CPU;
* keypoints: mmpose's COCO-WholeBody model from ``--mmpose-config`` (default: full.yaml's RTMW-x, inside the installed
  mmpose) with random weights (timing does not depend on them), batched over the clip's boxes; skipped (reported)
  where mmpose is missing (scripts/install_mmpose.sh installs it);
* fit: SMPL-X on a synthetic model file of the real structure (10,475 vertices, 55 joints, 127 fitted joints;
  ``smplx_model.write_synthetic_model``) to keypoints of a known moving body, ``--iters`` L-BFGS iterations,
  all frames at once; reports ms per frame and the reprojection error reached; ``--clips N``: also N clips in one
  fit (``fit_many``, what the body stage does with a batch), side by side with one alone, and on a GPU once more
  with its evaluations launched eagerly instead of replayed as a CUDA graph (``together_eager``).

Frames are a shipped photo under a known motion (``demo_media.render_motion``). Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from preprocess.annotators.backends.mmpose_wholebody import RTMW_X_CONFIG  # noqa: E402 (imports no mmpose)


def bench_detection(frames: np.ndarray) -> float | str:
    import importlib.util

    if importlib.util.find_spec("mediapipe") is None:
        return "skipped: mediapipe not installed"
    from preprocess.annotators.backends.mediapipe_pose import MediaPipePose

    be = MediaPipePose({"num_poses": 2})
    be.setup()
    ts = np.arange(len(frames)) * 40.0
    t0 = time.perf_counter()
    be.estimate(frames, ts, True)
    dt = time.perf_counter() - t0
    be.close()
    return dt / len(frames) * 1000


def bench_keypoints(frames: np.ndarray, config: str | None, **params) -> float | str:
    """ms per frame of the whole-body keypoints through the backend (``params``: its Params, e.g. ``precision``,
    ``threads``), after a warm-up on one whole batch."""
    import importlib.util

    if importlib.util.find_spec("mmpose") is None:
        return "skipped: mmpose not installed"
    if not config:
        return "skipped: no --mmpose-config"
    from preprocess.annotators.backends.mmpose_wholebody import MMPoseWholeBody

    be = MMPoseWholeBody({"config": config, "checkpoint": None, "device": "auto", "batch_size": 32, **params})
    be.setup()
    H, W = frames.shape[1:3]
    boxes = np.tile(np.array([W * 0.2, H * 0.05, W * 0.8, H * 0.95], np.float32), (len(frames), 1))
    valid = np.ones(len(frames), bool)
    be.estimate(frames[:32], boxes[:32], valid[:32])  # warm-up: one whole batch (CUDA kernels, cuDNN's choices)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    be.estimate(frames, boxes, valid)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / len(frames) * 1000
    be.close()
    return dt


def keypoint_variants(frames: np.ndarray, config: str | None) -> dict:
    """The backend's default (pipeline threads, TF32) against one pipeline thread with exact fp32 (its behaviour
    before 2026-12-03) and the two changes one at a time, side by side."""
    return {"one thread, fp32": bench_keypoints(frames, config, threads=1, precision="fp32"),
            "default threads, fp32": bench_keypoints(frames, config, precision="fp32"),
            "one thread, tf32": bench_keypoints(frames, config, threads=1)}


def bench_fit(n_frames: int, size: int, iters: int, clips: int = 1) -> dict:
    """SMPL-X fit of ``clips`` clips of ``n_frames`` (known moving bodies, 1 px keypoint noise, 10% dropped): one clip
    alone (``SMPLXFitter.fit``), and with ``clips`` > 1 all of them in one ``fit_many``, side by side after a short
    warm-up; ms per frame and the reprojection error reached, for each."""
    from preprocess.annotators.geometry import intrinsics, project
    from preprocess.annotators.smplx_fit import FitClip, FitParams, SMPLXFitter
    from preprocess.annotators.smplx_model import known_clip, write_synthetic_model

    with tempfile.TemporaryDirectory() as d:
        path = write_synthetic_model(Path(d) / "SMPLX_NEUTRAL.npz")
        fitter = SMPLXFitter(FitParams(model_path=str(path), iters=iters))

    K = intrinsics(size, size, 1.0)
    rng = np.random.default_rng(0)
    truth, inputs = [], []
    for c in range(clips):
        uv = project(known_clip(fitter.model, T=n_frames, seed=1 + c), K)
        conf = (rng.random(uv.shape[:2]) > 0.1).astype(float)
        truth.append(uv)
        inputs.append(FitClip(uv + rng.normal(0, 1.0, uv.shape), conf, K))
    fitter.p.iters = 5  # warm-up: CUDA context, kernels, allocator
    fitter.fit_many(inputs[:2])
    fitter.fit(inputs[0].kp2d[:4], inputs[0].conf[:4], K)
    fitter.p.iters = iters

    def errors(results):
        err = np.concatenate([np.linalg.norm(r.joints2d - uv, axis=-1).ravel() for r, uv in zip(results, truth)])
        return {"mean_px": float(err.mean()), "p95_px": float(np.percentile(err, 95))}

    res = fitter.fit(inputs[0].kp2d, inputs[0].conf, K)
    out = {"ms_per_frame": res.seconds / n_frames * 1000, "seconds": res.seconds, "device": str(fitter.device),
           "clips": 1, **errors([res])}
    if clips > 1:
        t0 = time.perf_counter()
        many = fitter.fit_many(inputs)
        dt = time.perf_counter() - t0
        out["together"] = {"clips": clips, "ms_per_frame": dt / (clips * n_frames) * 1000, "seconds": dt,
                           **errors(many)}
        out["speedup"] = out["ms_per_frame"] / out["together"]["ms_per_frame"]
        if fitter.device.type == "cuda":  # the same fit with its evaluations launched eagerly (no CUDA graph)
            fitter.p.cuda_graph = False
            t0 = time.perf_counter()
            eager = fitter.fit_many(inputs)
            dt = time.perf_counter() - t0
            fitter.p.cuda_graph = True
            out["together_eager"] = {"clips": clips, "ms_per_frame": dt / (clips * n_frames) * 1000, "seconds": dt,
                                     **errors(eager)}
            out["graph_speedup"] = out["together_eager"]["ms_per_frame"] / out["together"]["ms_per_frame"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--clips", type=int, default=1,
                    help="clips per SMPL-X fit (fit_many) and per 3DMM head fit (fit_clips), measured beside one alone")
    ap.add_argument("--head-clips", type=int, default=None,
                    help="clips per 3DMM head fit, if not --clips (full.yaml: body 8, head 16)")
    ap.add_argument("--keypoint-variants", action="store_true",
                    help="also time the keypoints with one pipeline thread and/or exact fp32")
    ap.add_argument("--keypoints-only", action="store_true",
                    help="only the whole-body keypoints (and --keypoint-variants)")
    ap.add_argument("--fit-only", action="store_true", help="only the SMPL-X fit (no detection, keypoints, face)")
    ap.add_argument("--head-fit-only", action="store_true",
                    help="only the 3DMM head fit (FaceVerse-sized): one clip alone and --clips in one fit")
    ap.add_argument("--mmpose-config", default=os.environ.get("DREAMACTOR_RTMW_CONFIG", f"mmpose::{RTMW_X_CONFIG}"))
    ap.add_argument("--face-size", default="full", choices=["full", "tiny", "none"],
                    help="the face/head part's network widths (tiny: a CPU smoke run; none: body only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from preprocess import demo_media

    if a.fit_only or a.head_fit_only:
        if a.head_fit_only:
            from bench import annotators_gpu_face as face

            vertices = face.VERTICES.get(a.face_size, face.VERTICES["tiny"])
            fit = face.bench_fit(a.frames, vertices, a.head_clips or a.clips)
        else:
            fit = bench_fit(a.frames, a.size, a.iters, a.clips)
        print(json.dumps(fit))
        if a.json:
            Path(a.json).write_text(json.dumps(fit, indent=1))
        return
    frames, _ = demo_media.render_motion(demo_media.load_photo("astronaut"), (a.size, a.size), a.frames,
                                         demo_media.Motion(shift=(a.size * 0.1, 0)))
    if a.keypoints_only:
        out = {"keypoints_ms_per_frame": bench_keypoints(frames, a.mmpose_config),
               "keypoints_variants": keypoint_variants(frames, a.mmpose_config) if a.keypoint_variants else {}}
        print(json.dumps(out))
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
        return
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "frames": a.frames, "size": a.size, "iters": a.iters,
           "detection_ms_per_frame": bench_detection(frames),
           "keypoints_ms_per_frame": bench_keypoints(frames, a.mmpose_config),
           "keypoints_variants": keypoint_variants(frames, a.mmpose_config) if a.keypoint_variants else {},
           "fit": bench_fit(a.frames, a.size, a.iters, a.clips)}
    print("| step | ms / frame |\n|---|---|")
    det = out["detection_ms_per_frame"]
    print(f"| detection (MediaPipe Pose, CPU) | {det if isinstance(det, str) else f'{det:.1f}'} |")
    k = out["keypoints_ms_per_frame"]
    print(f"| keypoints (mmpose wholebody, random weights) | {k if isinstance(k, str) else f'{k:.1f}'} |")
    f = out["fit"].get("together", out["fit"])  # the body stage fits --clips clips at once (full.yaml: 8)
    print(f"| SMPL-X fit ({out['fit']['device']}, {f['clips']} clips per fit, {a.iters} iters; {f['mean_px']:.2f} px "
          f"mean) | {f['ms_per_frame']:.1f} |")
    if a.face_size != "none":
        from bench import annotators_gpu_face as face

        out["face"] = face.measure(min(a.frames, 32), a.face_size, a.frames, a.head_clips or a.clips)
        for step in ("detection_ms", "landmarks_ms", "identity_ms", "fit_ms"):
            print(f"| face {step[:-3]} ({out['face']['device']}) | {out['face'][step]:.1f} |")
    total = f["ms_per_frame"] + sum(x for x in (det, k) if not isinstance(x, str))
    total += sum(out["face"][step] for step in ("detection_ms", "landmarks_ms", "identity_ms", "fit_ms")) \
        if "face" in out else 0.0
    out["total_ms_per_frame"] = total
    out["video_hours_per_device_hour"] = 1000 / (25 * total)  # one device, stages run one after the other
    print(f"| **all steps** | **{total:.1f}** ({out['video_hours_per_device_hour']:.2f} source-video-hours per "
          f"device-hour at 25 fps{'; skipped steps not counted' if str in (type(det), type(k)) else ''}) |")
    print(json.dumps(out))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
