"""A metric record with ``train.log.every=N`` describes all N steps since the one before it, not only its own step:
the same run logged every step and every 4 steps gives window means that are the means of the per-step records."""
from __future__ import annotations

import math

from .conftest import REF_STEPS, metrics, run


def test_a_record_describes_every_step_since_the_last_one(tmp_path, base_overrides, reference_zero2):
    out = tmp_path / "run"
    log = run(out, [*base_overrides, "zero=zero2", f"stage.steps={REF_STEPS}", "train.log.every=4"])
    every_step, windows = metrics(reference_zero2), metrics(out)
    assert sorted(windows) == [4, 8, REF_STEPS]  # the last step always logs
    first = 1
    for last in sorted(windows):
        w, steps = windows[last], range(first, last + 1)
        assert w["steps"] == len(steps)
        # the same training as the per-step run (bitwise: the resume tests rely on it)
        assert w["grad_norm"] == every_step[last]["grad_norm"] and w["lr"] == every_step[last]["lr"]
        assert w["samples"] == sum(every_step[s]["samples"] for s in steps)
        assert math.isclose(w["loss"], sum(every_step[s]["loss"] for s in steps) / len(steps), rel_tol=1e-6)
        assert sorted(map(tuple, w["sample_keys"])) == sorted(
            tuple(k) for s in steps for k in every_step[s]["sample_keys"])
        # throughput over the window's wall time; the slowest step bounds the mean
        assert math.isclose(w["samples_per_s"] * w["step_s"] * w["steps"], w["samples"], rel_tol=1e-6)
        assert w["step_s_max"] >= w["step_s"] > 0 and 0 <= w["data_wait"] <= 1 and w["update_applied"] == 1
        first = last + 1
    assert f"(mean of 4 steps, slowest {windows[4]['step_s_max']:.4g} s)" in log
