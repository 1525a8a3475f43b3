"""Weights that may be partitioned: the model code's one door to parameters that DeepSpeed ZeRO-3 split over
the ranks while the model was built (``deepspeed.zero.Init``, train/stages.py), so that no rank ever holds
the whole model.

A partitioned parameter's ``.data`` is empty; ``ds_numel`` / ``ds_shape`` say its real size and each rank
holds ``1/world`` of it. Code that reads or writes weights outside a forward pass gathers them one module at a
time (:func:`gathered`) and streams files into them (:func:`assign`, :class:`SafetensorsReader`), so memory
per rank stays one module plus its shard. On ordinary parameters every helper is the plain operation, and no
DeepSpeed import happens.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 owns ``p`` (built under ``deepspeed.zero.Init``)."""
    return hasattr(p, "ds_id")


def numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter (not of this rank's shard)."""
    return int(getattr(p, "ds_numel", p.numel()))


def shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of the whole parameter (not of this rank's shard)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def gathered(params: Iterable[nn.Parameter], modify: bool = False):
    """A context in which ``params`` are whole on every rank. With ``modify`` the values rank 0 leaves are
    broadcast and partitioned again on exit (every rank must compute the same change, or only rank 0 a
    meaningful one); without it a change would be discarded (DeepSpeed refuses it). A no-op on ordinary
    parameters."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


@contextlib.contextmanager
def whole_construction():
    """Modules built in this context are not partitioned by an enclosing ``deepspeed.zero.Init`` (for third-party
    modules whose constructor needs whole tensors, e.g. transformers' weight-normed convolutions); ZeRO-3 partitions
    them when its engine starts. A no-op where no Init is active (DeepSpeed is not even imported then)."""
    import sys

    pp = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if pp is None or getattr(pp, "top_level_context", None) is None:
        yield
        return
    pp.shutdown_init_context()
    try:
        yield
    finally:
        pp.restore_init_context()


def reads_weights() -> bool:
    """Whether this process supplies the values of a gathered modification (rank 0, or a process alone)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Whole shapes of what ``module.state_dict()`` holds: parameters and persistent buffers, by name."""
    out = {n: shape(p) for n, p in module.named_parameters()}
    for prefix, m in module.named_modules():
        for n, b in m.named_buffers(recurse=False):
            if b is not None and n not in m._non_persistent_buffers_set:
                out[f"{prefix}.{n}" if prefix else n] = tuple(b.shape)
    return out


@torch.no_grad()
def assign(module: nn.Module, source: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor],
           names: Iterable[str]) -> None:
    """Copy the tensors ``names`` (state-dict names of ``module``) from ``source`` (a mapping, or a function of
    the name: read lazily, one tensor at a time) into their parameters and buffers, one module at a time.

    Parameters are gathered per module with rank 0 as the writer, so only rank 0 reads them; buffers are never
    partitioned and every rank reads its own. Shapes must be checked by the caller (:func:`state_shapes`)."""
    read = source.__getitem__ if isinstance(source, Mapping) else source
    wanted = set(names)
    for prefix, m in module.named_modules():
        own = {f"{prefix}.{n}" if prefix else n: t for n, t in
               [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None}
        own = {n: t for n, t in own.items() if n in wanted}
        if not own:
            continue
        params = [t for t in own.values() if isinstance(t, nn.Parameter)]
        with gathered(params, modify=True):
            for name, t in own.items():
                if isinstance(t, nn.Parameter) and is_partitioned(t) and not reads_weights():
                    continue
                t.copy_(read(name).to(t.dtype))


class SafetensorsReader(Mapping):
    """A ``.safetensors`` file as a read-only mapping that reads one tensor per lookup (``safe_open``): the
    whole file is never in memory."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading it."""
        return tuple(self._file.get_slice(key).get_shape())


def load_safetensors(module: nn.Module, path: str | Path, optional: tuple[str, ...] = ()) -> list[str]:
    """``module.load_state_dict(load_file(path), strict=True)``, streamed: the file is read one tensor at a
    time into one gathered module at a time. Missing, unexpected or misshapen tensors are an error naming
    them (nothing is loaded then), except names starting with one of ``optional``: those may be absent from the
    file (they keep their values) or from the module (they are not read). Returns the optional names the file
    lacked."""
    reader = SafetensorsReader(path)
    want = state_shapes(module)
    absent = sorted(k for k in set(want) - set(reader) if k.startswith(optional)) if optional else []
    want = {k: v for k, v in want.items() if k not in absent}
    missing = sorted(set(want) - set(reader))
    unexpected = sorted(k for k in set(reader) - set(want) if not (optional and k.startswith(optional)))
    bad = [k for k in want if k in reader and reader.shape(k) != want[k]]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not fit the model: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(bad)} of another shape "
                         f"(e.g. {[(k, reader.shape(k), want[k]) for k in bad[:3]]})")
    assign(module, reader, want)
    return absent

