"""infer/metrics.py: metric values against hand computations, paper vs clean definitions, the learned metrics end
to end with randomly initialised networks of the real architectures, and the weight files' checks."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from omegaconf import OmegaConf

from infer import metrics as M
from infer.metric_nets import (
    WEIGHTS,
    InceptionFID,
    InceptionI3d,
    MetricNets,
    ModelFileError,
    ScriptedI3D,
    WeightSetting,
    resolve_weight,
)

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)


def _frames(t=2, h=20, w=24, lo=0, hi=256, seed=0):
    return np.random.default_rng(seed).integers(lo, hi, (t, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def nets():
    return MetricNets.random_init(seed=0)


# ------------------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_offset_is_20_log10_peak_over_offset_in_both_ranges():
    gt = _frames(lo=0, hi=200)
    gen = gt.copy()
    gen[0] += 5
    gen[1] += 17
    expect = [20 * math.log10(255 / 5), 20 * math.log10(255 / 17)]
    np.testing.assert_allclose(M.psnr_frames(gen, gt, "paper"), expect, rtol=0, atol=1e-12)
    # clean: [0, 1] frames with data_range 1.0 -> the same number (documented): the ratio peak/RMSE is scale-free
    # (torchmetrics takes the log in float32: 1e-6 dB)
    np.testing.assert_allclose(M.psnr_frames(gen, gt, "clean"), expect, rtol=0, atol=1e-5)
    # a clip's value is the mean of its frames' PSNR (DisCo scores frames as images), not the PSNR of the mean MSE
    row = M.VideoScorer("paper").add("c", gen, gt)
    assert row["psnr"] == pytest.approx(np.mean(expect)) and row["psnr"] != pytest.approx(
        10 * math.log10(255 ** 2 / ((25 + 17 ** 2) / 2)))
    # equal frames: DisCo's 100 dB vs torchmetrics' inf
    assert M.psnr_frames(gt, gt, "paper").tolist() == [100.0, 100.0]
    assert np.isinf(M.psnr_frames(gt, gt, "clean")).all()


def test_disco_uint8_psnr_wraps_around_modulo_256():
    gt = np.full((1, 8, 8, 3), 100, np.uint8)
    gen = gt - 20  # every value 20 below: the true MSE is 400, DisCo's uint8 (a - b) ** 2 gives 400 mod 256 = 144
    assert M.psnr_frames(gen, gt, "paper")[0] == pytest.approx(20 * math.log10(255 / 20))
    assert M.psnr_uint8_wraparound(gen, gt)[0] == pytest.approx(10 * math.log10(255 ** 2 / 144))


# ------------------------------------------------------------------------------------------------------- SSIM


def _gray(x):
    """OpenCV's uint8 RGB -> gray: 15-bit fixed-point BT.601 luma with rounding."""
    r, g, b = (x[..., i].astype(np.int64) for i in range(3))
    return ((9798 * r + 19235 * g + 3735 * b + 16384) >> 15).astype(np.float64)


def _ssim_windows(x, y, weights, c1, c2, sample_cov):
    """Mean SSIM over every window position that fits, by the formula, one window at a time."""
    k = weights.shape[0]
    vals = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            a, b = x[i:i + k, j:j + k], y[i:i + k, j:j + k]
            ma, mb = (weights * a).sum(), (weights * b).sum()
            va, vb, cov = (weights * a * a).sum() - ma ** 2, (weights * b * b).sum() - mb ** 2, (
                weights * a * b).sum() - ma * mb
            if sample_cov:
                n = k * k
                va, vb, cov = va * n / (n - 1), vb * n / (n - 1), cov * n / (n - 1)
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_of_constant_frames_is_2ab_plus_c1_over_a2_plus_b2_plus_c1_in_both_modes():
    a, b = 100, 130
    gt, gen = np.full((1, 16, 16, 3), a, np.uint8), np.full((1, 16, 16, 3), b, np.uint8)
    c1 = (0.01 * 255) ** 2  # variances are 0: SSIM is the luminance term alone
    expect = (2 * a * b + c1) / (a * a + b * b + c1)
    assert M.ssim_frames(gen, gt, "paper")[0] == pytest.approx(expect, abs=1e-12)
    assert M.ssim_frames(gen, gt, "clean")[0] == pytest.approx(expect, abs=1e-12)  # same on [0, 1] with range 1


def test_ssim_matches_the_formula_over_windows_gray_7x7_paper_rgb_gaussian_clean():
    gt = _frames(1, 18, 18, seed=1)
    gen = np.clip(gt.astype(int) + np.random.default_rng(2).integers(-30, 31, gt.shape), 0, 255).astype(np.uint8)
    paper = _ssim_windows(_gray(gen[0]), _gray(gt[0]), np.full((7, 7), 1 / 49), (0.01 * 255) ** 2,
                          (0.03 * 255) ** 2, sample_cov=True)
    assert M.ssim_frames(gen, gt, "paper")[0] == pytest.approx(paper, abs=1e-10)
    d = np.arange(11) - 5
    g = np.exp(-(d / 1.5) ** 2 / 2)
    g /= g.sum()
    pad = [(5, 5), (5, 5)]  # a window centred on every pixel, the frame mirrored at its borders
    def channel(c):
        a, b = (np.pad(x[0, ..., c] / 255, pad, "reflect") for x in (gen, gt))
        return _ssim_windows(a, b, np.outer(g, g), 0.01 ** 2, 0.03 ** 2, sample_cov=False)

    clean = np.mean([channel(c) for c in range(3)])
    assert M.ssim_frames(gen, gt, "clean")[0] == pytest.approx(clean, abs=1e-10)


def test_colour_only_change_is_invisible_to_paper_grayscale_ssim_but_not_to_clean_rgb_ssim():
    gt = _frames(2, 24, 24, lo=100, hi=150, seed=3)
    sign = np.random.default_rng(4).choice([-1, 1], gt.shape[:3] + (1,))
    gen = (gt.astype(int) + sign * [30, -18, 14]).astype(np.uint8)  # 9798*30 - 19235*18 + 3735*14 = 0: same luma
    assert (_gray(gen) == _gray(gt)).all()
    assert M.ssim_frames(gen, gt, "paper").tolist() == [1.0, 1.0]
    assert (M.ssim_frames(gen, gt, "clean") < 0.6).all()
    # PSNR is on RGB in both modes: the per-pixel error is (30, 18, 14) everywhere
    assert M.psnr_frames(gen, gt, "paper") == pytest.approx([10 * math.log10(255 ** 2 * 3 / (900 + 324 + 196))] * 2)


# ------------------------------------------------------------------------------------------------------ LPIPS


def test_lpips_feeds_0_1_in_paper_mode_and_minus1_1_in_clean_mode(nets):
    gt = _frames(2, 32, 32, seed=4)
    gen = _frames(2, 32, 32, seed=5)
    unit = [torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (gen, gt)]
    with torch.no_grad():
        paper, clean = nets.lpips(*unit), nets.lpips(*(u * 2 - 1 for u in unit))
    np.testing.assert_allclose(M.lpips_frames(gen, gt, "paper", nets.lpips), paper.numpy(), rtol=1e-5)
    np.testing.assert_allclose(M.lpips_frames(gen, gt, "clean", nets.lpips), clean.numpy(), rtol=1e-5)
    assert (paper > 0).all() and (clean > 0).all() and not torch.allclose(paper, clean)
    assert M.lpips_frames(gt, gt, "clean", nets.lpips).tolist() == [0.0, 0.0]
    alex = MetricNets.random_init(lpips_net="alex", metrics=("lpips",)).lpips
    big = _frames(1, 64, 64, seed=6)
    assert M.lpips_frames(big, big, "paper", alex)[0] == 0 and M.lpips_frames(big[:, ::-1], big, "paper", alex)[0] > 0


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_equals_torchmetrics_lpips_with_the_same_backbone_weights_and_its_heads(net, tmp_path, monkeypatch):
    """torchmetrics' own LPIPS (its slicing, scaling layer, normalisation and head files) as the reference, given
    our random backbone in place of torchvision's (which does not install here)."""
    import copy

    import torchmetrics.functional.image.lpips as tm_lpips

    from infer.metric_nets import LPIPS, random_init

    ours = random_init(LPIPS(net), seed=7)
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda *a, **k: copy.deepcopy(ours.features))
    reference = tm_lpips._LPIPS(pretrained=True, net=net).eval()
    backbone = tmp_path / "backbone.pth"
    torch.save({f"features.{k}": v for k, v in ours.features.state_dict().items()}, backbone)
    ours.load_files(backbone, resolve_weight("lpips_vgg" if net == "vgg" else "lpips_alex")[0])
    x0, x1 = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x0, x1), reference(x0, x1).flatten(), rtol=1e-5, atol=1e-7)


def test_paper_mode_resizes_a_generated_clip_of_another_size_clean_mode_refuses():
    gt = _frames(3, 20, 24)
    gen = np.repeat(np.repeat(gt, 2, axis=1), 2, axis=2)  # 2x nearest upscale: cv2 bilinear back is exact-ish
    row = M.VideoScorer("paper").add("c", gen[:2], gt)
    assert row["resized_from"] == [48, 40] and row["frames"] == 2 and row["frames_ground_truth"] == 3
    with pytest.raises(ValueError, match="clean mode compares equal sizes"):
        M.VideoScorer("clean").add("c", gen, gt)


def test_as_video_takes_uint8_frames_or_a_vae_tensor():
    x = torch.linspace(-1, 1, 3 * 2 * 4 * 5).view(3, 2, 4, 5)
    v = M.as_video(x)
    assert v.shape == (2, 4, 5, 3) and v.dtype == np.uint8 and v[0, 0, 0, 0] == 0 and v[-1, -1, -1, -1] == 255
    assert (M.as_video(torch.from_numpy(v)) == v).all()
    with pytest.raises(ValueError, match=r"expected uint8 \(T, H, W, 3\)"):
        M.as_video(np.zeros((2, 4, 5, 3), np.float32), "clip")

# ------------------------------------------------------------------------------------------ Frechet distance


def test_frechet_distance_identical_zero_shifted_means_squared_shift_and_scipy_agreement():
    x = RNG.standard_normal((50, 8)) @ RNG.standard_normal((8, 8))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert M.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-9)
    shift = np.array([3.0, -1, 0, 2, 0, 0, 0.5, 0])
    assert M.frechet_distance(mu + shift, cov, mu, cov) == pytest.approx(shift @ shift, abs=1e-9)
    y = RNG.standard_normal((40, 8)) * 2 + 1
    mu2, cov2 = y.mean(0), np.cov(y, rowvar=False)
    s = scipy.linalg.sqrtm(cov @ cov2)
    ref = (mu - mu2) @ (mu - mu2) + np.trace(cov + cov2 - 2 * s.real)
    assert M.frechet_distance(mu, cov, mu2, cov2) == pytest.approx(ref, rel=1e-9)
    assert M.frechet_distance(mu2, cov2, mu, cov) == pytest.approx(ref, rel=1e-9)
    # fewer samples than dimensions (singular covariances, as FID on a few clips): finite, symmetric, >= 0
    a, b = RNG.standard_normal((5, 64)), RNG.standard_normal((6, 64))
    sa, sb = M.FeatureStats(), M.FeatureStats()
    sa.add(a[:2]), sa.add(a[2:]), sb.add(b)
    (ma, ca), (mb, cb) = sa.mean_cov(), sb.mean_cov()
    np.testing.assert_allclose(ca, np.cov(a, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(ma, a.mean(0), atol=1e-12)
    d = M.frechet_distance(ma, ca, mb, cb)
    assert d > 0 and d == pytest.approx(M.frechet_distance(mb, cb, ma, ca), rel=1e-7)
    assert M.frechet_distance(ma, ca, ma, ca) == pytest.approx(0, abs=1e-9)
    # the same distance in sample space (fewer samples than dimensions): |A1 A2^T|_* for tr((S1 S2)^(1/2))
    assert M.frechet_from_stats(sa, sb) == pytest.approx(d, rel=1e-7)
    assert M.frechet_from_stats(sa, sa) == pytest.approx(0, abs=1e-9)
    big = M.FeatureStats()
    big.add(RNG.standard_normal((70, 64)))
    assert big.rows is None and M.frechet_from_stats(big, sb) == pytest.approx(
        M.frechet_distance(*big.mean_cov(), mb, cb), rel=1e-9)

# ---------------------------------------------------------------------------------- resizes behind FID and FVD


def test_fid_and_fvd_resizes_are_the_documented_ones():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    # TF1 bilinear without half-pixel centres: halving samples the even pixels exactly
    assert torch.equal(M._resize_bilinear_tf1(x, 4), x[:, :, ::2, ::2])
    assert torch.equal(M._resize_bilinear_tf1(x, 8), x)
    # clean-fid's float PIL bicubic keeps a constant image constant (and does not round)
    flat = np.full((1, 30, 40, 3), 77, np.uint8)
    np.testing.assert_allclose(M._resize_pil_bicubic(flat, 299), 77, atol=1e-3)
    wide = np.zeros((16, 100, 300, 3), np.uint8)
    wide[:, :, 100:200] = 255  # the middle third is white
    clean, paper = M.fvd_frames(wide, "clean"), M.fvd_frames(wide, "paper")
    assert clean.shape == paper.shape == (16, 3, 224, 224)
    assert (clean[:, :, :, 2:-2] == 1).all()  # short side to 224, centre crop: the white third fills the crop
    # squeezed to 224 x 224, the whole width kept; PIL bicubic overshoots at the edges, unclipped as in clean-fid
    assert paper[0, 0, 0, 0] == pytest.approx(-1) and paper[0, 0, 0, 112] == pytest.approx(1) and paper.min() < -1
    assert M.clip_starts(17, M.FVD_STRIDE["paper"]) == [0, 1] and M.clip_starts(40, M.FVD_STRIDE["clean"]) == [0, 16]

# --------------------------------------------------------------------- learned metrics end to end, random nets


def _clips(seed):
    return [_frames(16, 16, 20, seed=seed + i) for i in range(2)]


@pytest.fixture
def small_inputs(monkeypatch):
    """The real networks on small inputs (Inception's smallest, 75 px; I3D at 64 px): the same code path in
    seconds instead of a minute of CPU."""
    monkeypatch.setattr(M, "FID_SIZE", 75)
    monkeypatch.setattr(M, "FVD_SIZE", 64)


def test_identical_videos_score_zero_on_every_metric(nets, small_inputs):
    a = _clips(10)
    res = M.score_videos(a, a, "paper", nets, fid_every=16)
    agg = res["aggregate"]
    assert agg["psnr"] == 100 and agg["ssim"] == 1 and agg["lpips"] == 0
    assert agg["fid"] == pytest.approx(0, abs=1e-6) and agg["fvd"] == pytest.approx(0, abs=1e-6)
    assert agg["fid_samples"] == 2 and agg["fvd_samples"] == 2 and agg["frames"] == 32
    assert set(res["definitions"]) == {"psnr", "ssim", "lpips", "fid", "fvd"}
    assert res["clips"]["00000"]["fvd_clips"] == 1 and len(res["clips"]["00001"]["per_frame"]["lpips"]) == 16


def test_different_videos_score_above_zero_on_every_metric(nets, small_inputs):
    a, b = _clips(10), _clips(20)
    agg = M.score_videos({"x": b[0], "y": b[1]}, {"x": a[0], "y": a[1]}, "clean", nets, fid_every=16)["aggregate"]
    assert agg["lpips"] > 0 and agg["fid"] > 0 and agg["fvd"] > 0 and agg["psnr"] < 20 and agg["ssim"] < 0.5


def test_too_few_fvd_clips_give_nan_with_the_reason(nets, small_inputs):
    short = [_frames(8, 16, 16)]
    res = M.score_videos(short, short, "clean", MetricNets(i3d=nets.i3d), metrics=["fvd"])
    assert math.isnan(res["aggregate"]["fvd"]) and "at least 2 samples" in res["notes"]["fvd"]

# ------------------------------------------------------------------------------------------------- weight files


def _pinned(tmp_path, name, state):
    p = tmp_path / WEIGHTS[name].name
    torch.save(state, p)
    return {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def test_released_layouts_load_into_the_architectures(tmp_path):
    """Files laid out as torchvision's VGG16, pytorch-fid's Inception and DisCo/VideoGPT's I3D load exactly; the
    LPIPS heads are the real file shipped inside torchmetrics (sha256 checked)."""
    src = MetricNets.random_init(seed=3)
    vgg = {f"features.{k}": v for k, v in src.lpips.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # the full torchvision file has the classifier too
    inc = {k: v for k, v in src.inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    i3d = src.i3d.state_dict()
    for key, shape in [("features.28.weight", (512, 512, 3, 3))]:
        assert tuple(vgg[key].shape) == shape
    for key, shape in [("Mixed_7c.branch3x3dbl_3b.conv.weight", (384, 384, 3, 1)), ("fc.weight", (1008, 2048)),
                       ("Conv2d_1a_3x3.bn.running_var", (32,))]:
        assert tuple(inc[key].shape) == shape
    for key, shape in [("Conv3d_1a_7x7.conv3d.weight", (64, 3, 7, 7, 7)), ("Mixed_5c.b3b.conv3d.weight",
                                                                          (128, 832, 1, 1, 1)),
                       ("logits.conv3d.bias", (400,)), ("Mixed_4f.b1b.bn.running_mean", (320,))]:
        assert tuple(i3d[key].shape) == shape
    weights = {"vgg16": _pinned(tmp_path, "vgg16", vgg), "inception_fid": _pinned(tmp_path, "inception_fid", inc),
               "i3d_pretrained_400": _pinned(tmp_path, "i3d_pretrained_400", i3d)}
    cfg = M.MetricsConfig.from_cfg({**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/metrics/default.yaml")),
                                    "fvd_network": "i3d_pretrained_400", "weights": weights})
    loaded = cfg.load_nets()
    for a, b in [(loaded.lpips.features, src.lpips.features), (loaded.inception, src.inception),
                 (loaded.i3d, src.i3d)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            if not k.endswith("num_batches_tracked"):
                assert torch.equal(x, y), k
    heads = loaded.files["lpips_vgg"]
    assert heads["sha256"] == WEIGHTS["lpips_vgg"].sha256 and "torchmetrics" in heads["file"]
    assert all((h.weight >= 0).all() for h in loaded.lpips.heads)  # trained LPIPS weights are non-negative
    assert isinstance(loaded.i3d, InceptionI3d) and isinstance(loaded.inception, InceptionFID)


class _FakeScriptedI3D(torch.nn.Module):
    """Stands in for i3d_torchscript.pt: reports what it was called with."""

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        seen = torch.stack([x.min(), x.max(), torch.tensor(float(x.shape[2])), torch.tensor(float(x.shape[3])),
                            torch.tensor(float(rescale)), torch.tensor(float(resize)),
                            torch.tensor(float(return_features))])
        return seen.expand(x.shape[0], 7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_i3d_gets_preprocessed_clips_with_its_own_resize_and_rescale_off(tmp_path):
    p = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_FakeScriptedI3D()).save(str(p))
    nets = MetricNets.load({"i3d_torchscript": {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}},
                           metrics=("fvd",))
    assert isinstance(nets.i3d, ScriptedI3D)
    video = _frames(20, 30, 40)
    video[0, 0, 0] = (0, 255, 0)
    f = M.i3d_features(video, "clean", nets.i3d)
    assert f.shape == (1, 7) and f[0].tolist()[2:] == [16.0, 224.0, 0.0, 0.0, 1.0]
    assert -1 <= f[0, 0] and f[0, 1] <= 1


def test_a_missing_or_wrong_weight_file_names_the_file_the_setting_and_the_url(tmp_path):
    w = WEIGHTS["inception_fid"]
    with pytest.raises(ModelFileError) as e:
        resolve_weight("inception_fid")
    assert w.name in str(e.value) and "metrics.weights.inception_fid.path" in str(e.value) and w.url in str(e.value)
    with pytest.raises(ModelFileError, match="is missing") as e:
        MetricNets.load({"vgg16": {"path": str(tmp_path / "nope.pth")}}, metrics=("lpips",))
    assert WEIGHTS["vgg16"].url in str(e.value) and "metrics.weights.vgg16.path" in str(e.value)
    junk = tmp_path / "vgg16-397923af.pth"
    junk.write_bytes(b"not the weights")
    with pytest.raises(ModelFileError, match="does not start with 397923af"):
        resolve_weight("vgg16", WeightSetting(path=str(junk)))
    with pytest.raises(ModelFileError, match="expected 00"):
        resolve_weight("vgg16", WeightSetting(path=str(junk), sha256="00" * 32))
    digest = hashlib.sha256(b"not the weights").hexdigest()
    with pytest.raises(ModelFileError, match=f"metrics.weights.i3d_torchscript.sha256={digest}"):
        resolve_weight("i3d_torchscript", WeightSetting(path=str(junk)))
    assert resolve_weight("i3d_torchscript", WeightSetting(path=str(junk), sha256=digest))[1] == digest
    path, digest = resolve_weight("lpips_alex")  # the real head file inside torchmetrics, checked
    assert digest == WEIGHTS["lpips_alex"].sha256 and path.is_file()


def test_config_is_typed_and_rejects_what_cannot_work():
    base = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/metrics/default.yaml"))
    cfg = M.MetricsConfig.from_cfg(OmegaConf.create(base))
    assert cfg.mode == "paper" and cfg.weights["inception_fid"] == WeightSetting() and cfg.fid_every == 1
    assert set(base["weights"]) == set(WEIGHTS)
    with pytest.raises(ValueError, match="metrics.mode='disco'"):
        M.MetricsConfig.from_cfg({**base, "mode": "disco"})
    with pytest.raises(ValueError, match="unknown \\['inception'\\]"):
        M.MetricsConfig.from_cfg({**base, "weights": {"inception": {}}})
    with pytest.raises(ValueError, match="metric fid needs its network"):
        M.VideoScorer("clean", metrics=["psnr", "fid"])

# ------------------------------------------------------------------------------------------------------ folders


def test_score_folders_matches_by_name_and_lists_the_rest(tmp_path):
    import cv2

    from preprocess.video import encode_mp4

    gen, gt = tmp_path / "gen", tmp_path / "gt"
    for d in (gen, gt):
        d.mkdir()
    clip = encode_mp4(_frames(4, 32, 32, seed=7), fps=8)
    (gen / "a.mp4").write_bytes(clip)
    (gt / "a.mp4").write_bytes(clip)
    (gen / "only_generated.mp4").write_bytes(clip)
    (gt / "broken.mp4").write_bytes(b"\x00" * 64)
    (gen / "broken.mp4").write_bytes(clip)
    frames = _frames(3, 16, 16, seed=8)
    for d, shift in ((gen, 10), (gt, 0)):
        (d / "b").mkdir()
        for i, f in enumerate(frames):
            cv2.imwrite(str(d / "b" / f"{i:03d}.png"), cv2.cvtColor(np.clip(f.astype(int) + shift, 0, 255).astype(
                np.uint8), cv2.COLOR_RGB2BGR))
    res = M.score_folders(gen, gt, "paper")
    assert sorted(res["clips"]) == ["a", "b"] and res["clips"]["a"]["psnr"] == 100
    assert res["clips"]["b"]["frames"] == 3 and res["clips"]["b"]["psnr"] < 100
    assert res["unmatched"] == {"generated": ["only_generated"], "ground_truth": []}
    assert list(res["failed"]) == ["broken"]
    with pytest.raises(FileNotFoundError, match="namesake"):
        M.score_folders(gen / "b", gt / "b", "paper")
