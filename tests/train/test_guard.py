"""The update guard (train/guard.py) through the real command: non-finite gradients are counted, named and
logged, no checkpoint is taken from a step that applied no update, and a run of them stops the job with exit
code 4 leaving the last good checkpoint as ``latest``."""
from __future__ import annotations

from tests.train.conftest import kill_job, metrics, start
from train import checkpoint as ckpt


def test_nonfinite_steps_are_counted_named_and_stop_the_run(tmp_path, base_overrides):
    # steps 1-4 train (checkpoint at 4); 5 is poisoned, 6 recovers; 8, 9, 10 are poisoned: stop at 10
    over = [*base_overrides, "stage.steps=12", "train.checkpoint.every=4", "train.guard.poison_steps=[5,8,9,10]",
            "train.guard.max_consecutive_nonfinite=3"]
    p = start(tmp_path, over)
    try:
        rc = p.wait(timeout=600)
    finally:
        if p.poll() is None:
            kill_job(p)
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert rc != 0 and "exitcode  : 4" in log, log[-4000:]  # the ranks exit 4; torchrun reports it, exits 1
    assert "step 5: non-finite gradients in pose_encoder" in log
    assert "3 optimizer steps in a row up to step 10 applied no update" in log
    m = metrics(tmp_path)
    assert m[4]["update_applied"] == 1 and m[4]["nonfinite_steps"] == 0
    assert m[5]["update_applied"] == 0 and m[5]["nonfinite_steps"] == 1
    assert m[6]["update_applied"] == 1 and m[6]["consecutive_bad_steps"] == 0
    assert m[9]["nonfinite_steps"] == 3 and 10 not in m  # step 10 raised before its record
    # checkpoints: step 4 (periodic) and step 8 is poisoned (no checkpoint): latest stays step 4
    assert ckpt.find_resume(tmp_path / "stage1" / "checkpoints").name == ckpt.tag_of(4)
