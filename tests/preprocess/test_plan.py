"""Clip planning: shot cuts land on real cuts, windows respect 25-121-style bounds, drops are counted."""
import numpy as np
import pytest

from preprocess import demo_media
from preprocess.plan import content_key, find_shots, plan_video, plan_windows
from preprocess.video import VideoError


def _concat_video(path, parts, size=96, fps=25.0):
    frames = [demo_media.render_motion(demo_media.load_photo(p), (size, size), n, m)[0] for p, n, m in parts]
    return demo_media.write_video(path, np.concatenate(frames), fps)


def test_cuts_at_the_joins_of_different_shots(tmp_path):
    m = demo_media.Motion(shift=(10.0, 0.0))
    path = _concat_video(tmp_path / "three_shots.mp4",
                         [("astronaut", 30, m), ("camera", 40, m), ("grace_hopper", 35, m)])
    plan = plan_video(str(path), analysis_width=64, threshold=27.0, min_shot_frames=8, target_fps=None,
                      min_frames=10, max_frames=30, min_seconds=0.1)
    assert plan.n_frames == 105
    assert plan.shots == [(0, 30), (30, 70), (70, 105)]
    # every window stays inside its shot and within the bounds
    for c in plan.clips:
        a, b = plan.shots[c.shot_index]
        assert a <= c.frame_index[0] and c.frame_index[-1] < b
        assert 10 <= len(c.frame_index) <= 30
    # a 40-frame shot with max 30 splits into two equal windows of 20
    assert [len(c.frame_index) for c in plan.clips if c.shot_index == 1] == [20, 20]
    covered = np.concatenate([c.frame_index for c in plan.clips])
    assert np.array_equal(covered, np.arange(105))  # no frame lost or repeated at source fps


def test_smooth_motion_is_one_shot(tmp_path):
    path = _concat_video(tmp_path / "one.mp4",
                         [("astronaut", 60, demo_media.Motion(shift=(40.0, 20.0), rotate=(0, 10)))])
    plan = plan_video(str(path), analysis_width=64, threshold=27.0, min_shot_frames=8, target_fps=None,
                      min_frames=10, max_frames=121, min_seconds=0.1)
    assert plan.shots == [(0, 60)] and len(plan.clips) == 1


def test_windows_bounds_stride_and_drops():
    shots = [(0, 10), (10, 300), (300, 330)]
    fps, clips, dropped = plan_windows(shots, src_fps=50.0, target_fps=25.0, min_frames=25, max_frames=121)
    assert fps == 25.0
    assert dropped == {"shot_too_short": 2}  # 5 and 15 frames at 25 fps
    lengths = [len(c.frame_index) for c in clips]
    assert sum(lengths) == 145 and all(25 <= n <= 121 for n in lengths) and len(clips) == 2
    assert all(np.all(np.diff(c.frame_index) == 2) for c in clips)  # every other source frame
    # never upsampled: a 20 fps source at target 25 keeps every frame
    fps, clips, _ = plan_windows([(0, 40)], src_fps=20.0, target_fps=25.0, min_frames=25, max_frames=121)
    assert fps == 20.0 and np.array_equal(clips[0].frame_index, np.arange(40))


def test_find_shots_respects_min_shot_length():
    scores = np.zeros(50)
    scores[[10, 12, 30]] = 100.0
    assert find_shots(scores, 27.0, 5) == [(0, 10), (10, 30), (30, 50)]


def test_content_key_is_stable_and_content_based():
    k = content_key(100, b"a" * 10, b"b" * 10)
    assert k == content_key(100, b"a" * 10, b"b" * 10) and len(k) == 16 and k.isalnum() and "." not in k
    assert k != content_key(101, b"a" * 10, b"b" * 10)


def test_too_short_video_is_an_error(tmp_path):
    path = _concat_video(tmp_path / "short.mp4", [("astronaut", 6, demo_media.Motion())])
    with pytest.raises(VideoError) as e:
        plan_video(str(path), analysis_width=64, threshold=27.0, min_shot_frames=8, target_fps=None,
                   min_frames=10, max_frames=30, min_seconds=0.1)
    assert e.value.reason == "too_short"
