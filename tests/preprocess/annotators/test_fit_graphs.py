"""The model fits' optimiser (``optim.lbfgs_per_problem``) replays each evaluation as a CUDA graph on a GPU: the
replayed fit must end where the eager one does (``pytest -m gpu``), and nothing the SMPL-X model indexes with may
stay on the host when the model moves to a device (a host index tensor is a synchronous copy at every use, which a
capture refuses)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from preprocess.annotators.geometry import intrinsics, project
from preprocess.annotators.optim import lbfgs_per_problem
from preprocess.annotators.smplx_fit import FitClip, FitParams, SMPLXFitter
from preprocess.annotators.smplx_model import SMPLXJoints, known_clip, write_synthetic_model


def _problems(device, dtype=torch.float32):
    """Three independent ill-conditioned regularised least-squares problems in shared tensors (row p of each
    belongs to problem p), and their exact minimisers (the normal equations)."""
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    A = torch.randn(3, 6, 6, generator=g, dtype=f64) @ torch.diag(torch.logspace(0, 1, 6, dtype=f64))
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)
    D = torch.cat([A, torch.ones(3, 6, 1, dtype=torch.float64)], 2)  # unknowns: x (6) and one offset
    M = D.transpose(1, 2) @ D + torch.diag(torch.tensor([0.1] * 6 + [0.0], dtype=torch.float64))
    exact = torch.linalg.solve(M, (D.transpose(1, 2) @ b[..., None])[..., 0])
    A, b = A.to(device, dtype), b.to(device, dtype)
    x = torch.zeros(3, 6, device=device, dtype=dtype, requires_grad=True)
    shared = torch.zeros(3, 1, device=device, dtype=dtype, requires_grad=True)

    def objective():
        r = torch.einsum("pij,pj->pi", A, x) + shared - b
        return (r ** 2).sum(1) + 0.1 * (x ** 2).sum(1)

    owners = [torch.arange(3, device=device)] * 2
    return [x, shared], owners, objective, exact


def test_each_problem_reaches_its_own_minimum_on_the_cpu():
    params, owners, objective, exact = _problems("cpu", torch.float64)
    lbfgs_per_problem(params, owners, objective, 3, 100, cuda_graph=True)  # no GPU: evaluated eagerly
    torch.testing.assert_close(torch.cat([p.detach() for p in params], 1), exact, rtol=1e-5, atol=1e-6)


def test_the_model_moves_every_index_it_uses(tmp_path):
    """Every tensor the SMPL-X joints module holds is a registered buffer: ``.to(device)`` moves all of them."""
    model = SMPLXJoints(write_synthetic_model(tmp_path / "SMPLX_NEUTRAL.npz"))
    buffers = {id(b) for b in model.buffers()}
    loose = [k for k, v in vars(model).items() if isinstance(v, torch.Tensor) and id(v) not in buffers]
    listed = [k for k, v in vars(model).items()
              if isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v)]
    assert not loose and not listed, (loose, listed)
    moved = model.to(torch.float64)
    assert moved.level_1.dtype == torch.int64 and moved.bottom_row.dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_and_eager_evaluations_end_at_the_same_point():
    ends = []
    for graph in (False, True):
        params, owners, objective, exact = _problems("cuda")
        lbfgs_per_problem(params, owners, objective, 3, 60, cuda_graph=graph)
        ends.append(torch.cat([p.detach() for p in params], 1).cpu().double())
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ends[1], exact, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smplx_fit_of_several_clips_is_the_same_replayed(tmp_path):
    """fit_many of 3 clips on the GPU with the CUDA graph (captured: no fallback warning) and without: the same
    joints (0.05 px mean, 0.5 px at most: the batched sums' atomic adds make even two eager fits differ in the last
    bits, which 60 iterations amplify)."""
    fitter = SMPLXFitter(FitParams(model_path=str(write_synthetic_model(tmp_path / "m.npz")), iters=60, device="cuda"))
    K = intrinsics(512, 512, 1.0)
    rng = np.random.default_rng(0)
    clips = []
    for c in range(3):
        uv = project(known_clip(fitter.model, T=12, seed=1 + c), K)
        clips.append(FitClip(uv + rng.normal(0, 1.0, uv.shape), np.ones(uv.shape[:2]), K))
    out = {}
    for graph in (False, True):
        fitter.p.cuda_graph = graph
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[graph] = [r.joints2d for r in fitter.fit_many(clips)]
        assert not [w for w in caught if "CUDA graph" in str(w.message)], [str(w.message) for w in caught]
    d = np.abs(np.concatenate(out[False]) - np.concatenate(out[True]))
    assert d.mean() < 0.05 and d.max() < 0.5, (d.mean(), d.max())
