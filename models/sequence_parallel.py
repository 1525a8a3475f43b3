"""Ulysses-style sequence parallelism for the DiT (DeepSpeed-Ulysses, Jacobs et al. 2023): the video tokens of
one clip are split over the ``N`` ranks of a sequence-parallel (SP) group, and attention switches from
sequence-sharded to head-sharded with one all-to-all before it and one after it.

Layout (``train.sequence_parallel=N``; ``DiT.set_sequence_parallel``):

- **Video tokens** ``(B, Nv, D)`` are cut into ``N`` contiguous shards in the DiT's token order (frame, row,
  column); rank ``r`` of the group holds tokens ``[r Nv/N, (r+1) Nv/N)`` from the patch embedding to the output
  projection (``r Nv // N`` to ``(r+1) Nv // N``: shards differ by at most one token, so no clip needs padding
  or masking; the all-to-alls carry uneven split sizes). RoPE angles are those of the tokens' global (t, h, w)
  positions.
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

Joint self-attention per block on rank ``r`` (``n`` ~ ``Nv/N`` local video tokens, ``d`` per head)::

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

Collectives: ``all_to_all_single`` (with split sizes) and ``all_gather`` only (the reduce-scatter is an
all-to-all and a sum), so one code path serves NCCL and gloo: gloo's ``all_to_all_single`` on CPU tensors, with
uneven split sizes too, works with torch 2.13 (checked; no all-gather fallback is needed), and gloo has no
``reduce_scatter``, which is why that one is an all-to-all.
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

    def split(self, total: int, what: str) -> Shard:
        """``total`` tokens split into ``size`` contiguous shards whose sizes differ by at most one."""
        if total < self.size:
            raise ValueError(f"sequence parallelism over {self.size} ranks needs at least {self.size} {what}, "
                             f"got {total}")
        bounds = [r * total // self.size for r in range(self.size + 1)]
        return Shard(self, tuple(b - a for a, b in zip(bounds, bounds[1:])))


@dataclass(frozen=True)
class Shard:
    """One sequence split over a group: ``counts[r]`` tokens on rank ``r``, in rank order."""

    sp: SequenceParallel
    counts: tuple[int, ...]

    @property
    def start(self) -> int:
        """Position of this rank's first token in the whole sequence."""
        return sum(self.counts[:self.sp.rank])

    @property
    def local(self) -> slice:
        """This rank's tokens of the whole sequence."""
        return slice(self.start, self.start + self.counts[self.sp.rank])

    @property
    def total(self) -> int:
        return sum(self.counts)


def _a2a(send: torch.Tensor, sp: SequenceParallel, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
    """``all_to_all_single`` of flat tensors: ``send_sizes[j]`` elements to rank ``j``, ``recv_sizes[j]`` from it."""
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes, group=sp.group)
    return recv


def _seq_to_heads(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """(B, n_r, H, d) -> (B, total, H/N, d)."""
    sp, (b, n, heads, d) = shard.sp, x.shape
    h = heads // sp.size
    send = x.unflatten(2, (sp.size, h)).permute(2, 0, 1, 3, 4).flatten()  # (N, B, n_r, h, d): rank j gets heads j
    recv = _a2a(send, sp, [b * n * h * d] * sp.size, [b * c * h * d for c in shard.counts])
    parts = recv.split([b * c * h * d for c in shard.counts])
    return torch.cat([p.view(b, c, h, d) for p, c in zip(parts, shard.counts)], dim=1)


def _heads_to_seq(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """(B, total, H/N, d) -> (B, n_r, H, d): the inverse of :func:`_seq_to_heads`."""
    sp, (b, _, h, d) = shard.sp, x.shape
    n = shard.counts[sp.rank]
    send = torch.cat([p.flatten() for p in x.split(list(shard.counts), dim=1)])  # rank j gets its tokens
    recv = _a2a(send, sp, [b * c * h * d for c in shard.counts], [b * n * h * d] * sp.size)
    return recv.view(sp.size, b, n, h, d).permute(1, 2, 0, 3, 4).flatten(2, 3)


class _AllToAll(torch.autograd.Function):
    """Sequence-sharded <-> head-sharded; the backward of one direction is the other."""

    @staticmethod
    def forward(ctx, x, shard, to_heads):
        ctx.shard, ctx.to_heads = shard, to_heads
        return _seq_to_heads(x, shard) if to_heads else _heads_to_seq(x, shard)

    @staticmethod
    def backward(ctx, grad):
        back = _heads_to_seq(grad, ctx.shard) if ctx.to_heads else _seq_to_heads(grad, ctx.shard)
        return back, None, None


class _AllGather(torch.autograd.Function):
    """All-gather along ``dim`` (``counts[r]`` entries from rank ``r``) whose backward is the reduce-scatter: the
    sum over ranks of the gradient of this rank's part, as an all-to-all and a sum (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, shard, dim):
        ctx.shard, ctx.dim = shard, dim
        counts, most = shard.counts, max(shard.counts)
        if x.shape[dim] < most:  # all_gather takes equal sizes: pad, then trim
            x = torch.cat([x, x.new_zeros(*x.shape[:dim], most - x.shape[dim], *x.shape[dim + 1:])], dim=dim)
        parts = [torch.empty_like(x) for _ in counts]
        dist.all_gather(parts, x.contiguous(), group=shard.sp.group)
        return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim=dim)

    @staticmethod
    def backward(ctx, grad):
        shard, dim = ctx.shard, ctx.dim
        chunks = grad.split(list(shard.counts), dim=dim)
        mine = chunks[shard.sp.rank].shape
        recv = _a2a(torch.cat([c.flatten() for c in chunks]), shard.sp, [c.numel() for c in chunks],
                    [chunks[shard.sp.rank].numel()] * shard.sp.size)
        return recv.view(shard.sp.size, *mine).sum(0), None, None


def seq_to_heads(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """(B, n_r, H, d) sequence shard -> (B, total, H/N, d): every token of the group, this rank's heads."""
    return _AllToAll.apply(x, shard, True)


def heads_to_seq(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """(B, total, H/N, d) -> (B, n_r, H, d): the inverse of :func:`seq_to_heads`."""
    return _AllToAll.apply(x, shard, False)


def gather(x: torch.Tensor, shard: Shard, dim: int) -> torch.Tensor:
    """Every rank's part of ``shard`` concatenated along ``dim`` in rank order (differentiable)."""
    return _AllGather.apply(x, shard, dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: Shard, replicated: int,
                      attend) -> torch.Tensor:
    """Self-attention of (B, replicated + n_r, H, d) q/k/v whose first ``replicated`` tokens are the same on every
    rank of the group and whose other ``n_r`` are this rank's part of ``shard``; ``attend(q, k, v)`` is the local
    attention of (B, M, h, d) tensors returning (B, M, h*d). Returns (B, replicated + n_r, H*d), what the local
    attention of the whole sequence gives for these tokens (see the module docstring)."""
    sp, heads, d = shard.sp, q.shape[2], q.shape[3]
    if heads % sp.size:
        raise ValueError(f"sequence parallelism over {sp.size} ranks needs the attention heads ({heads}) to be a "
                         f"multiple of {sp.size}")
    h = heads // sp.size
    hs = slice(sp.rank * h, (sp.rank + 1) * h)
    # one all-to-all for q, k and v together
    qkv = seq_to_heads(torch.cat([q[:, replicated:], k[:, replicated:], v[:, replicated:]], dim=-1), shard)
    qv, kv, vv = qkv.split(d, dim=-1)
    if replicated:
        qv, kv, vv = (torch.cat([t[:, :replicated, hs], x], dim=1) for t, x in ((q, qv), (k, kv), (v, vv)))
    out = attend(qv, kv, vv).unflatten(-1, (h, d))
    video = heads_to_seq(out[:, replicated:], shard)
    if not replicated:
        return video.flatten(2)
    heads_shard = Shard(sp, (h,) * sp.size)
    return torch.cat([gather(out[:, :replicated], heads_shard, dim=2), video], dim=1).flatten(2)


def new_groups(world_size: int, size: int) -> list:
    """The sequence-parallel groups of a job: ranks ``[g N, (g+1) N)`` for ``g < world_size / N`` (every rank
    must call this, in the same order)."""
    if world_size % size:
        raise ValueError(f"train.sequence_parallel={size} must divide the number of ranks ({world_size})")
    return [dist.new_group(list(range(g * size, (g + 1) * size))) for g in range(world_size // size)]
