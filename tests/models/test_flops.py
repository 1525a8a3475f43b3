"""FLOPs per step from the model's shapes against PyTorch's FLOP counter on real forwards."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.config import load_preset
from models.flops import dit_forward_flops, flops_per_step

from .conftest import forward, random_batch


@pytest.mark.parametrize("refs,use_face", [(2, True), (2, False), (0, True)])
def test_analytic_flops_match_the_counter(tiny_model, refs, use_face):
    b = random_batch(tiny_model.cfg, batch=2, frames=9, height=32, width=48, refs=max(refs, 1))
    if refs == 0:
        b["ref_latents"] = b["ref_latents"][:, :, :0]
    if not use_face:
        b["face_crops"] = None
    # The math backend decomposes attention into matmuls the counter sees (it does not count fused kernels on CPU).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward(tiny_model, b, use_face=use_face)
    assert tiny_model.flops_per_step(2, 9, 32, 48, refs, use_face=use_face, backward=False) == counter.get_total_flops()
    assert tiny_model.flops_per_step(2, 9, 32, 48, refs, use_face=use_face) == 3 * counter.get_total_flops()


def test_real_scale_numbers_are_plausible():
    cfg = load_preset("wan1_3b")
    t, h, w = 13, 60, 104  # 49 frames at 480x832
    dit = dit_forward_flops(cfg, 1, t, h, w, 3, True)
    tokens = (t + 3) * (h // 2) * (w // 2)
    # Dense part ~ 2 * params * tokens; attention adds 4 * N^2 * dim per layer.
    dense = 2 * 1.7e9 * tokens
    attn = 4 * tokens**2 * cfg.dit.dim * cfg.dit.num_layers
    assert 0.8 * (dense + attn) < dit < 1.3 * (dense + attn)
    assert flops_per_step(cfg, 2, 49, 480, 832, 3) == pytest.approx(2 * flops_per_step(cfg, 1, 49, 480, 832, 3),
                                                                     rel=1e-4)  # + the shared context
