"""fp32 EMA of the trainable weights, sharded exactly like ZeRO's fp32 master weights.

Each rank keeps the EMA of the fragment of every trainable parameter that its own optimizer partition
holds (ZeRO-1/2: ``param._hp_mapping``; ZeRO-3: the parameter's partition), and updates it from the fp32
master weights after each optimizer step: no communication, ``1/world`` of the memory of a full copy,
and the average is of the master weights, not of their bf16 copies.

A fragment is saved as ``(start, values)`` within the flattened parameter, so shards written by any
number of ranks and either ZeRO stage can be reassembled: a resume on another world size takes from
every old shard the ranges its new fragments cover, and the export concatenates them into full tensors.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def master_fragment(param: torch.nn.Parameter, rank: int) -> tuple[int, torch.Tensor] | None:
    """(start in the flattened parameter, fp32 master values) of this rank's fragment, or None."""
    if hasattr(param, "ds_id"):  # ZeRO-3: rank r holds [r * ps, (r + 1) * ps) of the flattened parameter
        from deepspeed.utils import safe_get_local_fp32_param

        values = safe_get_local_fp32_param(param)
        if values is None:
            return None
        ps = param.ds_tensor.ds_numel
        start = rank * ps
        n = max(0, min(ps, param.ds_numel - start))
        return (start, values.view(-1)[:n]) if n else None
    mapping = getattr(param, "_hp_mapping", None)  # ZeRO-1/2: a slice of the flat fp32 partition
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1)


class ShardedEMA:
    """EMA shards of one rank; see the module docstring."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, rank: int):
        self.params = dict(named_params)
        self.decay = decay
        self.rank = rank
        self.shadow: dict[str, tuple[int, torch.Tensor]] = {}
        for name, p in self.params.items():
            frag = master_fragment(p, rank)
            if frag is not None:
                self.shadow[name] = (frag[0], frag[1].detach().float().clone())

    @torch.no_grad()
    def update(self) -> None:
        """``ema = decay * ema + (1 - decay) * master`` on this rank's fragments (after an optimizer step)."""
        emas, masters = [], []
        for name, (start, ema) in self.shadow.items():
            frag = master_fragment(self.params[name], self.rank)  # re-resolved: a load may relink fragments
            if frag is None or frag[0] != start or frag[1].numel() != ema.numel():
                raise RuntimeError(f"EMA fragment of {name} moved; ZeRO partitions changed under the EMA")
            emas.append(ema)
            masters.append(frag[1].float())
        if emas:
            torch._foreach_lerp_(emas, masters, 1.0 - self.decay)

    def state_dict(self) -> dict:
        """This rank's shards: ``{"decay", "numel": {name: n}, "shards": {name: (start, tensor)}}``."""
        return {"decay": self.decay,
                "numel": {n: self._numel(p) for n, p in self.params.items()},
                "shards": {n: (s, t.detach().cpu().clone()) for n, (s, t) in self.shadow.items()}}

    def load_state_dict(self, shards: dict | Iterable[dict]) -> None:
        """Fill this rank's fragments from saved shards: its own :meth:`state_dict`, or the shards of every rank
        of a checkpoint (any world size and ZeRO layout; an iterable is read one shard at a time)."""
        filled = {n: 0 for n in self.shadow}
        for old in [shards] if isinstance(shards, dict) else shards:
            for name, (s_old, t_old) in old["shards"].items():
                if name not in self.shadow:
                    continue
                start, ema = self.shadow[name]
                lo, hi = max(start, s_old), min(start + ema.numel(), s_old + t_old.numel())
                if lo < hi:
                    ema[lo - start:hi - start].copy_(t_old[lo - s_old:hi - s_old].to(ema))
                    filled[name] += hi - lo
        short = [n for n, k in filled.items() if k != self.shadow[n][1].numel()]
        if short:
            raise RuntimeError(f"the saved EMA shards do not cover {len(short)} fragments (e.g. {short[0]}): the "
                               "checkpoint's trainable set differs from this stage's")

    @staticmethod
    def _numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))


class _Assembled:
    """One full EMA tensor, assembled from its shards when ``.contiguous()`` is called (the export writes it)."""

    def __init__(self, numel: int, pieces: list[tuple[int, torch.Tensor]], shape: torch.Size):
        self.numel, self.pieces, self.shape = numel, pieces, torch.Size(shape)
        self.dtype = torch.float32

    def contiguous(self) -> torch.Tensor:
        full = torch.empty(self.numel, dtype=torch.float32)
        for start, t in self.pieces:
            full[start:start + t.numel()] = t
        return full.view(self.shape)


def consolidate(shards: Iterable[dict], shapes: dict[str, torch.Size], lazy: bool = False) -> dict:
    """Full fp32 EMA tensors from the saved shards of every rank (for the export). With ``lazy`` each value is
    assembled only by its ``.contiguous()`` (from memory-mapped shards: one full tensor in memory at a time)."""
    numel: dict[str, int] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for part in shards:
        for name, (start, t) in part["shards"].items():
            numel.setdefault(name, part["numel"][name])
            pieces.setdefault(name, []).append((start, t))
    bad = [n for n in numel if sum(t.numel() for _, t in pieces[n]) != numel[n]]
    if bad:
        raise RuntimeError(f"EMA shards do not cover {bad[:3]} completely")
    full = {n: _Assembled(numel[n], pieces[n], shapes[n]) for n in numel}
    return full if lazy else {n: a.contiguous() for n, a in full.items()}
