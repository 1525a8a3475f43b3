"""Video metrics of generated vs ground-truth clips (paper Tables 1-3: FID, SSIM, PSNR, LPIPS, FVD), in two modes.

**paper** is the DisCo protocol (Wangt-CN/DisCo ``tool/metrics``) that most human-animation papers report
(DisCo, Animate Anyone, MagicAnimate, Champ): PSNR on uint8 RGB, SSIM of the grayscale frames
(scikit-image defaults), VGG-LPIPS fed [0, 1] frames, FID on frames resized the clean-fid way, FVD on 16-frame
windows with the I3D. **clean** uses the torchmetrics definitions with explicit data ranges: PSNR and RGB SSIM on
[0, 1] with ``data_range=1.0``, LPIPS on [-1, 1] (its nominal range), FID as torchmetrics computes it, FVD as
StyleGAN-V / fvd-comparison preprocess it. ``DEFINITIONS`` states each one exactly (docs/evaluation.md has the
table); both are reported with the mode and the weight files' sha256.

Inputs are videos as uint8 (T, H, W, 3) RGB frames (numpy or torch), or float (3, T, H, W) tensors in [-1, 1] as
the VAE decodes them. Per-frame metrics (PSNR, SSIM, LPIPS) are averaged per clip and over all frames of all clips
(DisCo scores every frame as an image); FID and FVD compare the feature distributions of all generated vs all
ground-truth frames / clips. ``VideoScorer`` accumulates clip by clip (features as running sums, so a dataset
never sits in memory); ``score_videos`` and ``score_folders`` wrap it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from infer.metric_nets import WEIGHTS, MetricNets, WeightSetting

MODES = ("paper", "clean")
PAIRWISE = ("psnr", "ssim", "lpips")
DISTRIBUTION = ("fid", "fvd")
FVD_FRAMES = 16  # frames per FVD clip in both modes
FID_SIZE, FVD_SIZE = 299, 224  # network input sizes (tests shrink them to run the real networks on tiny inputs)
FVD_STRIDE = {"paper": 1, "clean": FVD_FRAMES}  # DisCo makes a clip at every frame; StyleGAN-V: disjoint clips
PAPER_PSNR_IDENTICAL = 100.0  # DisCo's psnr_eval returns 100 when the MSE is 0

DEFINITIONS = {
    "paper": {
        "psnr": "per frame 20*log10(255/sqrt(MSE)), MSE over the uint8 RGB values in float64 (100 when 0); "
                "DisCo tool/metrics/ssim_l1_lpips_psnr.py psnr_eval",
        "ssim": "per frame skimage.metrics.structural_similarity of the cv2 RGB2GRAY uint8 frames: 7x7 uniform "
                "window, sample covariance, K1=0.01, K2=0.03, data_range=255",
        "lpips": "per frame LPIPS v0.1 (VGG16 unless lpips_net) fed [0,1] frames (DisCo passes ToTensor() output "
                 "to lpips.LPIPS(net='vgg'), whose nominal input range is [-1,1])",
        "fid": "all frames: each channel as float32, PIL bicubic to 299x299 (clean-fid, as DisCo), Inception-v3 "
               "pool3 (2048), (x-128)/128 inside; Frechet distance of the two Gaussians, unbiased covariances",
        "fvd": "every 16-frame window (stride 1, DisCo's GIF clips): PIL bicubic float to 224x224, x/127.5-1, "
               "I3D Kinetics-400 logits (400); Frechet distance over clips, unbiased covariances",
    },
    "clean": {
        "psnr": "per frame torchmetrics peak_signal_noise_ratio on [0,1] frames, data_range=1.0 (inf when equal)",
        "ssim": "per frame torchmetrics structural_similarity_index_measure on RGB [0,1] frames, data_range=1.0, "
                "11x11 Gaussian sigma=1.5, K1=0.01, K2=0.03, population variances, mean over channels and the "
                "windows centred on every pixel of the frame reflect-padded by 5 (torchmetrics>=1.9)",
        "lpips": "per frame LPIPS v0.1 (VGG16 unless lpips_net) on [-1,1] frames (torchmetrics "
                 "LearnedPerceptualImagePatchSimilarity with normalize=True on [0,1])",
        "fid": "all frames as torchmetrics FrechetInceptionDistance: uint8, TF1-style bilinear resize to 299x299 "
               "(torch-fidelity), (x-128)/128, Inception-v3 pool3 (2048), unbiased covariances",
        "fvd": "disjoint 16-frame clips: short side bilinear to 224 + centre crop, [0,1]->[-1,1] "
               "(universome/fvd-comparison, StyleGAN-V), I3D Kinetics-400 logits (400), unbiased covariances",
    },
}


# ------------------------------------------------------------------------------------------------------ inputs


def as_video(x, name: str = "video") -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames from uint8 frames (numpy or torch) or a float (3, T, H, W) tensor in [-1, 1]."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.ndim == 4 and x.shape[0] == 3:
            from models.vae import frames_uint8  # the one (3, T, H, W) [-1, 1] -> uint8 conversion

            return frames_uint8(x)
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 (T, H, W, 3) RGB frames or a float (3, T, H, W) tensor in [-1, 1], "
                         f"got {x.dtype} {tuple(x.shape)}")
    return x


def _device(net) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float64 (T, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).double() / 255.0


def _pair(gen: np.ndarray, gt: np.ndarray, mode: str, key: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Generated frames comparable with the ground truth: DisCo resizes a generated frame of another size to the
    ground truth's (cv2 bilinear); clean mode refuses. Lengths are cut to the shorter, recorded."""
    notes = {}
    if len(gen) != len(gt):
        notes["frames_generated"], notes["frames_ground_truth"] = len(gen), len(gt)
        n = min(len(gen), len(gt))
        gen, gt = gen[:n], gt[:n]
    if gen.shape[1:3] != gt.shape[1:3]:
        if mode == "clean":
            raise ValueError(f"{key}: generated frames are {gen.shape[2]}x{gen.shape[1]}, ground truth "
                             f"{gt.shape[2]}x{gt.shape[1]}; clean mode compares equal sizes only")
        import cv2

        notes["resized_from"] = [int(gen.shape[2]), int(gen.shape[1])]
        gen = np.stack([cv2.resize(f, (gt.shape[2], gt.shape[1])) for f in gen])
    return gen, gt, notes

# -------------------------------------------------------------------------------------------- per-frame metrics


def psnr_frames(gen: np.ndarray, gt: np.ndarray, mode: str) -> np.ndarray:
    """(T,) PSNR in dB of uint8 frames; the two modes agree except on equal frames (100 vs inf)."""
    if mode == "paper":
        mse = np.square(gen.astype(np.float64) - gt.astype(np.float64)).mean(axis=(1, 2, 3))
        with np.errstate(divide="ignore"):
            return np.where(mse == 0, PAPER_PSNR_IDENTICAL, 20 * np.log10(255.0 / np.sqrt(mse)))
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(_unit(gen), _unit(gt), data_range=1.0, reduction="none", dim=(1, 2, 3)).numpy()


def psnr_uint8_wraparound(gen: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(T,) PSNR exactly as DisCo's code computes it on cv2's uint8 arrays, where ``(a - b) ** 2`` wraps modulo 256.
    Only for comparing with numbers produced by that code; ``psnr_frames`` is the PSNR."""
    mse = ((gen - gt) ** 2).mean(axis=(1, 2, 3))  # uint8 arithmetic on purpose
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, PAPER_PSNR_IDENTICAL, 20 * np.log10(255.0 / np.sqrt(mse)))


def ssim_frames(gen: np.ndarray, gt: np.ndarray, mode: str, batch: int = 16) -> np.ndarray:
    """(T,) SSIM of uint8 frames: grayscale scikit-image (paper) or RGB torchmetrics (clean)."""
    if mode == "paper":
        import cv2
        from skimage.metrics import structural_similarity

        gray = cv2.COLOR_RGB2GRAY  # DisCo: cv2.imread (BGR) then COLOR_BGR2GRAY, the same luma
        return np.array([structural_similarity(cv2.cvtColor(a, gray), cv2.cvtColor(b, gray), data_range=255)
                         for a, b in zip(gen, gt)], dtype=np.float64)
    from torchmetrics.functional.image import structural_similarity_index_measure

    return np.concatenate([structural_similarity_index_measure(_unit(gen[i:i + batch]), _unit(gt[i:i + batch]),
                                                               data_range=1.0, reduction="none").numpy()
                           for i in range(0, len(gen), batch)])


@torch.no_grad()
def lpips_frames(gen: np.ndarray, gt: np.ndarray, mode: str, net, batch: int = 16) -> np.ndarray:
    """(T,) LPIPS of uint8 frames, fed to the network as [0, 1] (paper) or [-1, 1] (clean)."""
    dev = _device(net)
    out = []
    for i in range(0, len(gen), batch):
        a, b = (_unit(x[i:i + batch]).float().to(dev) for x in (gen, gt))
        if mode == "clean":
            a, b = a * 2 - 1, b * 2 - 1
        out.append(net(a, b).double().cpu().numpy())
    return np.concatenate(out)

# ---------------------------------------------------------------------------------------- distribution metrics


class FeatureStats:
    """Running count, sum and sum of outer products of feature vectors (float64): mean and covariance of any
    number of samples in O(D^2) memory (StyleGAN-ADA's FeatureStats, torchmetrics' FID states). While there are
    fewer samples than dimensions the rows are kept too, for the exact sample-space distance."""

    def __init__(self):
        self.n, self.sum, self.outer, self.rows = 0, None, None, []

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, dtype=np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.rows = self.rows + [f] if self.rows is not None and self.n < f.shape[1] else None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased (n - 1) covariance, as np.cov (DisCo, fvd-comparison) and torchmetrics."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.n}")
        mean = self.sum / self.n
        return mean, (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)


def frechet_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """Frechet distance of two feature sets. With fewer samples than dimensions it is computed in sample space:
    with S = A^T A (A: centred rows / sqrt(n - 1)), tr(S1) = |A1|_F^2 and tr((S1 S2)^(1/2)) is the sum of the
    singular values of A1 A2^T (S1 S2 and A1 A2^T A2 A1^T share their non-zero eigenvalues): exact, and an
    n1 x n2 SVD instead of D x D eigendecompositions."""
    if a.rows is None or b.rows is None:
        return frechet_distance(*a.mean_cov(), *b.mean_cov())
    if min(a.n, b.n) < 2:
        raise ValueError(f"a covariance needs at least 2 samples, have {min(a.n, b.n)}")
    x, y = np.concatenate(a.rows), np.concatenate(b.rows)
    mx, my = x.mean(0), y.mean(0)
    ax, ay = (x - mx) / math.sqrt(len(x) - 1), (y - my) / math.sqrt(len(y) - 1)
    nuclear = np.linalg.svd(ax @ ay.T, compute_uv=False).sum()
    d = mx - my
    return max(float(d @ d + np.square(ax).sum() + np.square(ay).sum() - 2 * nuclear), 0.0)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2) (similar to S1 S2): eigh on symmetric matrices, no complex parts to drop as with
    scipy.linalg.sqrtm(S1 @ S2), exact for the singular covariances of fewer samples than dimensions. In float64
    through torch.linalg (LAPACK's eigh here is ~8x faster than numpy's at 2048 dimensions). Rounding can leave
    about -1e-12 for equal inputs: the result is clamped at 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics of different sizes: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    s1, s2 = torch.from_numpy((s1 + s1.T) / 2), torch.from_numpy((s2 + s2.T) / 2)
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())
    d = mu1 - mu2
    return max(float(d @ d + s1.trace() + s2.trace()) - 2 * tr_covmean, 0.0)


def _resize_pil_bicubic(frames: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's "clean" resize (DisCo's FID and FVD): each channel as a float32 image, PIL bicubic to
    size x size (antialiased when shrinking), neither rounded nor clipped. (T, size, size, 3) float32."""
    from PIL import Image

    out = np.empty((len(frames), size, size, 3), np.float32)
    for i, f in enumerate(frames):
        for c in range(3):
            ch = Image.fromarray(np.ascontiguousarray(f[:, :, c], dtype=np.float32))
            out[i, :, :, c] = np.asarray(ch.resize((size, size), Image.BICUBIC))
    return out


def _resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x ``resize_bilinear`` without half-pixel centres (source = destination * in/out), as torch-fidelity
    emulates it for torchmetrics' FID, with its float32 arithmetic (width, then height; ``a + (b - a) * w``), so
    the result is the same to the bit on CPU. (N, C, H, W) float32 -> (N, C, size, size)."""
    for dim in (3, 2):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n / size, dtype=torch.float32)
        i0 = src.long()
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0.float()).view([-1 if d == dim else 1 for d in range(4)])
        a = x.index_select(dim, i0)
        x = a + (x.index_select(dim, i1) - a) * w
    return x


@torch.no_grad()
def inception_features(frames: np.ndarray, mode: str, net, batch: int = 16) -> np.ndarray:
    """(N, 2048) FID features of uint8 frames, resized as the mode defines."""
    dev = _device(net)
    out = []
    for i in range(0, len(frames), batch):
        f = frames[i:i + batch]
        if mode == "paper":
            x = torch.from_numpy(_resize_pil_bicubic(f, FID_SIZE)).permute(0, 3, 1, 2)
        else:
            x = _resize_bilinear_tf1(torch.from_numpy(np.ascontiguousarray(f)).permute(0, 3, 1, 2).float(), FID_SIZE)
        out.append(net(x.to(dev)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


def fvd_frames(video: np.ndarray, mode: str) -> torch.Tensor:
    """(T, 3, 224, 224) float32 in [-1, 1]: the video as the mode feeds it to the I3D."""
    size = FVD_SIZE
    if mode == "paper":
        x = torch.from_numpy(_resize_pil_bicubic(video, size)).permute(0, 3, 1, 2)
        return x / 127.5 - 1
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(size, math.ceil(w * s)) if h < w else (math.ceil(h * s), size), mode="bilinear",
                      align_corners=False)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return (x[:, :, top:top + size, left:left + size] - 0.5) * 2


def clip_starts(n_frames: int, stride: int) -> list[int]:
    """First frames of the 16-frame FVD clips of an ``n_frames`` video."""
    return list(range(0, n_frames - FVD_FRAMES + 1, stride))


@torch.no_grad()
def i3d_features(video: np.ndarray, mode: str, net, stride: int | None = None, batch: int = 4) -> np.ndarray:
    """(K, 400) FVD features of the video's 16-frame clips (stride: the mode's unless given)."""
    starts = clip_starts(len(video), stride or FVD_STRIDE[mode])
    if not starts:
        return np.zeros((0, 400))
    x = fvd_frames(video, mode)
    dev = _device(net)
    out = []
    for i in range(0, len(starts), batch):
        clips = torch.stack([x[s:s + FVD_FRAMES] for s in starts[i:i + batch]]).transpose(1, 2)  # (B, 3, 16, ...)
        out.append(net(clips.to(dev)).double().cpu().numpy())
    return np.concatenate(out)

# ------------------------------------------------------------------------------------------------------ scoring


CHOICES = {"mode": MODES, "lpips_net": ("vgg", "alex"), "fvd_network": ("i3d_torchscript", "i3d_pretrained_400")}


@dataclass
class MetricsConfig:
    """``metrics.*`` (conf/metrics/default.yaml): the mode, the networks' choices and weight files, and the
    sampling of frames and clips for FID and FVD."""

    mode: str
    lpips_net: str  # vgg | alex
    fvd_network: str  # i3d_torchscript | i3d_pretrained_400
    fvd_stride: int | None  # null: the mode's (paper 1, clean 16)
    fid_every: int  # FID on every k-th frame (1: all, as DisCo)
    batch: int
    weights: dict[str, WeightSetting] = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg) -> MetricsConfig:
        """Typed and checked ``metrics`` config; a wrong value raises naming its key."""
        from omegaconf import OmegaConf

        d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
        missing = [k for k in ("mode", "lpips_net", "fvd_network", "fvd_stride", "fid_every", "batch", "weights")
                   if k not in d]
        if missing:
            raise ValueError(f"metrics: missing {missing} (conf/metrics/default.yaml has every key)")
        for key, allowed in CHOICES.items():
            if d.get(key) not in allowed:
                raise ValueError(f"metrics.{key}={d.get(key)!r}: use one of {allowed}")
        unknown = sorted(set(d.get("weights") or {}) - set(WEIGHTS))
        if unknown:
            raise ValueError(f"metrics.weights: unknown {unknown}; known: {sorted(WEIGHTS)}")
        weights = {k: WeightSetting(**(v or {})) for k, v in (d.get("weights") or {}).items()}
        return cls(mode=d["mode"], lpips_net=d["lpips_net"], fvd_network=d["fvd_network"], fvd_stride=d["fvd_stride"],
                   fid_every=int(d["fid_every"]), batch=int(d["batch"]), weights=weights)

    def load_nets(self, metrics=("lpips", "fid", "fvd"), device="cpu") -> MetricNets:
        """The configured networks, each file checked against its sha256."""
        return MetricNets.load(self.weights, self.lpips_net, self.fvd_network, metrics, device)


class VideoScorer:
    """Scores generated vs ground-truth clips one pair at a time; ``result()`` gives per-clip and aggregate metrics.

    ``metrics``: any of psnr, ssim, lpips, fid, fvd (default: psnr and ssim, plus each learned metric whose
    network ``nets`` holds). FID uses every ``fid_every``-th frame; FVD the 16-frame clips at ``fvd_stride``.
    """

    def __init__(self, mode: str, nets: MetricNets | None = None, metrics=None, *, fid_every: int = 1,
                 fvd_stride: int | None = None, batch: int = 16):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: use one of {MODES}")
        nets = nets or MetricNets()
        have = {"lpips": nets.lpips, "fid": nets.inception, "fvd": nets.i3d}
        self.metrics = tuple(metrics) if metrics else ("psnr", "ssim") + tuple(m for m, n in have.items() if n)
        for m in self.metrics:
            if m not in PAIRWISE + DISTRIBUTION:
                raise ValueError(f"unknown metric {m!r}; known: {PAIRWISE + DISTRIBUTION}")
            if m in have and have[m] is None:
                raise ValueError(f"metric {m} needs its network: load it with MetricNets.load(..., metrics=[{m!r}])")
        self.mode, self.nets, self.fid_every, self.batch = mode, nets, fid_every, batch
        self.fvd_stride = fvd_stride or FVD_STRIDE[mode]
        self.clips: dict[str, dict] = {}
        self.stats = {m: {"generated": FeatureStats(), "ground_truth": FeatureStats()} for m in DISTRIBUTION}

    def add(self, key: str, generated, ground_truth) -> dict:
        """Score one clip pair; returns (and keeps) its row: frame count, per-clip means and per-frame values."""
        if key in self.clips:
            raise ValueError(f"clip {key!r} scored twice")
        gen, gt, notes = _pair(as_video(generated, f"{key} (generated)"),
                               as_video(ground_truth, f"{key} (ground truth)"),
                               self.mode, key)
        row = {"frames": len(gt), **notes, "per_frame": {}}
        for m in (m for m in PAIRWISE if m in self.metrics):
            v = (psnr_frames(gen, gt, self.mode) if m == "psnr" else ssim_frames(gen, gt, self.mode, self.batch)
                 if m == "ssim" else lpips_frames(gen, gt, self.mode, self.nets.lpips, self.batch))
            row[m] = float(v.mean())
            row["per_frame"][m] = [float(x) for x in v]
        if "fid" in self.metrics:
            for side, v in (("generated", gen), ("ground_truth", gt)):
                self.stats["fid"][side].add(inception_features(v[::self.fid_every], self.mode, self.nets.inception,
                                                               self.batch))
        if "fvd" in self.metrics:
            for side, v in (("generated", gen), ("ground_truth", gt)):
                f = i3d_features(v, self.mode, self.nets.i3d, self.fvd_stride)
                if len(f):
                    self.stats["fvd"][side].add(f)
            row["fvd_clips"] = len(clip_starts(len(gt), self.fvd_stride))
        self.clips[key] = row
        return row

    def result(self) -> dict:
        """JSON-ready: the mode, each metric's definition, aggregate values, per-clip rows and the weight files.
        Per-frame metrics aggregate as the mean over all frames; FID/FVD are NaN (with a note) below 2 samples."""
        agg, notes = {"clips": len(self.clips), "frames": sum(r["frames"] for r in self.clips.values())}, {}
        for m in (m for m in PAIRWISE if m in self.metrics):
            agg[m] = float(np.mean([x for r in self.clips.values() for x in r["per_frame"][m]])) if self.clips \
                else math.nan
        for m in (m for m in DISTRIBUTION if m in self.metrics):
            s = self.stats[m]
            agg[f"{m}_samples"] = s["generated"].n
            try:
                agg[m] = frechet_from_stats(s["generated"], s["ground_truth"])
            except ValueError as e:
                agg[m], notes[m] = math.nan, str(e)
        return {"mode": self.mode, "definitions": {m: DEFINITIONS[self.mode][m] for m in self.metrics},
                "settings": {"fid_every": self.fid_every, "fvd_frames": FVD_FRAMES, "fvd_stride": self.fvd_stride,
                             "lpips_net": self.nets.lpips.net if self.nets.lpips is not None else None},
                "aggregate": agg, "notes": notes, "clips": self.clips, "weights": self.nets.files}


def score_videos(generated, ground_truth, mode: str, nets: MetricNets | None = None, keys=None, **kwargs) -> dict:
    """Score matched sequences (or dicts by key) of generated and ground-truth videos; ``kwargs`` go to
    ``VideoScorer`` (metrics, fid_every, fvd_stride, batch). Returns ``VideoScorer.result()``."""
    if isinstance(generated, dict):
        keys = sorted(generated) if keys is None else keys
        pairs = [(k, generated[k], ground_truth[k]) for k in keys]
    else:
        if len(generated) != len(ground_truth):
            raise ValueError(f"{len(generated)} generated vs {len(ground_truth)} ground-truth videos")
        keys = [f"{i:05d}" for i in range(len(generated))] if keys is None else list(keys)
        pairs = list(zip(keys, generated, ground_truth))
    scorer = VideoScorer(mode, nets, **kwargs)
    for k, g, t in pairs:
        scorer.add(str(k), g, t)
    return scorer.result()


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".m4v"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def read_video(path) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames of a video file, or of a folder of frame images (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        import cv2

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{p}: a folder without frame images ({sorted(IMAGE_SUFFIXES)})")
        frames = [cv2.imread(str(f), cv2.IMREAD_COLOR) for f in files]
        bad = [f.name for f, im in zip(files, frames) if im is None]
        if bad:
            raise ValueError(f"{p}: unreadable frame images {bad[:5]}")
        return np.stack([cv2.cvtColor(im, cv2.COLOR_BGR2RGB) for im in frames])
    import av

    from preprocess.video import iter_frames, probe

    try:
        frames = list(iter_frames(str(p), rotation=probe(str(p)).rotation))
    except av.error.FFmpegError as e:
        raise ValueError(f"{p}: does not decode ({e})") from None
    if not frames:
        raise ValueError(f"{p}: no decodable frame")
    return np.stack(frames)


def _videos_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in VIDEO_SUFFIXES or (f.is_dir() and any(
                g.suffix.lower() in IMAGE_SUFFIXES for g in f.iterdir())):
            key = f.stem if f.is_file() else f.name
            if key in found:
                raise ValueError(f"{folder}: two videos named {key!r} ({found[key].name}, {f.name})")
            found[key] = f
    return found


def score_folders(generated_dir, ground_truth_dir, mode: str, nets: MetricNets | None = None, **kwargs) -> dict:
    """Score every video of ``generated_dir`` against its namesake in ``ground_truth_dir`` (file name without the
    extension; a folder of frames counts as a video). Unmatched names and unreadable pairs are listed in the
    result (``unmatched``, ``failed``) rather than stopping the run."""
    gen, gt = _videos_in(Path(generated_dir)), _videos_in(Path(ground_truth_dir))
    common = sorted(set(gen) & set(gt))
    if not common:
        raise FileNotFoundError(f"no video in {generated_dir} has a namesake in {ground_truth_dir} "
                                f"(generated: {sorted(gen)[:5]}, ground truth: {sorted(gt)[:5]})")
    scorer, failed = VideoScorer(mode, nets, **kwargs), {}
    for key in common:
        try:
            g, t = read_video(gen[key]), read_video(gt[key])
        except (OSError, ValueError, RuntimeError) as e:  # an unreadable pair is recorded, the others scored
            failed[key] = f"{type(e).__name__}: {e}"
            continue
        scorer.add(key, g, t)
    if not scorer.clips:
        raise ValueError(f"no pair could be read: {failed}")
    res = scorer.result()
    res["unmatched"] = {"generated": sorted(set(gen) - set(gt)), "ground_truth": sorted(set(gt) - set(gen))}
    res["failed"] = failed
    return res
