"""Cost of each video metric (infer/metrics.py) at production shapes, and, where torchvision imports (the GPU
machine), a check of the plain-torch networks against torchvision's architectures.

Random videos, random-init networks of the real architectures (the cost does not depend on the weights): each
metric alone over ``--clips`` pairs of ``--frames`` frames, per mode, in seconds per frame pair.

    python bench/metrics.py --device cuda --frames 121 --height 480 --width 832 --clips 2 --out bench_metrics.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infer.metric_nets import LPIPS, InceptionFID, MetricNets  # noqa: E402
from infer.metrics import MODES, VideoScorer  # noqa: E402


def check_against_torchvision() -> dict:
    """torchvision's VGG16 / AlexNet ``features`` and Inception-v3 (1008 classes, no aux) state dicts load strictly
    into ours; the LPIPS backbones then give torchvision's activations exactly."""
    import torchvision

    out = {"torchvision": torchvision.__version__}
    x = torch.rand(2, 3, 96, 96)
    for net, build in (("vgg", torchvision.models.vgg16), ("alex", torchvision.models.alexnet)):
        tv, ours = build(weights=None).features.eval(), LPIPS(net).eval()
        ours.features.load_state_dict(tv.state_dict(), strict=True)
        with torch.no_grad():
            out[f"{net}_features_max_abs_diff"] = float((tv(x) - ours.features(x)).abs().max())
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).eval()
    ours = InceptionFID().eval()
    missing, unexpected = ours.load_state_dict(tv.state_dict(), strict=False)
    out["inception_missing"], out["inception_unexpected"] = missing, unexpected
    # pytorch-fid's FID blocks: torchvision's branches with average pools over real pixels only, and a max pool in
    # the pool branch of Mixed_7c; composed here from torchvision's own modules
    def avg(x):
        return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)

    fid_blocks = {
        "Mixed_5b": (192, 35, lambda m, x: [m.branch1x1(x), m.branch5x5_2(m.branch5x5_1(x)), m.branch3x3dbl_3(
            m.branch3x3dbl_2(m.branch3x3dbl_1(x))), m.branch_pool(avg(x))]),
        "Mixed_6b": (768, 17, lambda m, x: [m.branch1x1(x), m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x))),
                                            m.branch7x7dbl_5(m.branch7x7dbl_4(m.branch7x7dbl_3(m.branch7x7dbl_2(
                                                m.branch7x7dbl_1(x))))), m.branch_pool(avg(x))]),
        "Mixed_7b": (1280, 8, lambda m, x: _e(m, x, avg(x))),
        "Mixed_7c": (2048, 8, lambda m, x: _e(m, x, F.max_pool2d(x, 3, 1, 1))),
    }
    with torch.no_grad():
        for name, (c, s, branches) in fid_blocks.items():
            y = torch.rand(2, c, s, s)
            ref = torch.cat(branches(getattr(tv, name), y), 1)
            out[f"{name}_fid_block_max_abs_diff"] = float((ref - getattr(ours, name)(y)).abs().max())
    return out


def _e(m, x, pooled):
    """Inception E block branches (torchvision's modules) with the given pool-branch input."""
    a, d = m.branch3x3_1(x), m.branch3x3dbl_2(m.branch3x3dbl_1(x))
    return [m.branch1x1(x), m.branch3x3_2a(a), m.branch3x3_2b(a), m.branch3x3dbl_3a(d), m.branch3x3dbl_3b(d),
            m.branch_pool(pooled)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--frames", type=int, default=121)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "shape": [a.clips, a.frames, a.height, a.width]}
    try:
        res["torchvision_check"] = check_against_torchvision()
    except ImportError as e:
        res["torchvision_check"] = f"skipped: {e}"
    print(json.dumps(res, indent=1), flush=True)
    rng = np.random.default_rng(0)
    gen = [rng.integers(0, 256, (a.frames, a.height, a.width, 3), dtype=np.uint8) for _ in range(a.clips)]
    gt = [rng.integers(0, 256, (a.frames, a.height, a.width, 3), dtype=np.uint8) for _ in range(a.clips)]
    nets = MetricNets.random_init().to(a.device)
    for mode in a.modes:
        for metric in ("psnr", "ssim", "lpips", "fid", "fvd"):
            scorer = VideoScorer(mode, nets, [metric])
            t = time.perf_counter()
            for i, (g, r) in enumerate(zip(gen, gt)):
                scorer.add(str(i), g, r)
            agg = scorer.result()["aggregate"]
            dt = time.perf_counter() - t
            res[f"{mode}_{metric}_s_per_frame"] = dt / (a.clips * a.frames)
            print(f"{mode:5s} {metric:5s} {dt:7.2f} s  {1e3 * dt / (a.clips * a.frames):8.2f} ms/frame  "
                  f"value {agg[metric]:.4g}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
