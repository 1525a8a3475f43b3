"""MediaPipe's GPU delegate is checked once at stage setup: refused with the fix, or (auto) the CPU."""
from __future__ import annotations

import logging

import pytest

from preprocess.annotators.backends import mediapipe_common as mc

KEY = "annotators.body.params.backend.params.model_path"


def _factory(delegate):
    return mc.landmarker_factory("Pose", "pose_landmarker_full", mc.MediaPipeParams(delegate=delegate), KEY)


def test_a_gpu_delegate_that_cannot_start_fails_at_setup_with_the_fix(monkeypatch):
    monkeypatch.setattr(mc, "gpu_delegate_problem", lambda factory: "Unable to initialize EGL")
    with pytest.raises(RuntimeError) as e:
        _factory("gpu")
    msg = str(e.value)
    assert "Unable to initialize EGL" in msg and "libegl1 libgles2 libglvnd0 libopengl0" in msg
    assert "annotators.body.params.backend.params.delegate=cpu" in msg


def test_auto_falls_back_to_the_cpu_with_a_warning(monkeypatch, caplog):
    from mediapipe.tasks.python import vision

    monkeypatch.setattr(mc, "gpu_delegate_problem", lambda factory: "Unable to initialize EGL")
    with caplog.at_level(logging.WARNING):
        factory = _factory("auto")
    assert "runs on the CPU" in caplog.text
    mc._close(factory(vision.RunningMode.IMAGE))  # a working CPU task


def test_the_real_check_on_this_machine():
    """Here (no GPU) the real check reports a problem, or the delegate works: never a per-clip failure."""
    try:
        _factory("gpu")
    except RuntimeError as e:
        assert "GPU delegate does not start" in str(e)


def test_unknown_delegate_is_refused():
    with pytest.raises(ValueError, match="use cpu, gpu or auto"):
        _factory("tpu")
