"""Building blocks shared by the DiT and the encoders: fp32 norms, attention through SDPA, 3D RoPE,
timestep features. Numerics follow diffusers' Wan 2.1 implementation so converted weights reproduce it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as Wan does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32, return fp32 (callers cast after modulation)."""
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def sdpa_context(backends: tuple[str, ...]):
    """Context restricting SDPA to ``backends`` in priority order (empty: PyTorch's own choice)."""
    if not backends:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    unknown = [b for b in backends if b not in _BACKENDS]
    if unknown:
        raise ValueError(f"unknown attention backends {unknown}; known: {list(_BACKENDS)}")
    chosen = [getattr(SDPBackend, _BACKENDS[b]) for b in backends]
    try:
        return sdpa_kernel(chosen, set_priority=True)
    except TypeError:  # PyTorch < 2.6 has no priority order: the listed backends in its own order
        return sdpa_kernel(chosen)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backends: tuple[str, ...] = ()) -> torch.Tensor:
    """Multi-head attention of (B, N, H, d) tensors through SDPA; returns (B, N, H*d)."""
    with sdpa_context(backends):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def rope_frequencies(head_dim: int, theta: float) -> list[torch.Tensor]:
    """Inverse frequencies of the (t, h, w) axes, Wan's split: h = w = 2 * (head_dim // 6), t = the rest."""
    hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * hw, hw, hw)
    return [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in dims]


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (N, head_dim/2) float32 for integer (N, 3) (t, h, w) positions; computed in float64."""
    freqs = rope_frequencies(head_dim, theta)
    pos = positions.to(torch.float64)
    angles = torch.cat([torch.outer(pos[:, i], f.to(pos.device)) for i, f in enumerate(freqs)], dim=1)
    return angles.cos().float(), angles.sin().float()


def grid_positions(t_offset: int, t: int, h: int, w: int, device=None) -> torch.Tensor:
    """(t*h*w, 3) integer positions of a token grid, frames numbered from ``t_offset``, row-major."""
    ft = torch.arange(t_offset, t_offset + t, device=device)
    fh = torch.arange(h, device=device)
    fw = torch.arange(w, device=device)
    return torch.stack(torch.meshgrid(ft, fh, fw, indexing="ij"), dim=-1).reshape(-1, 3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of (B, N, H, d) by (N, d/2) angles; fp32 math, input dtype out."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of (B,) timesteps (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLP(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two-layer perceptron."""
        h = self.fc1(x)
        if self.act == "silu":
            h = F.silu(h)
        elif self.act == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.act == "gelu":
            h = F.gelu(h)
        else:
            raise ValueError(f"unknown activation {self.act!r}")
        return self.fc2(h)


class FP32MLP(MLP):
    """MLP run in float32 whatever the parameter dtype (timestep embedding: precision matters there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two-layer perceptron in fp32."""
        h = F.linear(x.float(), self.fc1.weight.float(), self.fc1.bias.float())
        h = F.silu(h)
        return F.linear(h, self.fc2.weight.float(), self.fc2.bias.float())


class Attention(nn.Module):
    """Wan-style attention: q/k/v/out projections, RMSNorm over all heads on q and k, optional RoPE,
    and an optional second key/value set (Wan I2V's image context) whose result is added before ``to_out``.
    """

    def __init__(self, dim: int, num_heads: int, eps: float, extra_kv_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if extra_kv_dim is not None:
            self.extra_k = nn.Linear(extra_kv_dim, dim)
            self.extra_v = nn.Linear(extra_kv_dim, dim)
            self.norm_extra_k = nn.RMSNorm(dim, eps=eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H*d) -> (B, N, H, d)."""
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope=None, extra_context=None,
                backends: tuple[str, ...] = (), query_groups: int = 1, sp=None, replicated: int = 0) -> torch.Tensor:
        """Attend from ``x`` (B, N, D) to ``context`` (B', M, D) (``x`` itself when None).

        ``query_groups`` > 1 splits each sample's queries into that many equal groups, each attending to
        its own context row (context batch = B * groups): Face Attn's per-latent-frame attention.
        ``sp`` (a :class:`models.sequence_parallel.Shard`, self-attention only): after its first ``replicated``
        tokens (the same on every rank of the group) ``x`` holds this rank's part of the sharded sequence (the
        Ulysses all-to-all attention of :mod:`models.sequence_parallel`).
        """
        ctx = x if context is None else context
        q = self.heads(self.norm_q(self.to_q(x)))
        k = self.heads(self.norm_k(self.to_k(ctx)))
        v = self.heads(self.to_v(ctx))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if sp is not None:
            if context is not None or extra_context is not None or query_groups > 1:
                raise ValueError("sequence-parallel attention is self-attention only")
            from .sequence_parallel import ulysses_attention

            out = ulysses_attention(q, k, v, sp, replicated, lambda *qkv: attention(*qkv, backends))
            return self.to_out(out.type_as(x))
        if query_groups > 1:
            q = q.reshape(q.shape[0] * query_groups, q.shape[1] // query_groups, *q.shape[2:])
        out = attention(q, k, v, backends)
        if extra_context is not None:
            ek = self.heads(self.norm_extra_k(self.extra_k(extra_context)))
            ev = self.heads(self.extra_v(extra_context))
            out = out + attention(q, ek, ev, backends)
        if query_groups > 1:
            out = out.reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(out.type_as(x))
