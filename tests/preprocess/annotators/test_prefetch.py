"""A clip's fresh VIDEO-mode MediaPipe task is made in the background while the previous clip runs (prefetch: on by
default on the GPU delegate, where a new task costs ~0.5-1 s of GL set-up), with the same annotations as without."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from preprocess.annotators.backends import mediapipe_common as mc
from preprocess.demo_media import Motion

from .conftest import annotate, render, stage_spec


class _Task:
    def __init__(self, n: int):
        self.n, self.closed, self.thread = n, 0, threading.current_thread().name

    def detect_for_video(self, image, ts):
        return (self.n, ts)

    def close(self):
        self.closed += 1


class _Factory:
    """Counts the tasks it builds; fails the builds whose numbers are in ``fail``."""

    def __init__(self, fail=()):
        self.built: list[_Task] = []
        self.fail = set(fail)  # call numbers, from 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, mode):
        with self.lock:
            self.calls += 1
            if self.calls - 1 in self.fail:
                raise RuntimeError("Unable to initialize EGL")
            self.built.append(_Task(self.calls - 1))
            return self.built[-1]


def test_the_next_sequences_task_is_built_in_the_background_and_swapped_in():
    f = _Factory()
    task = mc.VideoTask(f, video=True, prefetch=True)
    task.start(True)
    first = task._task
    assert first.thread == threading.current_thread().name  # the first one is built where it is needed
    task._spare.result()
    assert len(f.built) == 2 and f.built[1].thread.startswith("mediapipe-prefetch")
    assert task.run(None, 40.0) == (first.n, 40)
    task.start(False)  # the same sequence: the same task
    assert task._task is first
    task.start(True)  # a new sequence: the spare, fresh, and the old task closed
    assert task._task is f.built[1] and first.closed == 1 and task.run(None, 0.0) == (f.built[1].n, 0)
    task._spare.result()
    task.close()
    assert all(t.closed == 1 for t in f.built)  # the current task and the spare, each exactly once
    assert task._pool is None


def test_without_prefetch_and_in_image_mode_no_spare_is_built():
    for video, prefetch in ((True, False), (False, True)):
        f = _Factory()
        task = mc.VideoTask(f, video=video, prefetch=prefetch)
        task.start(True)
        task.start(True)
        assert len(f.built) == (2 if video else 1) and task._spare is None
        task.close()


def test_a_spare_that_fails_is_built_again_where_its_error_surfaces(caplog):
    f = _Factory(fail={1})  # the first spare fails
    task = mc.VideoTask(f, video=True, prefetch=True)
    task.start(True)
    with pytest.raises(RuntimeError, match="EGL"):
        task._spare.result()
    task.start(True)  # the rebuild in the foreground succeeds here
    assert "prefetched MediaPipe task failed" in caplog.text
    assert task._task.thread == threading.current_thread().name
    task.close()
    f2 = _Factory(fail={1, 2})  # the spare and its foreground rebuild fail: the rebuild's error is raised
    task = mc.VideoTask(f2, video=True, prefetch=True)
    task.start(True)
    task._spare.exception()
    with pytest.raises(RuntimeError, match="EGL"):
        task.start(True)
    task.close()


def test_prefetch_setting():
    gpu, cpu = _Factory(), _Factory()
    gpu.delegate, cpu.delegate = "gpu", "cpu"
    key = "annotators.body.params.backend.params"
    assert mc.prefetch_enabled(mc.MediaPipeParams(), gpu, key)  # auto: on the GPU delegate only
    assert not mc.prefetch_enabled(mc.MediaPipeParams(), cpu, key)
    assert mc.prefetch_enabled(mc.MediaPipeParams(prefetch=True), cpu, key)
    assert not mc.prefetch_enabled(mc.MediaPipeParams(prefetch="false"), gpu, key)
    with pytest.raises(ValueError, match=r"annotators.body.params.backend.params.prefetch='sometimes'"):
        mc.prefetch_enabled(mc.MediaPipeParams(prefetch="sometimes"), gpu, key)


def test_the_real_cpu_factory_says_its_delegate():
    f = mc.landmarker_factory("Pose", "pose_landmarker_full", mc.MediaPipeParams(), "k.model_path")
    assert f.delegate == "cpu"


def test_prefetched_tasks_annotate_as_fresh_ones():
    """The body stage with prefetch forced on gives the same skeletons, clip after clip, as without it: each clip
    gets an untouched task either way (real MediaPipe, CPU delegate)."""
    from preprocess.stage import load_stage

    clips = [render(photo, Motion(shift=(8.0, 4.0), scale=(0.7, 0.7)), 4, size=256)[0]
             for photo in ("grace_hopper", "camera", "grace_hopper")]
    out = {}
    for prefetch in (False, True):
        spec = stage_spec("annotators", "body")
        spec.params["backend"]["params"]["prefetch"] = prefetch
        body = load_stage("body", spec)
        body.setup()
        out[prefetch] = [annotate([body], frames, video_key=f"v{i}") for i, frames in enumerate(clips)]
        assert body.backend.task.prefetch is prefetch
        body.backend.task.close()
    for a, b in zip(out[False], out[True]):
        np.testing.assert_array_equal(a["body_joints2d"], b["body_joints2d"])
        np.testing.assert_array_equal(a["body_conf"], b["body_conf"])
