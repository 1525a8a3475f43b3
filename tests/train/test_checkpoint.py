"""Checkpoint bookkeeping without a training run: which checkpoint resume picks, retention, the sharded EMA
reassembled across world sizes and ZeRO layouts, and the Checkpointer's save and load of every state (a
stand-in for DeepSpeed's engine): round trips, world-size changes, refusals, and checkpoints written by the
code before the Checkpointer owned the resume (``fixtures/checkpoint_before_consolidation``, made by its
``make.py`` at commit af1012c)."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from train import checkpoint as ckpt
from train import manifest
from train.distributed import Dist, RNGStates
from train.ema import ShardedEMA, consolidate
from train.guard import UpdateGuard

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_consolidation"
META = {"stage": 1, "model": "tiny", "zero_stage": 2, "ema_decay": 0.5, "precision": "fp32"}
KEY = b"a test key of 32 bytes, not secret"


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
    for r in range(3):  # written by 3 ranks, flat ZeRO-2 layout
        ema = ShardedEMA(_sharded_params(full, 3, r, True), decay=0.5, rank=r)
        ckpt.atomic_torch_save({ckpt.EMA: ema.state_dict()}, ckpt.rank_file(tmp_path, r))
    back = consolidate(ckpt.rank_entries(tmp_path, ckpt.EMA), {k: v.shape for k, v in full.items()})
    assert all(torch.equal(back[k], full[k]) for k in full)
    for world, flat in ((1, True), (2, False), (4, True)):  # read by other world sizes and layouts
        for r in range(world):
            ema = ShardedEMA(_sharded_params({k: torch.zeros_like(v) for k, v in full.items()}, world, r, flat), 0.5, r)
            ema.load_state_dict(ckpt.rank_entries(tmp_path, ckpt.EMA))
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


# ---------------------------------------------------------------------- the Checkpointer's states


class _Engine:
    """DeepSpeed's checkpoint calls on a small module: one model-states file per rank (as the fixture's)."""

    def __init__(self, module: torch.nn.Module, rank: int, universal: bool):
        self.module, self.rank, self.universal = module, rank, universal
        self.global_steps = 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "buffer_names": [], "global_steps": self.global_steps,
                    **client_state}, d / f"mp_rank_{self.rank:02d}_model_states.pt")

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        files = sorted((Path(load_dir) / tag).glob("*model_states.pt"))
        if not files:
            return None, None
        sd = torch.load(files[0], weights_only=False)
        self.module.load_state_dict(sd["module"], strict=load_module_strict)
        self.global_steps = sd["global_steps"]
        return str(files[0]), {}

    def load_universal_checkpoint(self) -> bool:
        return self.universal


class _Loader:
    """The data loader's cursor interface."""

    def __init__(self):
        self.cursor = {"version": 1, "cursor": [0, 0]}

    def state_dict(self) -> dict:
        return self.cursor

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"data cursor version {state.get('version')} != 1")
        self.cursor = state


def _parts(rank: int, world: int, seed: int, universal: bool = False):
    """(engine, EMA, guard, loader) of ``rank``: a Linear(3, 2) (8 values) cut into ZeRO-2-style flat partitions."""
    torch.manual_seed(seed)
    module = torch.nn.Linear(3, 2)
    named = list(module.named_parameters())
    ps, off = 8 // world, 0
    for _, p in named:
        lo, hi = max(rank * ps, off), min((rank + 1) * ps, off + p.numel())
        p._hp_mapping = _Frag(lo - off, p.detach().reshape(-1)[lo - off:hi - off].clone()) if lo < hi else None
        off += p.numel()
    engine = _Engine(module, rank, universal)
    return engine, ShardedEMA(named, 0.5, rank), UpdateGuard(engine, named, max_consecutive=3), _Loader()


def _checkpointer(root: Path, rank: int, world: int, parts, signature: str = "f" * 64, trust_unsigned: bool = False,
                  **meta) -> ckpt.Checkpointer:
    """A Checkpointer tracking ``parts`` the way the trainer does (``trust_unsigned``: for the fixture's
    checkpoints, written before checkpoints were signed)."""
    engine, ema, guard, loader = parts
    c = ckpt.Checkpointer(root, Dist(rank, world, rank, torch.device("cpu")), keep=3, meta=dict(META, **meta),
                          config={"model": {"name": "tiny"}}, key=KEY, key_from="the test key",
                          trust_unsigned=trust_unsigned)
    c.track(engine, per_rank={ckpt.RNG: RNGStates(), ckpt.GUARD: guard}, sharded={ckpt.EMA: ema},
            shared={ckpt.DATA: loader}, meta={"frozen_signature": signature, "trainable": 2})
    return c


def _fake_universal(tag_dir: Path, key: bytes | None = None) -> Path:
    """ds_to_universal's output as the stand-in engine reads it: the model states under ``universal/``."""
    out = tag_dir / "universal"
    out.mkdir()
    shutil.copy(ckpt.model_state_files(tag_dir)[0], out / "mp_rank_00_model_states.pt")
    ckpt.atomic_write_bytes(out / ckpt.COMPLETE, json.dumps(manifest.sealed(out, {}, key)).encode())
    return out


def _draws() -> tuple[float, float, float]:
    """The next number of every global generator."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def _fixture(tmp_path: Path, world: int) -> tuple[Path, dict]:
    """A copy of the fixture written by ``world`` ranks: (its checkpoints dir, what make.py recorded)."""
    shutil.copytree(FIXTURE / f"world{world}", tmp_path / f"world{world}")
    return (tmp_path / f"world{world}" / "checkpoints",
            json.loads((FIXTURE / f"world{world}" / "expected.json").read_text()))


def _shadow(ema: ShardedEMA) -> dict:
    return {n: [s, t.tolist()] for n, (s, t) in ema.shadow.items()}


def test_a_checkpoint_written_before_loads(tmp_path):
    root, want = _fixture(tmp_path, 1)
    engine, ema, guard, loader = parts = _parts(0, 1, seed=1)  # other weights than the saved ones
    with pytest.raises(ckpt.CheckpointError, match="lists no files and carries no signature.*Nothing of .* was "
                                                   "loaded.*train.checkpoint.trust_unsigned=true"):
        _checkpointer(root, 0, 1, parts).find("auto")  # unsigned: DeepSpeed's pickles are not loaded by default
    c = _checkpointer(root, 0, 1, parts, trust_unsigned=True)
    tag_dir = c.find("auto")
    assert tag_dir == root / ckpt.tag_of(7) and c.prepare(tag_dir) is False
    assert c.load(tag_dir) == want["step"]
    assert _draws() == tuple(want["ranks"][0]["next_random"][k] for k in ("python", "numpy", "torch"))
    assert guard.state_dict() == want["ranks"][0]["guard"]
    assert _shadow(ema) == want["ranks"][0]["ema"]
    assert loader.cursor == want["data"]
    torch.manual_seed(0)  # the saved module (make.py)
    assert all(torch.equal(a, b) for a, b in zip(engine.module.state_dict().values(),
                                                  torch.nn.Linear(3, 2).state_dict().values()))


def test_a_two_rank_checkpoint_written_before_loads_on_one_rank(tmp_path, monkeypatch):
    root, want = _fixture(tmp_path, 2)
    converted = []
    monkeypatch.setattr(ckpt, "to_universal", lambda d, key: converted.append(d) or _fake_universal(d, key))
    _, ema, guard, loader = parts = _parts(0, 1, seed=1, universal=True)
    c = _checkpointer(root, 0, 1, parts, trust_unsigned=True)
    tag_dir = c.find("auto")
    assert c.prepare(tag_dir) is True and converted == [tag_dir]
    assert c.load(tag_dir) == want["step"] and converted == [tag_dir]  # converted once
    assert _draws() == tuple(want["ranks"][0]["next_random"][k] for k in ("python", "numpy", "torch"))
    assert guard.state_dict() == want["ranks"][0]["guard"]  # rank 0's counters
    full = {"weight": [0.0] * 6, "bias": [0.0] * 2}  # the EMA reassembled from both ranks' shards
    for r in want["ranks"]:
        for name, (start, values) in r["ema"].items():
            full[name][start:start + len(values)] = values
    assert _shadow(ema) == {n: [0, v] for n, v in full.items()}
    assert loader.cursor == want["data"]


def test_save_then_load_restores_every_state_on_any_world_size(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "to_universal", _fake_universal)
    engine, ema, guard, loader = parts = _parts(0, 1, seed=0)
    for _, p in engine.module.named_parameters():  # a step: the master weights move, the EMA follows
        p._hp_mapping.values.add_(1.0)
    ema.update()
    engine.global_steps = 5
    guard.nonfinite_steps, guard.skipped_steps = 3, 1
    loader.cursor = {"version": 1, "cursor": [2, 7]}
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    tag_dir = _checkpointer(tmp_path, 0, 1, parts).save(5)
    draws = _draws()
    assert ckpt.read_meta(tag_dir)["frozen_signature"] == "f" * 64 and ckpt.rank_files(tag_dir) == [
        ckpt.rank_file(tag_dir, 0)]

    same = _parts(0, 1, seed=1)  # the same world size: everything comes back
    assert _checkpointer(tmp_path, 0, 1, same).load(tag_dir) == 5
    assert _draws() == draws
    assert same[2].state_dict() == guard.state_dict() and _shadow(same[1]) == _shadow(ema)
    assert same[3].cursor == loader.cursor
    assert all(torch.equal(a, b) for a, b in zip(same[0].module.parameters(), engine.module.parameters()))

    full = {n: t for n, (_, t) in ema.shadow.items()}
    for rank in (0, 1):  # two ranks: each takes its fragment of the EMA from the one old shard
        e, g, d = (grown := _parts(rank, 2, seed=1, universal=True))[1:]
        assert _checkpointer(tmp_path, rank, 2, grown).load(tag_dir) == 5
        for name, (start, t) in e.shadow.items():
            assert torch.equal(t, full[name][start:start + t.numel()])
        assert g.state_dict() == (guard.state_dict() if rank == 0 else {"nonfinite_steps": 0, "skipped_steps": 0})
        assert d.cursor == loader.cursor


def test_a_rank_file_without_guard_counters_starts_them_at_zero(tmp_path):
    root, want = _fixture(tmp_path, 1)
    tag_dir = root / ckpt.tag_of(7)
    f = ckpt.rank_file(tag_dir, 0)
    saved = ckpt.read_state(f)
    del saved[ckpt.GUARD]  # written before the update guard existed
    torch.save(saved, f)
    _, ema, guard, _ = parts = _parts(0, 1, seed=1)
    assert _checkpointer(root, 0, 1, parts, trust_unsigned=True).load(tag_dir) == 7
    assert guard.state_dict() == {"nonfinite_steps": 0, "skipped_steps": 0}
    assert _shadow(ema) == want["ranks"][0]["ema"]


def test_a_checkpoint_that_cannot_be_resumed_is_a_clear_error(tmp_path):
    root, _ = _fixture(tmp_path, 1)
    tag_dir = root / ckpt.tag_of(7)
    at = re.escape(str(tag_dir))
    with pytest.raises(RuntimeError, match="train.resume=none but .* holds checkpoints"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1)).find("none")
    with pytest.raises(ckpt.CheckpointError, match=f"{at} does not match this run: zero_stage: checkpoint 2, this "
                                                   "run 3.*new train.out_dir"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1), zero_stage=3).prepare(tag_dir)
    with pytest.raises(ckpt.CheckpointError, match=f"{at} does not match this run: frozen_signature.*stage.init"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1), signature="0" * 64).load(tag_dir)

    shared = tag_dir / ckpt.TRAINER_DIR / ckpt.SHARED_FILE
    good = shared.read_bytes()
    torch.save({ckpt.DATA: {"version": 99}, "step": 7}, shared)
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(shared))}: cannot restore the data state "
                                                   r"\(ValueError: data cursor version 99"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1), trust_unsigned=True).load(tag_dir)
    shared.write_bytes(good)

    f = ckpt.rank_file(tag_dir, 0)
    f.write_bytes(f.read_bytes()[:200])  # a torn file (a checkpoint copied or edited by hand)
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(f))} is missing or unreadable.*is broken"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1), trust_unsigned=True).load(tag_dir)

    (tag_dir / ckpt.COMPLETE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{at} is not a complete checkpoint"):
        _checkpointer(root, 0, 1, _parts(0, 1, seed=1), trust_unsigned=True).load(tag_dir)


# ---------------------------------------------------------------------- verification, quarantine, trust


class _RunsCode:
    """A pickle that, when loaded, makes a directory: stands in for a checkpoint file crafted to run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _saved(root: Path, steps: tuple[int, ...]) -> ckpt.Checkpointer:
    """A Checkpointer (the test key, sha256 verification) that saved checkpoints of ``steps``."""
    c = _checkpointer(root, 0, 1, _parts(0, 1, seed=0))
    for step in steps:
        c.engine.global_steps = step
        c.save(step)
    return c


def test_our_states_load_with_weights_only(tmp_path):
    tag_dir = _saved(tmp_path, (5,)).root / ckpt.tag_of(5)
    ours = sorted((tag_dir / ckpt.TRAINER_DIR).glob("*.pt"))
    assert [f.name for f in ours] == ["rank_00000.pt", "state.pt"]
    for f in ours:  # tensors and plain data only: nothing to allow beyond torch's own types
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(f)) == []
        assert set(torch.load(f, weights_only=True)) >= ({ckpt.RNG, ckpt.GUARD, ckpt.EMA} if "rank" in f.name
                                                         else {ckpt.DATA, "step"})
    marker = tmp_path / "code_ran"
    torch.save({ckpt.RNG: _RunsCode(marker)}, ours[0])
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(ours[0]))} is missing or unreadable"):
        ckpt.read_state(ours[0])
    assert not marker.exists()


def test_auto_resume_quarantines_damaged_checkpoints_and_falls_back(tmp_path, caplog):
    c = _saved(tmp_path, (3, 6, 9))
    rank9 = ckpt.rank_file(tmp_path / ckpt.tag_of(9), 0)
    data = bytearray(rank9.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the checksum sees it
    rank9.write_bytes(bytes(data))
    planted = tmp_path / ckpt.tag_of(6) / "zero_pp_rank_7_mp_rank_00_optim_states.pt"
    planted.write_bytes(b"not written by the save")
    sizes_only = ckpt.Checkpointer(tmp_path, c.dist, 3, key=KEY, verify="size")
    assert sizes_only.verify(tmp_path / ckpt.tag_of(9)) == []  # the changed byte goes unseen

    caplog.set_level("INFO")
    resumed = _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=1))
    assert resumed.find("auto") == tmp_path / ckpt.tag_of(3)
    assert f"checkpoint step_00000009 is damaged: {rank9}: its sha256 differs" in caplog.text
    assert f"checkpoint step_00000006 is damaged: {planted}: is not one of the files the save recorded" in caplog.text
    assert "resuming from step_00000003: the newest checkpoint that verifies (quarantined: step_00000009, " \
           "step_00000006)" in caplog.text
    assert (tmp_path / "latest").read_text() == ckpt.tag_of(3)
    assert ckpt.quarantined(tmp_path) == [ckpt.tag_of(6), ckpt.tag_of(9)]
    reason = json.loads((tmp_path / ckpt.QUARANTINE_DIR / f"{ckpt.tag_of(9)}{ckpt.REASON_SUFFIX}").read_text())
    assert reason["problems"][0]["file"] == str(rank9) and "sha256" in reason["problems"][0]["why"]
    assert (tmp_path / ckpt.QUARANTINE_DIR / ckpt.tag_of(9) / ckpt.TRAINER_DIR / "rank_00000.pt").read_bytes() == data
    assert resumed.load(tmp_path / ckpt.tag_of(3)) == 3
    resumed.save(4)  # retention leaves quarantined checkpoints alone
    assert ckpt.quarantined(tmp_path) == [ckpt.tag_of(6), ckpt.tag_of(9)]

    for tag in (3, 4):  # nothing verifies: no silent start-over
        (tmp_path / ckpt.tag_of(tag) / "config.yaml").unlink()
    for _ in range(2):  # the run that quarantines the last ones, and any later run
        with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* verifies .*does not start the stage over"):
            _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=1)).find("auto")
    explicit = tmp_path / ckpt.QUARANTINE_DIR / ckpt.tag_of(9)
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(explicit))} fails verification: "
                                                   f"{re.escape(str(explicit / 'trainer' / 'rank_00000.pt'))}"):
        _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=1)).find(str(explicit))


def test_a_checkpoint_this_key_did_not_sign_is_never_loaded(tmp_path):
    """Whoever can write the checkpoint directory swaps DeepSpeed's file for one that runs code when unpickled,
    and rewrites COMPLETE's checksums to match: without the key the signature cannot follow."""
    tag_dir = _saved(tmp_path, (5,)).root / ckpt.tag_of(5)
    marker = tmp_path / "code_ran"
    model_states = ckpt.model_state_files(tag_dir)[0]
    torch.save(_RunsCode(marker), model_states)
    record = ckpt.read_meta(tag_dir)
    record["files"].update(manifest.describe(tag_dir, [model_states.name]))
    forged = {"same key, changed record": record, "no signature": {k: v for k, v in record.items() if k != "signature"},
              "signed with another key": manifest.sign(record, b"another key, 32 bytes long......")}
    for case, rec in forged.items():
        ckpt.atomic_write_bytes(tag_dir / ckpt.COMPLETE, json.dumps(rec).encode())
        for resume in ("auto", str(tag_dir)):
            with pytest.raises(ckpt.CheckpointError, match="COMPLETE: .*Nothing of .* was loaded: DeepSpeed's files "
                                                           "are pickles"):
                _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=1)).find(resume)
        with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(tag_dir / ckpt.COMPLETE))}: .*signature"):
            _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=1)).load(tag_dir)
        assert not marker.exists() and tag_dir.is_dir(), case  # nothing ran, nothing quarantined
    no_key = ckpt.Checkpointer(tmp_path, Dist(0, 1, 0, torch.device("cpu")), keep=3, key=None,
                               key_from="/nowhere/checkpoint.key")
    ckpt.atomic_write_bytes(tag_dir / ckpt.COMPLETE, json.dumps(manifest.sign(record, KEY)).encode())
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint key to check it with .*/nowhere/checkpoint.key"):
        no_key.find("auto")
    assert not marker.exists()


def test_the_saved_config_has_no_credentials(tmp_path):
    c = _checkpointer(tmp_path, 0, 1, _parts(0, 1, seed=0))
    c.config = ckpt.Checkpointer(tmp_path, c.dist, 3, config={"data": {"source": {
        "dataset": "s3://AKIAEXAMPLE:wJalrEXAMPLE@bucket/ds", "storage_options": {
            "key": "AKIAEXAMPLE", "secret": "wJalrEXAMPLE", "client_kwargs": {"endpoint_url": "http://minio:9000"}}}},
        "train": {"log": {"sample_keys": True}}}).config
    text = (c.save(1) / "config.yaml").read_text()
    assert "AKIAEXAMPLE" not in text and "wJalrEXAMPLE" not in text
    assert "http://minio:9000" in text and "sample_keys: true" in text and text.count("<redacted>") == 3
