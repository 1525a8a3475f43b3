"""A time-boxed stage (``train.time_limit_min``): it ends on time with a checkpoint and an export, and with
``train.optimizer.cooldown`` its learning rate falls to ~0 by the limit although ``stage.steps`` is far away; the next
launch continues the stage and warns that its cool-down starts over. The ETA counts down to the limit."""
from __future__ import annotations

from .conftest import metrics, run


def test_a_time_limit_ends_the_stage_with_an_export_on_a_cooled_down_rate(tmp_path, base_overrides):
    out = tmp_path / "run"
    args = [*base_overrides, "stage.steps=100000", "train.optimizer.cooldown=0.5", "train.optimizer.warmup_steps=1",
            "train.optimizer.lr=1e-3", "train.log.every=1", "train.checkpoint.every=100000"]
    log = run(out, [*args, "train.time_limit_min=0.2"], nproc=1)
    assert "train.time_limit_min=0.2 reached at step" in log
    m = metrics(out)
    steps = sorted(m)
    assert len(steps) >= 6, f"{len(steps)} steps in 12 s"
    lrs = [m[s]["lr"] for s in steps]  # each the rate of the step after it
    assert all(m[s]["update_applied"] == 1 for s in steps)
    assert max(lrs) <= 1e-3 * (1 + 1e-9) and lrs[0] > 0.5e-3  # the first half of the time at the full rate
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), lrs  # then only down
    # the last rate follows the time at the end of the step before the last: past 80% of the 12 s (unless a step
    # took > 2.4 s), so at most (1 - 0.8) / 0.5 of the rate
    assert lrs[-1] < 0.4e-3, lrs
    # the ETA counts down to the limit, not to stage.steps (which would be hours away)
    assert all(0 <= m[s]["eta_s"] <= 12 for s in steps), [m[s]["eta_s"] for s in steps]
    last = max(steps)
    assert (out / "stage1" / "checkpoints").is_dir() and list((out / "stage1" / "export").glob("*.safetensors"))
    assert f"step {last} of 100000" in log

    # the next launch continues the stage (resume=auto) and says that its cool-down starts over
    again = run(out, [*args, "train.time_limit_min=0.05"], nproc=1, log_name="again.log")
    assert f"resumed from {out / 'stage1' / 'checkpoints' / f'step_{last:08d}'} at step {last}" in again, again[-3000:]
    assert "the cool-down follows this launch's time" in again
    assert max(metrics(out)) > last
