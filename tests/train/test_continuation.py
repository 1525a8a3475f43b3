"""Segment continuation is trained (paper 4.1): a configured share of samples gets its first latent frame
as the image-to-video condition, deterministically from the micro-step's generator; the model uses it."""
import pytest
import torch

from models.conditions import Conditions
from models.dreamactor import DreamActor
from tests.conftest import compose
from train.config import TrainConfigError, to_job
from train.step import FlowMatchingStep


def _step(p):
    job = to_job(compose("train", ["data.source.dataset=outputs/preprocess", f"train.continuation_prob={p}"]))
    return job, FlowMatchingStep(job, vae=None, device=torch.device("cpu"), rank=0)


def test_share_of_conditioned_samples_and_determinism():
    job, st = _step(0.3)
    x0 = torch.randn(4000, 2, 3, 1, 1)
    lat, mask = st.continuation(x0, st.generator(5, 0))
    assert lat.shape == x0.shape and mask.shape == (4000, 3)
    assert (mask[:, 1:] == 0).all() and set(mask[:, 0].unique().tolist()) <= {0.0, 1.0}
    assert abs(mask[:, 0].mean().item() - 0.3) < 0.03
    _, mask2 = st.continuation(x0, st.generator(5, 0))
    assert torch.equal(mask, mask2)  # same (seed, stage, step, micro, rank): same draw, so resume is exact
    _, off = _step(0.0)[1].continuation(x0, st.generator(5, 0))
    assert off is None


def test_the_condition_changes_the_prediction():
    job, st = _step(1.0)
    torch.manual_seed(0)
    model = DreamActor.from_config(job.model, load_weights=False).eval()
    for p in model.parameters():  # the I2V input projection is zero-initialised: give it weights to test the path
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    c, t, h, w = job.model.dit.latent_channels, 2, 4, 4
    tc, sc = job.model.vae.temporal_compression, job.model.vae.spatial_compression
    x = torch.randn(1, c, t, h, w)
    pose = torch.rand(1, job.model.pose_encoder.in_channels, 1 + (t - 1) * tc, h * sc, w * sc)
    cond = Conditions(torch.randn(1, c, 1, h, w), pose)
    with torch.no_grad():
        a = model(x, torch.tensor([0.5]), cond, use_face=False)
        lat, mask = st.continuation(torch.randn(1, c, t, h, w), st.generator(0, 0))
        b = model(x, torch.tensor([0.5]), cond.replace(cond_latents=lat, cond_mask=mask), use_face=False)
    assert mask[0, 0] == 1 and not torch.allclose(a, b)


def test_bad_probability_is_rejected():
    with pytest.raises(TrainConfigError, match="continuation_prob"):
        _step(1.5)
