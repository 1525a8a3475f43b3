"""Main-subject selection: link per-frame person boxes into tracks by overlap, keep the best track.

A clip can show several people; the annotations follow one. Detections of consecutive frames are
linked greedily by IoU (a track survives ``max_gap`` frames without a match), and the track with the
largest summed "prominence" (box area, down-weighted away from the image centre) is the main
subject: the largest, most central person, kept by box overlap.
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
