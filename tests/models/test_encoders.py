"""Pose encoder and face motion encoder: shapes, causal grouping onto latent frames, PD-FGC weight format."""
from __future__ import annotations

import pytest
import torch

from models.config import load_preset
from models.face_encoder import FaceMotionEncoder, load_pdfgc_weights
from models.pose_encoder import PoseEncoder


def test_pose_encoder_shape_and_causal_grouping(tiny_cfg):
    torch.manual_seed(0)
    enc = PoseEncoder(tiny_cfg.pose_encoder, 4, 8).eval()
    maps = torch.rand(2, 6, 13, 32, 48)
    out = enc(maps)
    assert out.shape == (2, tiny_cfg.pose_encoder.out_channels, 4, 4, 6)
    # Pixel frame 6 belongs to latent frame 2 (frames 5..8): only that latent frame may change.
    changed = maps.clone()
    changed[:, :, 6] = torch.rand_like(changed[:, :, 6])
    diff = (enc(changed) - out).abs().amax(dim=(0, 1, 3, 4))
    assert diff[2] > 0 and diff[[0, 1, 3]].max() == 0
    # Frame 0 is latent frame 0 on its own.
    changed = maps.clone()
    changed[:, :, 0] = 0
    diff = (enc(changed) - out).abs().amax(dim=(0, 1, 3, 4))
    assert diff[0] > 0 and diff[1:].max() == 0
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        enc(maps[:, :, :12])


def test_face_encoder_tokens_per_latent_frame(tiny_cfg):
    torch.manual_seed(0)
    enc = FaceMotionEncoder(tiny_cfg.face_encoder, token_dim=32, group=4).eval()
    crops = torch.rand(2, 5, 3, 64, 64) * 2 - 1
    tokens = enc(crops)
    assert enc.motion_dim == 6 + 30 + 64  # [eye ; emotion ; mouth] at width 1/8
    assert tokens.shape == (2 * 2, 4, 32)  # (B * latent frames, group, dim)
    # Latent frame 0 holds frame 0's token in every slot (slot embeddings aside).
    first = tokens[0] - enc.slot_embed
    torch.testing.assert_close(first, first[:1].expand(4, -1))
    # A frame's crop changes only the tokens of its latent frame and slot.
    changed = crops.clone()
    changed[0, 3] = -changed[0, 3]
    diff = (enc(changed) - tokens).abs().amax(-1)
    assert diff[1, 2] > 0 and diff.sum() == diff[1, 2]
    # Frames without a face get the learned no-face token.
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    masked = enc(crops, valid)
    torch.testing.assert_close(masked[3, 3], enc.no_face + enc.slot_embed[3])


def test_face_encoder_keeps_batchnorm_frozen(tiny_cfg):
    enc = FaceMotionEncoder(tiny_cfg.face_encoder, token_dim=32, group=4)
    assert not enc.model.bn1.training  # from construction on
    enc.train()
    bn = enc.model.bn1
    before = bn.running_mean.clone()
    enc(torch.rand(1, 1, 3, 64, 64))
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert enc.mlp.training


# Keys and shapes of PD-FGC-inference's FanEncoder state dict (motion_model.pth), from its public code.
PDFGC_KEYS = {
    "model.conv1.weight": (64, 3, 7, 7), "model.conv2.downsample.2.weight": (128, 64, 1, 1),
    "model.conv4.conv3.weight": (64, 64, 3, 3), "model.m0.b1_4.bn1.running_var": (256,),
    "model.m0.b2_plus_1.conv3.weight": (64, 64, 3, 3), "model.m0.b3_1.conv1.weight": (128, 256, 3, 3),
    "model.top_m_0.conv2.weight": (64, 128, 3, 3), "model.conv_last0.weight": (256, 256, 1, 1),
    "model.bn_end0.weight": (256,), "model.l0.weight": (68, 256, 1, 1), "model.bn5.running_mean": (68,),
    "model.conv6.weight": (1, 68, 3, 3), "model.fc.weight": (512, 784), "to_mouth.0.weight": (512, 512),
    "to_mouth.2.running_mean": (512,), "to_mouth.3.weight": (512, 512), "to_eye.3.bias": (512,),
    "eye_embed.1.weight": (6, 512), "to_emo.2.weight": (512,), "emo_embed.1.weight": (30, 512),
}


@pytest.fixture(scope="module")
def pdfgc_encoder():
    torch.manual_seed(0)
    return FaceMotionEncoder(load_preset("wan1_3b").face_encoder, token_dim=16, group=4).eval()


def test_pdfgc_architecture_matches_published_state_dict(pdfgc_encoder):
    sd = pdfgc_encoder.state_dict()
    for key, shape in PDFGC_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    with torch.no_grad():
        assert pdfgc_encoder.motion_vectors(torch.rand(2, 3, 224, 224)).shape == (2, 548)


def test_pdfgc_weights_load_from_file(pdfgc_encoder, tmp_path):
    # A PD-FGC-format file: wrapped, with the unused head-pose head and DataParallel prefixes.
    sd = {f"module.{k}": v.clone() + 0.01 for k, v in pdfgc_encoder.state_dict().items()
          if not k.startswith(("mlp.", "no_face", "slot_embed"))}
    sd["module.to_headpose.0.weight"] = torch.zeros(512, 512)
    sd["module.mouth_embed.1.weight"] = torch.zeros(500, 512)
    torch.save({"state_dict": sd}, tmp_path / "motion_model.pth")
    fresh = FaceMotionEncoder(load_preset("wan1_3b").face_encoder, token_dim=16, group=4).eval()
    load_pdfgc_weights(fresh, tmp_path / "motion_model.pth")
    crops = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fresh.model.conv1.weight, pdfgc_encoder.model.conv1.weight + 0.01)
        assert not torch.equal(fresh.motion_vectors(crops), pdfgc_encoder.motion_vectors(crops))
        loaded_again = FaceMotionEncoder(load_preset("wan1_3b").face_encoder, token_dim=16, group=4).eval()
        load_pdfgc_weights(loaded_again, tmp_path / "motion_model.pth")
        torch.testing.assert_close(fresh.motion_vectors(crops), loaded_again.motion_vectors(crops))


def test_pdfgc_errors(tiny_cfg, tmp_path):
    enc = FaceMotionEncoder(tiny_cfg.face_encoder, token_dim=16, group=4)
    with pytest.raises(FileNotFoundError, match="weights.pdfgc_path"):
        load_pdfgc_weights(enc, tmp_path / "missing.pth")
    big = FaceMotionEncoder(load_preset("wan1_3b").face_encoder, token_dim=16, group=4)
    torch.save(big.state_dict(), tmp_path / "full.pth")
    with pytest.raises(ValueError, match="width must be 1.0"):
        load_pdfgc_weights(enc, tmp_path / "full.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(KeyError, match="not a PD-FGC"):
        load_pdfgc_weights(enc, tmp_path / "other.pth")


def test_channels_last_encoders_compute_the_same_function(tiny_cfg):
    """The NHWC activation layout of the conv encoders (their default, cuDNN's native layout) changes no value
    and no gradient: the same weights and inputs in NCHW agree to float rounding."""
    torch.manual_seed(0)
    pose = PoseEncoder(tiny_cfg.pose_encoder, 4, 8)
    face = FaceMotionEncoder(tiny_cfg.face_encoder, token_dim=32, group=4)
    assert pose.channels_last and face.model.channels_last  # the defaults
    maps = torch.rand(2, 6, 9, 32, 48)
    crops = torch.rand(1, 5, 3, 64, 64) * 2 - 1
    results = {}
    for layout in (True, False):
        pose.channels_last = face.model.channels_last = layout
        pose.zero_grad(), face.zero_grad()
        out_p, out_f = pose(maps), face(crops)
        (out_p.square().sum() + out_f.square().sum()).backward()
        grads = [p.grad.clone() for p in (*pose.parameters(), *face.parameters()) if p.grad is not None]
        results[layout] = (out_p.detach(), out_f.detach(), grads)
    (p1, f1, g1), (p0, f0, g0) = results[True], results[False]
    torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-6)
    assert len(g1) == len(g0) > 10
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
