"""report.py: the dataset report renders every plot from the index, failures and summary alone."""
import base64
import re

import numpy as np
import pandas as pd

from preprocess.report import write_report


def _index(n=12):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "key": [f"{i:016x}_0000" for i in range(n)], "shard": "p.tar",
        "video_key": [f"{i // 2:016x}" for i in range(n)],
        "source": "x.mp4", "n_frames": rng.integers(25, 122, n), "fps": 25.0, "width": 512, "height": 384,
        "duration_s": rng.uniform(1, 5, n), "m_shot_scale": rng.choice(["portrait", "upper_body", "full_body", ""], n),
        "m_yaw_mean": rng.uniform(-60, 60, n), "m_yaw_min": rng.uniform(-80, -10, n),
        "m_yaw_max": rng.uniform(10, 80, n),
        "m_subject_valid_frac": rng.uniform(0.5, 1, n), "m_head_valid_frac": rng.uniform(0.5, 1, n),
        "m_hands_valid_frac": rng.uniform(0, 1, n), "m_person_count_max": rng.integers(0, 3, n),
        "m_identity_valid": rng.random(n) > 0.2, "m_ref_fallbacks": rng.integers(0, 2, n), "m_body_fit_px": 10.0,
    })


def _images(html):
    return [base64.b64decode(b) for b in re.findall(r"base64,([A-Za-z0-9+/=]+)", html)]


def test_report_has_every_plot_and_the_numbers(tmp_path):
    failures = pd.DataFrame({"video_key": ["a", "b", "c"], "key": ["", "", "c_0001"],
                             "source": ["a.mp4", "b.avi", "c.mp4"], "stage": ["probe", "refs", "refs"],
                             "error_class": ["not_a_video", "NoPersonError", "SubjectLostError"],
                             "error_message": ["bad", "no person in any frame", "person in 20% of the frames"]})
    summary = {"run_id": "r1", "wall_seconds": 12.5, "stage_seconds": {"body": 10.0, "head": 4.0, "refs": 0.0},
               "stage_frames": {"body": 500, "head": 500}}
    path = write_report(str(tmp_path), _index(), failures, summary)
    html = open(path, encoding="utf-8").read()
    imgs = _images(html)
    assert len(imgs) == 6 and all(b.startswith(b"\x89PNG") and len(b) > 5000 for b in imgs)
    for text in ("NoPersonError", "SubjectLostError", "wall_seconds", "12.5", "clips without a face identity"):
        assert text in html


def test_report_without_annotations_or_clips(tmp_path):
    engine_only = _index(3)[["key", "shard", "video_key", "source", "n_frames", "fps", "width", "height", "duration_s"]]
    html = open(write_report(str(tmp_path), engine_only, pd.DataFrame(), {}), encoding="utf-8").read()
    assert len(_images(html)) == 6 and "no head annotations" not in html  # plots say so in the image
    empty = pd.DataFrame(columns=["key", "shard", "video_key", "n_frames", "duration_s"])
    assert open(write_report(str(tmp_path), empty, None, {}), encoding="utf-8").read().count("<img") == 6
