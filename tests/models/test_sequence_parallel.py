"""Sequence parallelism (models/sequence_parallel.py) against the model without it: ranks in separate processes
(gloo), each group of N ranks on one batch, groups on different batches. The loss of every rank equals the
one-process loss of its group's batch, and the gradients averaged over all ranks (what DeepSpeed's data-parallel
reduction computes) equal the mean over the groups' batches of the one-process gradients, to fp32 tolerance
(measured: 1e-7 of the largest gradient)."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from models.config import load_preset
from models.dreamactor import DreamActor
from models.flow import flow_loss
from models.sequence_parallel import SequenceParallel

from .conftest import forward, random_batch

# 3 latent frames of 4 x 4 patches (48 video tokens: 12 per rank at N = 4, shards that start inside a frame) and
# of 3 x 5 patches (45 tokens: uneven shards); 2 reference frames, face motion tokens on: every branch runs.
SHAPES = [dict(batch=2, frames=9, height=64, width=64, refs=2), dict(batch=2, frames=9, height=48, width=80, refs=2)]


def _model(heads: int) -> DreamActor:
    """The tiny preset with ``heads`` heads, every weight random (no zero-initialised branch hides a gradient)."""
    cfg = load_preset("tiny")
    cfg = dataclasses.replace(cfg, dit=dataclasses.replace(cfg.dit, num_heads=heads, head_dim=32 // heads))
    torch.manual_seed(0)
    model = DreamActor.from_config(cfg, load_weights=False).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.face_encoder.eval()  # BatchNorm statistics of a batch: the same on every rank anyway
    return model


def _loss_and_grads(model, seed: int, shape: dict):
    """Flow loss of the batch of ``seed`` and its gradients (an fp64 model: what differs is the fp32 of the norms,
    RoPE and timestep features, whose sums run in another order on fewer tokens)."""
    b = {k: v.double() for k, v in random_batch(model.cfg, seed=seed, **shape).items()}
    target = torch.randn(b["noisy_latents"].shape, generator=torch.Generator().manual_seed(seed + 100)).double()
    model.zero_grad(set_to_none=True)
    loss = flow_loss(forward(model, b), target)
    loss.backward()
    return loss.detach(), torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                     for p in model.parameters()])


def _rank_main(rank: int, world: int, port: int, sizes: tuple[int, ...], heads: int, out_dir: str):
    import torch.distributed as dist

    from models.sequence_parallel import new_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = _model(heads)
        results = {}
        for n in sizes:
            groups = new_groups(world, n)
            dp_rank = rank // n
            for i, shape in enumerate(SHAPES):
                ref_loss, ref_grad = _loss_and_grads(model, dp_rank, shape)  # one process, no SP, the group's batch
                model.dit.set_sequence_parallel(SequenceParallel(n, rank % n, groups[dp_rank]))
                loss, grad = _loss_and_grads(model, dp_rank, shape)
                model.dit.set_sequence_parallel(None)
                for g in (grad, ref_grad):  # the data-parallel mean over all ranks
                    dist.all_reduce(g)
                    g /= world
                results[n, i] = dict(loss=loss, ref_loss=ref_loss, grad=grad, ref_grad=ref_grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,sizes,heads", [(2, (2,), 2),  # 4 ranks, groups of 2 and 4: slow (the 2-rank case runs)
                                               pytest.param(4, (2, 4), 4, marks=pytest.mark.slow)])
def test_sequence_parallel_loss_and_gradients_equal_one_process(tmp_path, world, sizes, heads):
    torch.multiprocessing.start_processes(_rank_main, args=(world, _free_port(), sizes, heads, str(tmp_path)),
                                          nprocs=world, join=True, start_method="spawn")
    for rank in range(world):
        for (n, i), r in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert torch.allclose(r["loss"], r["ref_loss"], rtol=1e-6, atol=0), (rank, n, i, r["loss"], r["ref_loss"])
            err = (r["grad"] - r["ref_grad"]).abs().max() / r["ref_grad"].abs().max()
            assert r["ref_grad"].abs().max() > 0 and err < 1e-5, f"rank {rank}, SP {n}, shape {i}: gradient error {err}"


def test_shapes_that_do_not_split_are_named():
    model = _model(2)
    with pytest.raises(ValueError, match=r"dit.num_heads \(2\) to be a multiple of 4"):
        model.dit.set_sequence_parallel(SequenceParallel(4, 0))
    model.dit.set_sequence_parallel(SequenceParallel(2, 0))  # a group of 2 on a clip of one token: too short
    b = {k: v.double() for k, v in random_batch(model.cfg, batch=1, frames=1, height=16, width=16, refs=1).items()}
    with pytest.raises(ValueError, match=r"needs at least 2 video tokens \(1 x 1 x 1 patches of latents "
                                         r"\(1, 16, 1, 2, 2\), patch \(1, 2, 2\)\), got 1"):
        forward(model, b)
