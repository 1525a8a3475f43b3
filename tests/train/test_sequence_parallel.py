"""Sequence parallelism (``train.sequence_parallel``, models/sequence_parallel.py) through the real command
(torchrun, gloo, the tiny model: 2 heads, so SP groups of 2).

- 2 processes as one SP group train as 1 process does: the same batches, losses and gradient norms to fp32
  tolerance (DeepSpeed's average over the ranks is the group's gradient; measured: the losses bitwise equal, the
  norms to 2e-7). The SP run makes a sample video on the way (every rank of the group samples together).
- An SP run resumed from its checkpoint is bitwise the uninterrupted run.
- An SP-2 checkpoint resumed by 2 ranks of plain data parallelism (same world size: no universal conversion), or
  by 4 (a universal checkpoint), continues the epoch: the data cursor was kept for 1 data-parallel rank and is
  dealt to 2 or 4, no clip twice.
"""
from __future__ import annotations

import json
import math

import pytest

from tests.train.conftest import assert_epochs_continue, copy_run, metrics, run, same_training

SP = ["train.sequence_parallel=2"]
STEPS = 7  # checkpoints at 3, 6 and 7


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, base_overrides):
    """An uninterrupted 2-rank run as one SP group of 2, with a sample video at step 5."""
    out = tmp_path_factory.mktemp("sp2")
    log = run(out, [*base_overrides, *SP, f"stage.steps={STEPS}", "train.sample.every=5"])
    assert (out / "stage1" / "samples" / "step_00000005.mp4").is_file(), log[-2000:]
    assert "sequence_parallel" in json.loads((out / "stage1" / "checkpoints" / f"step_{3:08d}" / "COMPLETE")
                                             .read_text()), log[-2000:]
    return out


def _truncate_metrics(out, last_step: int) -> None:
    """Keep the metric records up to ``last_step`` (the copy of a run as it was at that checkpoint)."""
    path = out / "stage1" / "metrics.jsonl"
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("\n".join(keep) + "\n")


def test_an_sp_group_trains_as_one_rank(tmp_path, base_overrides, sp_run):
    steps = 4
    out = tmp_path / "one"
    run(out, [*base_overrides, f"stage.steps={steps}"], nproc=1)
    sp, one = metrics(sp_run), metrics(out)
    for s in range(1, steps + 1):
        assert sp[s]["sample_keys"] == one[s]["sample_keys"], f"step {s}: other batches"
        assert sp[s]["samples"] == one[s]["samples"]
        assert math.isclose(sp[s]["loss"], one[s]["loss"], rel_tol=1e-5), (s, sp[s]["loss"], one[s]["loss"])
        assert math.isclose(sp[s]["grad_norm"], one[s]["grad_norm"], rel_tol=1e-4), \
            (s, sp[s]["grad_norm"], one[s]["grad_norm"])


@pytest.mark.slow  # 40 s; the other two keep the default suite's share small
def test_sp_resume_is_bitwise_exact(tmp_path, base_overrides, sp_run):
    out = copy_run(sp_run, tmp_path / "run", 3)
    _truncate_metrics(out, 3)
    log = run(out, [*base_overrides, *SP, f"stage.steps={STEPS}"], log_name="resume.log")
    assert "at step 3" in log and "universal" not in log, log[-3000:]
    got = metrics(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    bad = same_training(got, metrics(sp_run), range(4, STEPS + 1))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sp_checkpoint_resumed_as_data_parallel_continues_the_epoch(tmp_path, base_overrides, sp_run, ranks):
    """2 ranks: the same world size, no conversion; 4 ranks (the issue's case): a universal checkpoint."""
    ckpt_step = 6
    out = copy_run(sp_run, tmp_path / "run", ckpt_step)
    _truncate_metrics(out, ckpt_step)
    before = [tuple(k) for s in range(1, ckpt_step + 1) for k in metrics(sp_run)[s]["sample_keys"]]
    steps = ckpt_step + 5
    log = run(out, [*base_overrides, "train.sequence_parallel=1", f"stage.steps={steps}"], nproc=ranks,
              log_name="dp.log")
    assert f"at step {ckpt_step}" in log and ("universal checkpoint:" in log) == (ranks != 2), log[-3000:]
    assert "data cursor from 1 ranks x" in log and f"resumed on {ranks} x" in log, log[-3000:]
    got = metrics(out)
    after = [tuple(k) for s in range(ckpt_step + 1, steps + 1) for k in got[s]["sample_keys"]]
    assert_epochs_continue(before, after, "SP -> DP change")
