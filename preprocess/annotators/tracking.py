"""Main-subject selection: link per-frame person boxes into tracks by overlap, keep the best track.

A clip can show several people; the annotations follow one. A detector may also report one person
twice in a frame (MediaPipe Pose with ``num_poses: 2`` does, in the 96 px sample clips and in
Megamind.avi); such duplicates are merged first (:func:`distinct_people`): left in, the second copy
starts a track that takes the subject's detections of the next frames by overlap, and those frames
are lost to the main subject. Detections of consecutive frames are then linked greedily by IoU (a
track survives ``max_gap`` frames without a match), and the track with the largest summed
"prominence" (box area, down-weighted away from the image centre) is the main subject: the largest,
most central person, kept by box overlap.
"""
from __future__ import annotations

import numpy as np

from .geometry import iou


def prominence(box: np.ndarray, width: int, height: int) -> float:
    """Area fraction of a box times a centrality weight (1 at the centre, 0.5 at a corner)."""
    x0, y0, x1, y1 = np.clip(box, [0, 0, 0, 0], [width, height, width, height])
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0) / (width * height)
    cx, cy = (x0 + x1) / 2 / width - 0.5, (y0 + y1) / 2 / height - 0.5
    return float(area * (1.0 - 0.5 * np.hypot(cx, cy) / np.hypot(0.5, 0.5)))


def distinct_people(joints2d: np.ndarray, conf: np.ndarray, boxes: np.ndarray, *, min_conf: float = 0.5,
                    max_dist: float = 0.15) -> np.ndarray:
    """Indices (ascending) of the detections of one frame that are different people.

    Two detections are one person when the joints both see (confidence >= ``min_conf``) lie, at the
    median, within ``max_dist`` of the smaller box's long side of each other; the one with the larger
    summed confidence is kept. Measured (MediaPipe Pose, embedded): duplicates 0.02-0.07 (96 px
    sample clips, Megamind.avi), distinct people 0.26 and more (Megamind.avi, basketball2.png, two
    photos side by side).
    """
    P = len(conf)
    side = np.max(boxes[:, 2:] - boxes[:, :2], axis=1) if P else np.zeros(0)
    keep: list[int] = []
    for i in np.argsort(-conf.sum(axis=1), kind="stable"):
        same = False
        for k in keep:
            both = (conf[i] >= min_conf) & (conf[k] >= min_conf)
            if both.sum() >= 3:  # too few common joints say nothing
                d = np.median(np.linalg.norm(joints2d[i][both] - joints2d[k][both], axis=-1))
                same = d <= max_dist * max(min(side[i], side[k]), 1.0)
            if same:
                break
        if not same:
            keep.append(int(i))
    return np.array(sorted(keep), dtype=np.int64)


def main_subject(boxes: list[np.ndarray], width: int, height: int, *, min_iou: float = 0.2,
                 max_gap: int = 5) -> np.ndarray:
    """Index of the main subject's detection in each frame (-1 where it was not found).

    ``boxes[t]`` is a (P_t, 4) array of the people detected in frame t.
    """
    tracks: list[dict] = []  # {"last": box, "last_t": int, "members": {t: i}, "score": float}
    for t, bt in enumerate(boxes):
        bt = np.asarray(bt).reshape(-1, 4)
        live = [k for k, tr in enumerate(tracks) if t - tr["last_t"] <= max_gap + 1]
        pairs = sorted(((iou(tracks[k]["last"], bt[i]), k, i) for k in live for i in range(len(bt))), reverse=True)
        used_t, used_i = set(), set()
        for ov, k, i in pairs:
            if ov < min_iou or k in used_t or i in used_i:
                continue
            used_t.add(k)
            used_i.add(i)
            tr = tracks[k]
            tr["last"], tr["last_t"] = bt[i], t
            tr["members"][t] = i
            tr["score"] += prominence(bt[i], width, height)
        for i in range(len(bt)):
            if i not in used_i:
                tracks.append({"last": bt[i], "last_t": t, "members": {t: i},
                               "score": prominence(bt[i], width, height)})
    out = np.full(len(boxes), -1, dtype=np.int64)
    if tracks:
        best = max(tracks, key=lambda tr: tr["score"])
        for t, i in best["members"].items():
            out[t] = i
    return out
