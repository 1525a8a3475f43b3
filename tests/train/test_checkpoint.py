"""Checkpoint bookkeeping without a training run: which checkpoint resume picks, retention, and the sharded
EMA reassembled across world sizes and ZeRO layouts."""
from __future__ import annotations

import json
import math

import torch

from train import checkpoint as ckpt
from train.distributed import Dist
from train.ema import ShardedEMA, consolidate


def _fake(root, step, complete=True):
    d = root / ckpt.tag_of(step)
    (d / "trainer").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        (d / ckpt.COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))
    return d


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    _fake(tmp_path, 3)
    newest = _fake(tmp_path, 6)
    _fake(tmp_path, 9, complete=False)  # killed mid-save
    (tmp_path / "latest").write_text(ckpt.tag_of(9))
    assert ckpt.find_resume(tmp_path) == newest
    (tmp_path / "latest").write_text(ckpt.tag_of(3))  # a crash between COMPLETE and moving latest
    assert ckpt.find_resume(tmp_path) == newest
    (newest / ckpt.COMPLETE).write_text("{trunc")  # a torn COMPLETE is not complete
    assert ckpt.find_resume(tmp_path).name == ckpt.tag_of(3)
    assert ckpt.find_resume(tmp_path / "nothing") is None


def test_retention_keeps_the_newest_and_drops_incomplete(tmp_path):
    for s in (3, 6, 9):
        _fake(tmp_path, s)
    _fake(tmp_path, 12, complete=False)
    c = ckpt.Checkpointer(tmp_path, Dist(0, 1, 0, torch.device("cpu")), keep=2)
    c._retain()
    assert sorted(d.name for d in tmp_path.glob("step_*")) == [ckpt.tag_of(6), ckpt.tag_of(9)]


class _Frag:
    """A stand-in for ZeRO-1/2's ``_hp_mapping`` of one parameter fragment."""

    def __init__(self, start, values):
        self.lp_fragment_address = type("A", (), {"start": start, "numel": values.numel()})
        self.values = values

    def get_hp_fragment(self):
        return self.values


def _sharded_params(full: dict[str, torch.Tensor], world: int, rank: int, flat_layout: bool):
    """Parameters of ``rank`` of ``world`` carrying ZeRO-2-style fragments (flat layout: partitions cut the
    concatenation of all parameters, so a parameter may span ranks) or ZeRO-3-style per-parameter slices."""
    params = []
    if flat_layout:
        total = sum(t.numel() for t in full.values())
        ps = math.ceil(total / world)
        lo, hi, off = rank * ps, (rank + 1) * ps, 0
    for name, t in full.items():
        p = torch.nn.Parameter(t.clone())
        n = t.numel()
        if flat_layout:
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                p._hp_mapping = _Frag(a - off, t.reshape(-1)[a - off:b - off].clone())
            else:
                p._hp_mapping = None
            off += n
        else:
            ps = math.ceil(n / world)
            a, b = rank * ps, min(n, (rank + 1) * ps)
            p._hp_mapping = _Frag(a, t.reshape(-1)[a:b].clone()) if a < b else None
        params.append((name, p))
    return params


def test_ema_shards_reassemble_on_any_world_size(tmp_path):
    g = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g), "c": torch.randn(11, 2, generator=g)}
    files = []
    for r in range(3):  # written by 3 ranks, flat ZeRO-2 layout
        ema = ShardedEMA(_sharded_params(full, 3, r, True), decay=0.5, rank=r)
        f = tmp_path / f"rank_{r:05d}.pt"
        torch.save({"ema": ema.state_dict()}, f)
        files.append(f)
    back = consolidate(files, {k: v.shape for k, v in full.items()})
    assert all(torch.equal(back[k], full[k]) for k in full)
    for world, flat in ((1, True), (2, False), (4, True)):  # read by other world sizes and layouts
        for r in range(world):
            ema = ShardedEMA(_sharded_params({k: torch.zeros_like(v) for k, v in full.items()}, world, r, flat), 0.5, r)
            ema.load_shard_files(files)
            for name, (start, t) in ema.shadow.items():
                assert torch.equal(t, full[name].reshape(-1)[start:start + t.numel()])


def test_ema_update_is_an_average_of_the_master_weights():
    p = torch.nn.Parameter(torch.zeros(4))
    frag = torch.zeros(4)
    p._hp_mapping = _Frag(0, frag)
    ema = ShardedEMA([("w", p)], decay=0.75, rank=0)
    frag.fill_(1.0)
    ema.update()
    frag.fill_(2.0)
    ema.update()
    assert torch.allclose(ema.shadow["w"][1], torch.full((4,), 0.75 * 0.25 + 0.25 * 2.0))
