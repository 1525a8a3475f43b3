"""The DiT: parity with diffusers' Wan transformer, the paper's Ref Attn reshape, per-frame Face Attn,
activation checkpointing."""
from __future__ import annotations

import pytest
import torch

from models.config import load_preset
from models.dit import _ATTENTION_OPS, CheckpointPlan, DiT, activation_bytes, checkpoint_plan
from models.layers import attention
from models.wan_convert import load_wan_transformer, rename_wan_key


def tiny_wan(i2v: bool, seed: int = 0):
    """A tiny randomly initialised diffusers Wan transformer (every parameter random, none zero)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                in_channels=36 if i2v else 16, out_channels=16, text_dim=24, freq_dim=32,
                                ffn_dim=48, num_layers=2, image_dim=20 if i2v else None,
                                added_kv_proj_dim=32 if i2v else None).eval()
    with torch.no_grad():
        for p in wan.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return wan


def converted(tiny_cfg, wan, tmp_path, i2v: bool) -> DiT:
    """Our DiT with the Wan weights, loaded from a diffusers directory on disk."""
    cfg = tiny_cfg.replace(dit={"text_dim": 24, "text_len": 512 if i2v else 7, "freq_dim": 32, "ffn_dim": 48,
                                    "image_dim": 20 if i2v else None, "image_len": 5})
    dit = DiT(cfg.dit, pose_channels=cfg.pose_encoder.out_channels).eval()
    wan.save_pretrained(tmp_path / "transformer")
    report = load_wan_transformer(dit, tmp_path / "transformer")
    assert all(".ref_attn." in k or ".face_attn." in k or ".norm_ref." in k or ".norm_face." in k
               or k.startswith("pose_embed.") for k in report["new"])
    return dit


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_parity_with_diffusers_wan(tiny_cfg, tmp_path, i2v):
    wan = tiny_wan(i2v)
    dit = converted(tiny_cfg, wan, tmp_path, i2v)
    torch.manual_seed(1)
    b, text_len = 2, dit.cfg.text_len
    x, sigma = torch.randn(b, 16, 3, 8, 12), torch.rand(b)
    dit.text_context.copy_(torch.randn(text_len, 24))
    kwargs, cond = {}, None
    if i2v:
        cond = torch.randn(b, 20, 3, 8, 12)
        dit.image_context.copy_(torch.randn(5, 20))
        kwargs["encoder_hidden_states_image"] = dit.image_context[None].expand(b, -1, -1)
    with torch.no_grad():
        ref = wan(x if cond is None else torch.cat([x, cond], 1), sigma * 1000,
                  dit.text_context[None].expand(b, -1, -1), return_dict=False, **kwargs)[0]
        ours = dit(x, sigma, cond=cond)  # DreamActor inputs absent
        pose = torch.randn(b, dit.cfg.latent_channels // 2, 3, 8, 12)
        face = torch.randn(b * 3, 4, dit.cfg.dim)
        with_branches = dit(x, sigma, pose_features=pose, face_tokens=face, cond=cond)  # zero-initialised branches
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() <= 1e-5
    assert (with_branches - ref).abs().max() <= 1e-5


def test_t2v_checkpoint_leaves_conditioning_channels_zero(tiny_cfg, tmp_path):
    dit = converted(tiny_cfg, tiny_wan(False), tmp_path, False)
    assert not dit.patch_embed.weight[:, 16:].any() and dit.patch_embed.weight[:, :16].any()
    # Ref Attn starts as a copy of the self-attention (weights), with a zero output projection.
    torch.testing.assert_close(dit.blocks[1].ref_attn.to_k.weight, dit.blocks[1].self_attn.to_k.weight)
    assert not dit.blocks[1].ref_attn.to_out.weight.any()


def test_key_mapping_table():
    assert rename_wan_key("blocks.3.attn1.to_out.0.weight") == "blocks.3.self_attn.to_out.weight"
    assert rename_wan_key("blocks.3.attn2.add_k_proj.bias") == "blocks.3.text_attn.extra_k.bias"
    assert rename_wan_key("blocks.3.ffn.net.0.proj.weight") == "blocks.3.ffn.fc1.weight"
    assert rename_wan_key("condition_embedder.time_proj.weight") == "time_proj.weight"
    assert rename_wan_key("scale_shift_table") == "head_modulation"
    assert rename_wan_key("blocks.0.scale_shift_table") == "blocks.0.modulation"


def test_checkpoint_mismatch_and_missing_dir(tiny_cfg, tmp_path):
    dit = DiT(tiny_cfg.dit, 8)
    with pytest.raises(FileNotFoundError, match="model.weights.wan_transformer_dir"):
        load_wan_transformer(dit, tmp_path / "none")
    tiny_wan(False).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="text_dim: checkpoint 24 vs config 32"):
        load_wan_transformer(dit, tmp_path / "t")


def test_ref_attn_is_the_papers_per_frame_reshape():
    """Paper 3.1: T_D reshaped to t_D x (h w) queries, T_R to 1 x (h w t_R) keys: one cross-attention."""
    torch.manual_seed(0)
    b, t_d, t_r, hw, heads, d = 2, 3, 2, 6, 2, 8
    q = torch.randn(b, t_d * hw, heads, d)
    kv = torch.randn(b, t_r * hw, heads, d)
    ours = attention(q, kv, kv)
    per_frame = torch.cat([attention(q[:, f * hw:(f + 1) * hw], kv, kv) for f in range(t_d)], dim=1)
    torch.testing.assert_close(ours, per_frame)


def _nonzero_branches(dit):
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.2)


def test_face_attn_sees_only_its_latent_frame(tiny_cfg):
    torch.manual_seed(0)
    dit = DiT(tiny_cfg.dit, 8).eval()
    _nonzero_branches(dit)
    b, t = 1, 3
    x, sigma = torch.randn(b, 16, t, 4, 4), torch.rand(b)
    face = torch.randn(b * t, 4, dit.cfg.dim)
    dit_one = DiT(tiny_cfg.dit.__class__(**{**tiny_cfg.dit.__dict__, "num_layers": 1}), 8).eval()
    dit_one.load_state_dict({k: v for k, v in dit.state_dict().items() if not k.startswith("blocks.1.")})
    with torch.no_grad():
        out = dit_one(x, sigma, face_tokens=face)
        changed = face.clone()
        changed[1] += 1.0  # latent frame 1's face tokens
        diff = (dit_one(x, sigma, face_tokens=changed) - out).abs().amax(dim=(0, 1, 3, 4))
    # One block: Face Attn is its last attention and the MLP is per token, so only latent frame 1 can change.
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0


def test_motion_keep_removes_pose_and_face(tiny_cfg):
    torch.manual_seed(0)
    dit = DiT(tiny_cfg.dit, 8).eval()
    _nonzero_branches(dit)
    x, sigma = torch.randn(2, 16, 3, 4, 4), torch.rand(2)
    pose, face = torch.randn(2, 8, 3, 4, 4), torch.randn(6, 4, dit.cfg.dim)
    with torch.no_grad():
        kept = dit(x, sigma, pose_features=pose, face_tokens=face, motion_keep=torch.tensor([1.0, 0.0]))
        plain = dit(x, sigma)
        full = dit(x, sigma, pose_features=pose, face_tokens=face)
    torch.testing.assert_close(kept[1], plain[1])
    torch.testing.assert_close(kept[0], full[0])
    assert (full[1] - plain[1]).abs().max() > 1e-3


def _grads_and_attention_runs(tiny_cfg, **dit):
    """Gradients of every parameter for one loss, and how many times an attention kernel ran (forward and any
    recompute in backward: SDPA's kernel op, not its Python wrapper, so a kept output is not counted)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    runs = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in _ATTENTION_OPS:
                runs.append(func)
            return func(*args, **(kwargs or {}))

    cfg = tiny_cfg.dit.__class__(**{**tiny_cfg.dit.__dict__, **dit})
    torch.manual_seed(0)
    dit = DiT(cfg, 8)
    _nonzero_branches(dit)
    torch.manual_seed(1)
    x, sigma, ref = torch.randn(2, 16, 3, 4, 4), torch.rand(2), torch.randn(2, 16, 2, 4, 4)
    face = torch.randn(6, 4, dit.cfg.dim)
    with Count():
        dit(x, sigma, ref, torch.randn(2, 8, 3, 4, 4), face).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in dit.parameters()]), len(runs)


def test_activation_checkpointing_same_gradients(tiny_cfg):
    plain, runs = _grads_and_attention_runs(tiny_cfg, activation_checkpointing=0)
    full, full_runs = _grads_and_attention_runs(tiny_cfg, activation_checkpointing=-1, checkpoint_policy="full")
    selective, sel_runs = _grads_and_attention_runs(tiny_cfg, activation_checkpointing=-1)
    torch.testing.assert_close(full, plain)
    torch.testing.assert_close(selective, plain)
    # 2 blocks x 5 attention kernels: self, text on each stream, Ref, Face
    assert runs == 10, runs
    assert full_runs == 2 * runs  # full: every attention runs again in backward
    assert sel_runs == runs  # selective: the attention outputs are kept, only the rest is recomputed


def test_checkpoint_plan_prefers_selective_then_mixes_in_full(tiny_cfg):
    cfg = load_preset("wan1_3b").dit
    tokens, pixels, gib = 81_600, 121 * 640 * 960, 2**30
    none = activation_bytes(cfg, 1, tokens, pixels, True, CheckpointPlan(0, 0))
    assert checkpoint_plan(cfg, 1, tokens, pixels, none, True) == CheckpointPlan(0, 0)
    plan = checkpoint_plan(cfg, 1, tokens, pixels, 94 * gib, True)  # the H200's budget next to ZeRO-2's state
    assert plan.full == 0 and 0 < plan.selective < cfg.num_layers
    assert activation_bytes(cfg, 1, tokens, pixels, True, plan) <= 94 * gib
    # a selective block keeps more than a full one, less than an unchecked one
    keep = [activation_bytes(cfg, 1, tokens, pixels, True, p) for p in
            (CheckpointPlan(0, 0), CheckpointPlan(0, 30), CheckpointPlan(30, 0))]
    assert keep[0] > keep[1] > keep[2]
    tight = (keep[1] + keep[2]) // 2  # not every block selective: some must keep only their inputs
    mixed = checkpoint_plan(cfg, 1, tokens, pixels, tight, True)
    assert 0 < mixed.full < 30 and mixed.blocks == 30
    assert activation_bytes(cfg, 1, tokens, pixels, True, mixed) <= tight
    assert [mixed.mode(i) for i in (0, mixed.full, 29)] == ["full", "selective", "selective"]
    full_cfg = cfg.__class__(**{**cfg.__dict__, "checkpoint_policy": "full"})
    assert checkpoint_plan(full_cfg, 1, tokens, pixels, 94 * gib, True).selective == 0
    assert checkpoint_plan(cfg, 1, tokens, pixels, 0, True) == CheckpointPlan(30, 0)  # nothing fits: all full
    with pytest.raises(ValueError, match="checkpoint_policy"):
        cfg.__class__(**{**cfg.__dict__, "checkpoint_policy": "some"})


def test_reference_tokens_sit_before_the_video_in_time():
    pos = DiT.token_positions(2, 2, 1, 2)
    assert pos.tolist() == [[-2, 0, 0], [-2, 0, 1], [-1, 0, 0], [-1, 0, 1],
                            [0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]
