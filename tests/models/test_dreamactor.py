"""The top-level model: inputs, condition dropout, training stages, pretrained loading, and an end-to-end
overfit of one clip (VAE latents of a real photo, rendered control maps)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.conditions import Conditions
from models.dreamactor import PARAM_GROUPS, DreamActor, param_group_of
from models.flow import add_noise, flow_loss

from .conftest import astronaut_clip, forward, random_batch


def test_forward_shapes_and_validation(tiny_model):
    b = random_batch(tiny_model.cfg)
    out = forward(tiny_model, b)
    assert out.shape == b["noisy_latents"].shape
    with pytest.raises(ValueError, match="pose_maps"):
        forward(tiny_model, {**b, "pose_maps": b["pose_maps"][:, :, :5]})
    with pytest.raises(ValueError, match="face_crops"):
        forward(tiny_model, {**b, "face_crops": None})
    assert forward(tiny_model, {**b, "face_crops": None}, use_face=False).shape == out.shape


def test_drop_ref_is_a_zero_reference_and_drop_motion_ignores_controls(tiny_model):
    with torch.no_grad():
        for p in tiny_model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    b = random_batch(tiny_model.cfg)
    mask = torch.tensor([True, False])
    with torch.no_grad():
        dropped = forward(tiny_model, b, drop_ref=mask)
        zero_ref = forward(tiny_model,
                           {**b, "ref_latents": b["ref_latents"] * torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1)})
        torch.testing.assert_close(dropped, zero_ref)
        out = forward(tiny_model, b, drop_motion=mask)
        other = dict(b, pose_maps=torch.rand_like(b["pose_maps"]), face_crops=torch.rand_like(b["face_crops"]))
        out2 = forward(tiny_model, other, drop_motion=mask)
    torch.testing.assert_close(out[0], out2[0])  # sample 0 ignores its pose maps and face crops
    assert (out[1] - out2[1]).abs().max() > 1e-4  # sample 1 does not


def test_cond_latents_enter_through_the_conditioning_channels(tiny_model):
    b = random_batch(tiny_model.cfg, batch=1)
    with torch.no_grad():
        for p in tiny_model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
        given = torch.randn_like(b["noisy_latents"])
        mask = torch.tensor([[1.0, 0.0, 0.0]])
        out = forward(tiny_model, b, cond_latents=given, cond_mask=mask)
        # Only the masked frame of cond_latents matters.
        other = given.clone()
        other[:, :, 1:] = torch.randn_like(other[:, :, 1:])
        torch.testing.assert_close(forward(tiny_model, b, cond_latents=other, cond_mask=mask), out)
        assert (forward(tiny_model, b) - out).abs().max() > 1e-4


def test_param_groups_and_stages(tiny_model):
    groups = tiny_model.named_param_groups()
    assert set(groups) == set(PARAM_GROUPS)
    assert sum(len(v) for v in groups.values()) == len(list(tiny_model.parameters()))
    assert param_group_of("dit.blocks.0.face_attn.to_q.weight") == "face_attn"
    assert param_group_of("dit.blocks.0.ref_attn.to_q.weight") == "dit"
    assert param_group_of("dit.pose_embed.weight") == "pose_encoder"
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    stage1 = {names[id(p)] for p in tiny_model.trainable_parameters(1)}
    stage2 = {names[id(p)] for p in tiny_model.trainable_parameters(2)}
    assert not any("face" in n for n in stage1) and any(".ref_attn." in n for n in stage1)
    assert all(n.startswith("face_encoder.") or ".face_attn." in n or ".norm_face." in n for n in stage2)
    assert len(tiny_model.trainable_parameters(3)) == len(names)
    with pytest.raises(ValueError):
        tiny_model.trainable_parameters(4)


def test_stage2_trains_only_face_parts(tiny_model):
    with torch.no_grad():  # as after stage 1: the output projection is no longer zero
        tiny_model.dit.proj_out.weight.normal_(0, 0.1)
    tiny_model.set_stage(2)
    b = random_batch(tiny_model.cfg, batch=1)
    b["face_valid"] = torch.tensor([[True, True, False, True, True, True, True, True, True]])
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.detach().clone() for n, p in tiny_model.named_parameters() if not p.requires_grad}
    for _ in range(2):  # Face Attn's output starts at zero: the encoder gets gradients from the second step
        opt.zero_grad()
        forward(tiny_model, b).square().mean().backward()
        opt.step()
    for n, p in tiny_model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert tiny_model.face_encoder.mlp[0].weight.grad.abs().sum() > 0


def _synthetic_pose_maps(cfg, frames, size):
    """Skeleton + head-sphere maps of a body swaying sideways, rendered by models.render."""
    from models.render import render_control_maps
    from models.skeleton import SMPLX_JOINT_NAMES

    names = tuple(SMPLX_JOINT_NAMES[:22])
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.3, (22, 3)) + [0, 0, 3.0]
    joints = np.stack([base + [0.05 * k, 0, 0] for k in range(frames)])
    k = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], dtype=float)
    a = np.deg2rad(np.linspace(-30, 30, frames))
    rot = np.stack([np.diag([1.0, -1, -1])
                    @ np.array([[np.cos(x), 0, np.sin(x)], [0, 1, 0], [-np.sin(x), 0, np.cos(x)]])
                    for x in a])
    maps = render_control_maps((size, size), cfg.render, joints3d=joints, joint_conf=np.ones((frames, 22)), K=k,
                               head_center=np.tile([size / 2, size / 4], (frames, 1)), head_rotation=rot,
                               head_radius=np.full(frames, size / 8), joint_names=names)
    from models.render import maps_to_tensor

    return maps_to_tensor(maps)[None]


@pytest.mark.slow  # ~30-60 s; the default suite's learning test (tests/train/test_learning.py) trains end to end
def test_overfits_one_clip(tiny_cfg):
    """Stage-1 training on one clip (latents of a panning photo, rendered controls): loss falls 10x."""
    from models.vae import VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE.from_config(tiny_cfg.vae, None)
    x0 = vae.encode(astronaut_clip(frames=9, size=32)[None])
    ref = vae.encode(astronaut_clip(frames=1, size=32, shift=7)[None])
    pose = _synthetic_pose_maps(tiny_cfg, 9, 32)
    model = DreamActor.from_config(tiny_cfg)
    model.set_stage(1)
    sigma = torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.randn(4, *x0.shape[1:], generator=torch.Generator().manual_seed(1))
    xt, target = add_noise(x0.expand(4, -1, -1, -1, -1), noise, sigma)
    opt = torch.optim.AdamW(model.trainable_parameters(1), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        cond = Conditions(ref.expand(4, -1, -1, -1, -1), pose.expand(4, -1, -1, -1, -1))
        loss = flow_loss(model(xt, sigma, cond, use_face=False), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    assert model.pose_encoder.conv_in.weight.grad.abs().sum() > 0  # the controls are used


def test_load_pretrained_end_to_end(tiny_cfg, tmp_path):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    d = tiny_cfg.dit
    wan = WanTransformer3DModel(patch_size=d.patch_size, num_attention_heads=d.num_heads, attention_head_dim=d.head_dim,
                                in_channels=16, out_channels=16, text_dim=d.text_dim, freq_dim=d.freq_dim,
                                ffn_dim=d.ffn_dim, num_layers=d.num_layers)
    wan.save_pretrained(tmp_path / "wan")
    face = DreamActor(tiny_cfg).face_encoder
    torch.save({k: v for k, v in face.state_dict().items() if not k.startswith(("mlp", "no_face", "slot"))},
               tmp_path / "motion_model.pth")
    torch.save(torch.randn(d.text_len, d.text_dim), tmp_path / "context.pt")
    cfg = tiny_cfg.replace(weights={"required": True, "wan_transformer_dir": str(tmp_path / "wan"),
                                    "vae_dir": str(tmp_path / "vae"), "pdfgc_path": str(tmp_path / "motion_model.pth"),
                                    "text_context_path": str(tmp_path / "context.pt")})
    model = DreamActor.from_config(cfg)
    torch.testing.assert_close(model.dit.blocks[0].ffn.fc1.weight, wan.blocks[0].ffn.net[0].proj.weight)
    torch.testing.assert_close(model.face_encoder.model.fc.weight, face.model.fc.weight)
    torch.testing.assert_close(model.dit.text_context, torch.load(tmp_path / "context.pt"))


def test_required_weights_name_the_missing_settings(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(weights={"required": True})
    with pytest.raises(FileNotFoundError, match="model.weights.wan_transformer_dir.*model.weights.pdfgc_path"):
        DreamActor.from_config(cfg)
    cfg = tiny_cfg.replace(weights={"wan_transformer_dir": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        DreamActor.from_config(cfg)
    assert DreamActor.from_config(cfg, load_weights=False).num_parameters() > 0
