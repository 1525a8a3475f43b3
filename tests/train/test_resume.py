"""Exact and elastic resume through the real command (torchrun, 2 CPU processes, gloo, tiny model).

- An interruption, then ``train.resume=auto``: every later step's loss, grad norm, lr and samples equal (bitwise)
  those of an uninterrupted run, and a half-written newer checkpoint (and a ``latest`` pointing at it) is ignored
  and removed. Under ZeRO-2 the interruption is ``kill -9`` of the whole job at a random step (resumed from the
  last periodic checkpoint); under ZeRO-3 it is SIGTERM (preemption), which checkpoints the current step before
  the ranks stop, and the resume starts from that step.
- 2 ranks -> 1 rank (ZeRO-2 and ZeRO-3): DeepSpeed universal conversion happens by itself and the data cursor
  continues the epochs: no (epoch, clip) delivered twice, every partly read epoch completed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal

import pytest

from tests.train.conftest import (
    REF_STEPS,
    assert_epochs_continue,
    copy_run,
    kill_job,
    metrics,
    run,
    run_to_exit,
    same_training,
    start,
    wait_for_step,
)


def _plant_half_written(out_dir, step: int) -> None:
    """A newer checkpoint cut short mid-save (no COMPLETE, truncated files) and a ``latest`` naming it."""
    ckdir = out_dir / "stage1" / "checkpoints"
    done = sorted(d for d in ckdir.glob("step_*") if (d / "COMPLETE").is_file())
    bad = ckdir / f"step_{step:08d}"
    if done:
        shutil.copytree(done[-1], bad)
        (bad / "COMPLETE").unlink()
    else:
        (bad / "trainer").mkdir(parents=True)
        (bad / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut short")
    for f in bad.glob("*.pt"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    (ckdir / "latest").write_text(bad.name)


def _kill_at(out_dir, overrides, step: int) -> int:
    """Start a run, ``kill -9`` the whole job (launcher, ranks, loader workers) once ``step`` is logged;
    returns the last step it logged."""
    p = start(out_dir, overrides)
    try:
        wait_for_step(p, out_dir, step)
    finally:
        kill_job(p)
    return max(metrics(out_dir))


def _resume_past_half_written(out, overrides, ref, resumed_from: int, what: str) -> None:
    """Plant a half-written newer checkpoint, resume with ``train.resume=auto``: it is ignored and removed, the run
    resumes from ``resumed_from`` and every later step equals the uninterrupted reference bitwise."""
    ckdir = out / "stage1" / "checkpoints"
    _plant_half_written(out, 99)
    log = run(out, [*overrides, "train.resume=auto"], log_name="resume.log")
    assert (f"at step {resumed_from}" in log) if resumed_from else ("starts at step 0" in log), log[-3000:]
    assert "ignoring incomplete checkpoints" in log and "step_00000099" in log
    assert not (ckdir / "step_00000099").exists(), "the half-written checkpoint was not cleaned up"
    got = metrics(out)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    bad = same_training(got, ref, range(resumed_from + 1, REF_STEPS + 1))
    assert not bad, f"{what}, resumed from {resumed_from}:\n" + "\n".join(bad)
    assert (ckdir / "latest").read_text() == f"step_{REF_STEPS:08d}"


def test_kill9_then_resume_is_bitwise_exact(tmp_path, base_overrides, reference_zero2):
    """ZeRO-2: ``kill -9`` of the whole job at a random step; resumed from its last periodic checkpoint."""
    seed = int.from_bytes(os.urandom(4), "little")
    kill_step = random.Random(seed).randint(2, REF_STEPS - 2)
    overrides = [*base_overrides, "zero=zero2", f"stage.steps={REF_STEPS}"]
    out = tmp_path / "run"
    killed_at = _kill_at(out, overrides, kill_step)
    assert killed_at < REF_STEPS, f"the run finished before the kill (target step {kill_step})"
    ckdir = out / "stage1" / "checkpoints"
    done = sorted(int(d.name[5:]) for d in ckdir.glob("step_*") if (d / "COMPLETE").is_file())
    _resume_past_half_written(out, overrides, metrics(reference_zero2), done[-1] if done else 0,
                              f"kill -9 at step {kill_step} (seed {seed})")


def test_sigterm_checkpoints_the_current_step(tmp_path, base_overrides, reference_zero3):
    """ZeRO-3 preemption: SIGTERM to the launcher (torchrun signals every rank and loader worker) checkpoints the
    step it stopped after (no periodic checkpoint is due) and the ranks stop; the resume continues from that step."""
    overrides = [*base_overrides, "zero=zero3", f"stage.steps={REF_STEPS}", "train.checkpoint.every=100"]
    out = tmp_path / "run"
    p = start(out, overrides)
    try:
        wait_for_step(p, out, 4)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)  # torchrun itself exits non-zero on a signal it forwarded
    finally:
        if p.poll() is None:
            kill_job(p)
    log = (out / "run.log").read_text(errors="replace")
    assert "stopped by a signal after step" in log, log[-3000:]
    stopped = int(log.split("stopped by a signal after step ")[1].split()[0])
    meta = json.loads((out / "stage1" / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").read_text())
    assert meta["step"] == stopped and meta["world_size"] == 2
    _resume_past_half_written(out, overrides, metrics(reference_zero3), stopped, f"SIGTERM after step {stopped}")


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_two_ranks_on_one_continues_the_epoch(zero, request, tmp_path, base_overrides):
    """A 2-rank checkpoint resumed by 1 rank: universal conversion, then the epoch goes on (under ZeRO-3 into a
    model built partitioned, inside deepspeed.zero.Init)."""
    reference = request.getfixturevalue(f"reference_{zero}")
    ckpt_step = 6
    out = copy_run(reference, tmp_path / "run", ckpt_step)
    before = [tuple(k) for s in range(1, ckpt_step + 1) for k in metrics(reference)[s]["sample_keys"]]
    steps = ckpt_step + 8
    log = run(out, [*base_overrides, f"zero={zero}", f"stage.steps={steps}"], nproc=1)
    assert "universal checkpoint: 2 -> 1 ranks" in log, log[-3000:]
    assert "to a DeepSpeed universal checkpoint" in log and "/universal written in" in log
    got = metrics(out)
    assert min(s for s in got if s > ckpt_step) == ckpt_step + 1 and max(got) == steps
    after = [tuple(k) for s in range(ckpt_step + 1, steps + 1) for k in got[s]["sample_keys"]]
    assert_epochs_continue(before, after, "rank-count change")
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for s, r in got.items() if s > ckpt_step)


@pytest.fixture(scope="module")
def train_latents(train_dataset, tmp_path_factory):
    """The latent cache of the trainer tests' dataset at their data settings (tiny preset, train.seed 0)."""
    from tests.train.conftest import DATA
    from tests.train.data.helpers import latent_pass

    cache = tmp_path_factory.mktemp("train_latents") / "cache"
    latent_pass(train_dataset, cache, *DATA, check=True)
    return cache


def test_kill9_then_resume_on_cached_latents_is_bitwise_exact(tmp_path, base_overrides, train_latents):
    """``data.latents=true``: batches carry the cached latents and the trainer builds no VAE (none is needed without
    sample videos or evaluation; an encode would fail). ``kill -9`` after a checkpoint, then ``train.resume=auto``:
    the steps the killed run had taken after its last checkpoint are taken again, bitwise alike."""
    steps = 8
    overrides = [*base_overrides, "data.latents=true", f"data.source.latents={train_latents}", f"stage.steps={steps}"]
    out = tmp_path / "run"
    killed_at = _kill_at(out, overrides, 4)  # checkpoints every 3 steps: resumed from step 3
    done = sorted(int(d.name[5:]) for d in (out / "stage1" / "checkpoints").glob("step_*")
                  if (d / "COMPLETE").is_file())
    first = {}
    for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        first.setdefault(r["step"], r)
    assert done and killed_at > done[-1], f"killed at step {killed_at}, checkpoints {done}: no step to redo"
    log = run(out, [*overrides, "train.resume=auto"], log_name="resume.log")
    assert f"at step {done[-1]}" in log, log[-3000:]
    got = metrics(out)
    assert sorted(got) == list(range(1, steps + 1))
    bad = same_training(got, first, range(done[-1] + 1, killed_at + 1))
    assert not bad, "\n".join(bad)
    assert all(r["loss"] == r["loss"] for r in got.values())


def test_a_checkpoint_deepspeed_clipped_resumes_only_as_it_was_trained(tmp_path, base_overrides):
    """A run trained with DeepSpeed's clipping (``train.guard.owns_clipping=false``) resumes with the same setting;
    with the guard clipping (the default) the resume is refused with a message that names the setting, never a
    silent restart or an unclipped continuation."""
    ds = ["train.guard.owns_clipping=false"]  # one rank: the rule is the checkpoint's, not the rank count's
    run(tmp_path, [*base_overrides, "stage.steps=1", *ds], nproc=1)
    rc, log = run_to_exit(tmp_path, [*base_overrides, "stage.steps=2", "train.resume=auto"], nproc=1,
                          log_name="guard.log")
    assert rc != 0 and "resume it with train.guard.owns_clipping=false" in log, log[-4000:]
    run(tmp_path, [*base_overrides, "stage.steps=2", "train.resume=auto", *ds], nproc=1, log_name="same.log")
    assert sorted(metrics(tmp_path)) == [1, 2]
