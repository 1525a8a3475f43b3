"""Ulysses-style sequence parallelism for the DiT (DeepSpeed-Ulysses, Jacobs et al. 2023): the video tokens of
one clip are split over the ``N`` ranks of a sequence-parallel (SP) group, and attention switches from
sequence-sharded to head-sharded with one all-to-all before it and one after it.

Layout (``train.sequence_parallel=N``; ``DiT.set_sequence_parallel``):

- **Video tokens** ``(B, Nv, D)`` are cut into ``N`` contiguous shards in the DiT's token order (frame, row,
  column); rank ``r`` of the group holds tokens ``[r Nv/N, (r+1) Nv/N)`` from the patch embedding to the output
  projection. ``Nv`` must divide by ``N`` (an error names the shapes); the trainer checks at start that every
  bucket's tokens per latent frame do, which makes every clip length divide. RoPE angles are those of the
  tokens' global (t, h, w) positions.
- **Reference tokens** (``R`` frames, ~10% of the tokens at 4 references over 31 latent frames) are replicated:
  every rank runs the reference stream's projections and MLP on all of them. In the joint self-attention each rank
  takes its ``H/N`` heads of the reference q/k/v by slicing (no communication) and gathers the ``H/N``-head
  reference outputs of the group after it (one all-gather). Ref Attn (video queries, reference keys) is then
  local: every rank has every reference token.
- **Face Attn**: the face motion tokens (a few per latent frame) are replicated; a rank's video shard may start
  and end inside a latent frame, so its queries are padded to whole frames and grouped per frame as without SP.
- **Text cross-attention, MLP, adaLN**: per token, local.
- **Output**: the velocity shards are all-gathered, so ``DiT.forward`` returns the whole ``(B, C, t, h, w)``
  on every rank and the flow loss is computed as without SP (the same value on every rank of the group; the
  latents are small next to the activations).
- The pose and face encoders run on the whole clip on every rank of the group (replicated, like the VAE encode).

Joint self-attention per block on rank ``r`` (``n = Nv/N`` local video tokens, ``d`` per head)::

    q, k, v (B, Nr + n, H, d)  --ref: slice heads r, video: all-to-all(seq -> heads)-->  (B, Nr + Nv, H/N, d)
    attention over all Nr + Nv tokens for H/N heads                                   -> (B, Nr + Nv, H/N, d)
    --video: all-to-all(heads -> seq), ref: all-gather heads-->                          (B, Nr + n, H, d)

Gradients: every collective has its exact adjoint in backward (all-to-all <-> the inverse all-to-all, all-gather
<-> reduce-scatter, a slice of a replicated tensor <-> nothing), and every rank of a group backpropagates the
same, whole loss ``L``. The gradients of the ``N`` ranks of a group then sum to ``N dL/dtheta``, so the plain
average over all ``W = N D`` ranks that DeepSpeed's data-parallel reduction computes (it sees a data-parallel
job of ``W`` ranks) is ``(1/D) sum_groups dL_g/dtheta``: exactly the data-parallel mean over the ``D`` groups
of a run without SP. No loss scaling, no ``mpu``; ZeRO partitions over all ``W`` ranks (as DeepSpeed's own
Ulysses partitions over its sequence-data-parallel group), and a checkpoint is that of a ``W``-rank job.

Collectives: ``all_to_all_single`` and ``all_gather`` only (the reduce-scatter is an all-to-all and a sum), so
one code path serves NCCL and gloo (gloo's ``all_to_all_single`` on CPU tensors was checked with torch 2.13;
gloo has no ``reduce_scatter``, which is why that one is an all-to-all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's sequence-parallel group: ``size`` ranks, this one at ``rank`` in it."""

    size: int
    rank: int
    group: object = None  # torch.distributed.ProcessGroup (None only in single-process checks of the errors)

    def shard(self, total: int, what: str) -> slice:
        """The slice of ``total`` tokens this rank holds; an error naming the shapes when they do not divide."""
        if total % self.size:
            raise ValueError(f"sequence parallelism over {self.size} ranks needs the {what} ({total}) to be a "
                             f"multiple of {self.size}")
        n = total // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def _all_to_all(x: torch.Tensor, sp: SequenceParallel, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Chunk ``j`` of ``x`` along ``scatter_dim`` goes to rank ``j``; the received chunks are concatenated along
    ``gather_dim`` in rank order."""
    send = torch.stack(x.chunk(sp.size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=sp.group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all."""

    @staticmethod
    def forward(ctx, x, sp, scatter_dim, gather_dim):
        ctx.sp, ctx.dims = sp, (scatter_dim, gather_dim)
        return _all_to_all(x, sp, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, ctx.sp, gather_dim, scatter_dim), None, None, None


class _AllGather(torch.autograd.Function):
    """All-gather along ``dim`` whose backward is the reduce-scatter (sum of every rank's gradient of this
    rank's part), done as an all-to-all and a sum."""

    @staticmethod
    def forward(ctx, x, sp, dim):
        ctx.sp, ctx.dim = sp, dim
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        send = torch.stack(grad.chunk(ctx.sp.size, dim=ctx.dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.sp.group)
        return recv.sum(0), None, None


def seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, n, H, d) sequence shard -> (B, N n, H/N, d): every token of the group, this rank's heads."""
    return _AllToAll.apply(x, sp, 2, 1)


def heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """(B, N n, H/N, d) -> (B, n, H, d): the inverse of :func:`seq_to_heads`."""
    return _AllToAll.apply(x, sp, 1, 2)


def gather(x: torch.Tensor, sp: SequenceParallel, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (differentiable)."""
    return _AllGather.apply(x, sp, dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sp: SequenceParallel, replicated: int,
                      attend) -> torch.Tensor:
    """Self-attention of (B, replicated + n, H, d) q/k/v whose first ``replicated`` tokens are the same on every
    rank of the group and whose other ``n`` are this rank's shard; ``attend(q, k, v)`` is the local attention of
    (B, M, h, d) tensors returning (B, M, h*d). Returns (B, replicated + n, H*d), as the local attention of the
    whole sequence would for these tokens (see the module docstring)."""
    heads = q.shape[2]
    if heads % sp.size:
        raise ValueError(f"sequence parallelism over {sp.size} ranks needs the attention heads ({heads}) to be a "
                         f"multiple of {sp.size}")
    hs = slice(sp.rank * heads // sp.size, (sp.rank + 1) * heads // sp.size)
    d = q.shape[3]
    # one all-to-all for q, k and v together
    qkv = seq_to_heads(torch.cat([q[:, replicated:], k[:, replicated:], v[:, replicated:]], dim=-1), sp)
    qv, kv, vv = qkv.split(d, dim=-1)
    if replicated:
        qv, kv, vv = (torch.cat([t[:, :replicated, hs], x], dim=1) for t, x in ((q, qv), (k, kv), (v, vv)))
    out = attend(qv, kv, vv).unflatten(-1, (heads // sp.size, d))
    video = heads_to_seq(out[:, replicated:], sp)
    if not replicated:
        return video.flatten(2)
    return torch.cat([gather(out[:, :replicated], sp, dim=2), video], dim=1).flatten(2)


def new_groups(world_size: int, size: int) -> list:
    """The sequence-parallel groups of a job: ranks ``[g N, (g+1) N)`` for ``g < world_size / N`` (every rank
    must call this, in the same order)."""
    if world_size % size:
        raise ValueError(f"train.sequence_parallel={size} must divide the number of ranks ({world_size})")
    return [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world_size // size)]
