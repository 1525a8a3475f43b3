"""Face/head annotator hot paths per frame on whatever device is present (CUDA when onnxruntime / torch have it).

    python bench/annotators_gpu_face.py [frames=32] [size=full|tiny]

Models with random weights of the real sizes, so no model file is needed: the detector is an SCRFD-shaped network
(640² input, 9 outputs at strides 8/16/32; ~det_10g's convolution widths), the landmark model a ResNet-ish 192²
network with 212 outputs, ArcFace an R50-sized 112² -> 512 network (``size=tiny`` shrinks the widths for a CPU
smoke run; the shapes stay). They are exported to ONNX and run by onnxruntime (CUDA provider when present), one
frame at a time for detection (as the backend does) and one batch per clip for landmarks and identity. The 3DMM fit
(``morphable.fit_clip``, or ``fit_clips`` for several clips in one fit) runs on FaceVerse-sized random bases (~28k
vertices, 150 identity, 52 expression bases, 68 keypoints) over clips of turning heads. Prints ms per frame per step
and JSON. Where onnxruntime has no CUDA provider but PyTorch has a GPU (the lent machine), the networks are timed
instead at their real sizes in PyTorch on the GPU (``bench_networks_torch``; the onnxruntime CPU figures are kept
beside them).

``bench/annotators_gpu.py`` runs this part (``measure``) after the body part and adds up the whole stack.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WIDTHS = {"full": (64, 128, 256, 512), "tiny": (8, 16, 32, 64)}
VERTICES = {"full": 28000, "tiny": 2000}  # of the 3DMM (FaceVerse's ~28k; the fit uses its 68 keypoints only)


def _device_providers():
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]


def _export(net, shape, path, dynamic_batch=True):
    import torch

    x = torch.zeros(*shape)
    torch.onnx.export(net.eval(), (x,), path, input_names=["input.1"], opset_version=17, dynamo=False,
                      dynamic_axes={"input.1": {0: "batch"}} if dynamic_batch else None)
    return path


def _backbone(widths, strides_out=False):
    import torch.nn as nn

    layers, c = [], 3
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, 2, 1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, 1, 1), nn.ReLU()]
        c = w
    return nn.Sequential(*layers), c


class _SCRFDLike:
    """torch module factory: 9 SCRFD outputs (score/bbox/kps x strides 8, 16, 32, 2 anchors each)."""

    @staticmethod
    def make(widths):
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1), nn.ReLU(),
                                          nn.Conv2d(widths[0], widths[0], 3, 2, 1), nn.ReLU())  # /4
                self.s8 = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.ReLU())
                self.s16 = nn.Sequential(nn.Conv2d(widths[1], widths[2], 3, 2, 1), nn.ReLU())
                self.s32 = nn.Sequential(nn.Conv2d(widths[2], widths[2], 3, 2, 1), nn.ReLU())
                self.heads = nn.ModuleList([nn.Conv2d(c, 2 * k, 1) for k in (1, 4, 10)
                                            for c in (widths[1], widths[2], widths[2])])

            def forward(self, x):
                f8 = self.s8(self.stem(x))
                f16 = self.s16(f8)
                f32 = self.s32(f16)
                outs = []
                for i, k in enumerate((1, 4, 10)):
                    for j, f in enumerate((f8, f16, f32)):
                        o = self.heads[i * 3 + j](f).permute(0, 2, 3, 1).reshape(-1, k)
                        outs.append(torch.sigmoid(o) if k == 1 else o)
                return tuple(outs)

        return Net()


def _regressor(widths, in_size, out_dim):
    import torch.nn as nn

    body, c = _backbone(widths)
    return nn.Sequential(body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, out_dim))


def _time(fn, n):
    fn()  # warm-up (session set-up, CUDA kernels)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_detection(d, widths, frames, providers):
    import onnxruntime as ort

    path = _export(_SCRFDLike.make(widths), (1, 3, 640, 640), os.path.join(d, "det.onnx"), dynamic_batch=False)
    s = ort.InferenceSession(path, providers=providers)
    x = np.random.rand(1, 3, 640, 640).astype(np.float32)
    return _time(lambda: s.run(None, {"input.1": x}), frames) * 1000  # one frame per call


def bench_landmarks(d, widths, frames, providers):
    import onnxruntime as ort

    path = _export(_regressor(widths, 192, 212), (1, 3, 192, 192), os.path.join(d, "lmk.onnx"))
    s = ort.InferenceSession(path, providers=providers)
    x = np.random.rand(frames, 3, 192, 192).astype(np.float32)
    return _time(lambda: s.run(None, {"input.1": x}), 3) * 1000 / frames  # one batch per clip


def bench_identity(d, widths, frames, providers):
    import onnxruntime as ort

    path = _export(_regressor(widths, 112, 512), (1, 3, 112, 112), os.path.join(d, "arcface.onnx"))
    s = ort.InferenceSession(path, providers=providers)
    x = np.random.rand(frames, 3, 112, 112).astype(np.float32)
    return _time(lambda: s.run(None, {"input.1": x}), 3) * 1000 / frames


def iresnet50(in_size: int = 112, out_dim: int = 512):
    """ArcFace's IResNet-50 (insightface's ``w600k_r50``: 43.6 M parameters, 6.3 G multiply-adds at 112²): BN-conv-
    BN-PReLU-conv-BN residual blocks [3, 4, 14, 3] at widths 64-512, the first stride 1, then BN, a fully connected
    512-D embedding and BN. At ``in_size`` 192 with ``out_dim`` 204 it stands for the 3D-68 landmark model (a
    ResNet-50-class network at 192², 1k3d68; heavier than it, so a conservative stand-in)."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.PReLU(cout),
                                      nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + (x if self.down is None else self.down(x))

    layers, c = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)], 64
    for w, n in zip((64, 128, 256, 512), (3, 4, 14, 3)):
        layers += [Block(c, w, 2)] + [Block(w, w, 1) for _ in range(n - 1)]
        c = w
    side = in_size // 16
    return nn.Sequential(*layers, nn.BatchNorm2d(512), nn.Flatten(), nn.Linear(512 * side * side, out_dim),
                         nn.BatchNorm1d(out_dim))


def bench_networks_torch(frames: int, clip_batch: int = 16, device: str = "cuda", iters: int | None = None) -> dict:
    """The face networks at (or above) their real sizes in PyTorch on the CUDA device (cuDNN, fp32 with TF32 as
    onnxruntime's CUDA provider runs by default): the stand-in where onnxruntime has no CUDA provider. Detection: an
    SCRFD-shaped network scaled to ~27 GFLOP at 640² (det_10g: 10 G multiply-adds at 640x480), one frame per call
    as the backend calls it, and ``clip_batch`` frames per call; 2D-106 landmarks: the ResNet-ish 192² regressor
    (3.8 GFLOP, above 2d106det's); 3D-68 landmarks: IResNet-50 at 192²; identity: IResNet-50 at 112² (w600k_r50's
    own architecture). Every figure: ms per frame, with the network's GFLOP per frame and parameters (``iters``
    timed calls, default enough for ~64 frames; ``device`` cpu: a smoke run of the same code)."""
    import torch

    from preprocess.annotators.common import tf32

    dev = torch.device(device)
    nets = {"detection": (_SCRFDLike.make((160, 320, 640, 1280)), 640, 1),
            "detection_batched": (_SCRFDLike.make((160, 320, 640, 1280)), 640, clip_batch),
            "landmarks_106": (_regressor(WIDTHS["full"], 192, 212), 192, frames),
            "landmarks_68": (iresnet50(192, 204), 192, frames),
            "identity": (iresnet50(112, 512), 112, frames)}
    out = {}
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    with tf32(True):
        for name, (net, size, batch) in nets.items():
            out[name] = _time_network(net.to(dev).eval(), size, batch, dev, iters)
    torch.backends.cudnn.benchmark = benchmark
    return out


def _time_network(net, size: int, batch: int, dev, iters: int | None) -> dict:
    """ms per frame of ``net`` on batches of ``batch`` random ``size``² frames, its GFLOP per frame, parameters."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(batch, 3, size, size, device=dev)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x[:1])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = iters or max(3, 64 // batch)
    with torch.no_grad():
        for _ in range(min(3, n)):
            net(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            net(x)
        sync()
    return {"ms_per_frame": (time.perf_counter() - t0) / (n * batch) * 1000, "batch": batch,
            "gflop_per_frame": fc.get_total_flops() / 1e9, "mparams": sum(p.numel() for p in net.parameters()) / 1e6}


def _moving_heads(model, frames: int, clips: int, K, seed: int = 0) -> list[np.ndarray]:
    """Landmarks (frames, 68, 2) px of ``clips`` heads turning (yaw -40..40 degrees) and crossing the image, each its
    own identity and expressions, 0.5 px noise."""
    from preprocess.annotators.geometry import rotation_from_ypr

    rng = np.random.default_rng(seed)
    mean, idb, exb = model.landmarks()
    out = []
    for _ in range(clips):
        s = np.linspace(0, 1, frames)
        ident = rng.normal(0, 1, idb.shape[-1])
        expr = rng.normal(0, 0.5, exb.shape[-1]) * np.sin(2 * np.pi * s[:, None] + rng.uniform(0, 6, exb.shape[-1]))
        X = mean + idb @ ident + np.einsum("ljk,tk->tlj", exb, expr)
        R = np.stack([rotation_from_ypr(y, 5 * np.sin(3 * a), 0) for y, a in zip(np.linspace(-40, 40, frames), s)])
        t = np.stack([-0.05 + 0.1 * s, 0.02 * np.sin(2 * s), 0.7 + 0.1 * s], 1)
        P = np.einsum("tij,tlj->tli", R, X) + t[:, None]
        uv = P @ K.T
        out.append(uv[..., :2] / uv[..., 2:3] + rng.normal(0, 0.5, (frames, 68, 2)))
    return out


def bench_fit(frames, n_vertices, clips: int = 1, seed=0) -> dict:
    """The 3DMM fit (FaceVerse-sized random bases) of one clip of ``frames`` moving-head frames alone
    (``morphable.fit_clip``) and, with ``clips`` > 1, of that many clips in one ``fit_clips``, side by side after a
    short warm-up: ms per frame and the median landmark error reached."""
    from preprocess.annotators.geometry import intrinsics
    from preprocess.annotators.morphable import FitConfig, MorphableModel, fit_clip, fit_clips

    rng = np.random.default_rng(seed)
    face = np.stack([np.linspace(-0.07, 0.07, 68), rng.normal(0, 0.04, 68), rng.normal(-0.08, 0.01, 68)], 1)
    mean = np.concatenate([rng.normal(0, 0.05, (n_vertices - 68, 3)), face])
    model = MorphableModel(mean, rng.normal(0, 1e-3, (n_vertices, 3, 150)), rng.normal(0, 1e-3, (n_vertices, 3, 52)),
                           np.arange(n_vertices - 68, n_vertices))
    K = intrinsics(512, 512, 1.0)
    uvs = _moving_heads(model, frames, max(clips, 2), K, seed)
    ones = np.ones((frames, 68))
    warm = FitConfig(iters=2, rounds=1)  # CUDA context, kernels, allocator
    fit_clip(model, uvs[0][:4], ones[:4], K, warm)
    fit_clips(model, [(u[:4], ones[:4], K) for u in uvs[:2]], warm)
    t0 = time.perf_counter()
    res = fit_clip(model, uvs[0], ones, K)
    dt = time.perf_counter() - t0
    out = {"ms_per_frame": dt * 1000 / frames, "seconds": dt, "clips": 1, "frames": frames,
           "median_px": float(np.nanmedian(res.error_px))}
    if clips > 1:
        t0 = time.perf_counter()
        many = fit_clips(model, [(u, ones, K) for u in uvs[:clips]])
        dt = time.perf_counter() - t0
        out["together"] = {"clips": clips, "ms_per_frame": dt * 1000 / (clips * frames), "seconds": dt,
                           "median_px": float(np.nanmedian(np.concatenate([r.error_px for r in many])))}
        out["speedup"] = out["ms_per_frame"] / out["together"]["ms_per_frame"]
        import torch

        if torch.cuda.is_available():  # the same fit with its evaluations launched eagerly (no CUDA graph)
            t0 = time.perf_counter()
            eager = fit_clips(model, [(u, ones, K) for u in uvs[:clips]], FitConfig(cuda_graph=False))
            dt = time.perf_counter() - t0
            out["together_eager"] = {"clips": clips, "ms_per_frame": dt * 1000 / (clips * frames), "seconds": dt,
                                     "median_px": float(np.nanmedian(np.concatenate([r.error_px for r in eager])))}
            out["graph_speedup"] = out["together_eager"]["ms_per_frame"] / out["together"]["ms_per_frame"]
    return out


def measure(frames: int, size: str, fit_frames: int | None = None, clips: int = 1) -> dict:
    """ms per frame of each face/head step (see the module doc): the networks on ``frames`` frames, the 3DMM fit on
    clips of ``fit_frames`` (default ``frames``), ``clips`` of them in one fit (``fit_ms``: the fastest measured)."""
    widths, providers = WIDTHS[size], _device_providers()
    import torch

    with tempfile.TemporaryDirectory() as d:
        fit = bench_fit(fit_frames or frames, VERTICES[size], clips)
        res = {"device": providers[0], "torch_device": "cuda" if torch.cuda.is_available() else "cpu",
               "size": size, "frames": frames,
               "detection_ms": bench_detection(d, widths, frames, providers),
               "landmarks_ms": bench_landmarks(d, widths, frames, providers),
               "identity_ms": bench_identity(d, widths, frames, providers),
               "fit_ms": fit.get("together", fit)["ms_per_frame"], "fit": fit}
    if providers[0] == "CPUExecutionProvider" and torch.cuda.is_available() and size == "full":
        # onnxruntime without its CUDA provider: the networks' GPU figures come from their PyTorch stand-ins
        nets = bench_networks_torch(frames)
        res["onnx_cpu_ms"] = {k: res[k] for k in ("detection_ms", "landmarks_ms", "identity_ms")}
        res.update(device="cuda (PyTorch stand-ins, bench_networks_torch)", networks=nets,
                   detection_ms=nets["detection"]["ms_per_frame"],
                   landmarks_ms=nets["landmarks_106"]["ms_per_frame"] + nets["landmarks_68"]["ms_per_frame"],
                   identity_ms=nets["identity"]["ms_per_frame"])
    return res


def main(argv):
    args = dict(a.split("=", 1) for a in argv)
    res = measure(int(args.get("frames", 32)), args.get("size", "full"))
    print("| step | ms / frame |\n|---|---|")
    for k in ("detection_ms", "landmarks_ms", "identity_ms", "fit_ms"):
        print(f"| {k[:-3]} | {res[k]:.2f} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
