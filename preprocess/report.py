"""The dataset report written after each run: one self-contained HTML page of plots and tables.

Plots (PNG, embedded): head yaw per clip (mean, and the min/max range), clip lengths, shot-scale
counts, failures by reason, per-stage throughput (frames/s of busy time), and the annotation
coverage per clip (fraction of frames with the subject, the head, a hand). Everything comes from the
index (one row per clip, with the annotators' ``m_*`` scalars), the failures table and the run
summary, so the report never reopens a shard.
"""
from __future__ import annotations

import base64
import html
import io
import os

import numpy as np
import pandas as pd

from .schema import SHOT_SCALES

REPORT_FILE = "report.html"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column, NaN where missing (clips from runs without that annotator)."""
    if name not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce")


def _fig(title: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.set_title(title, fontsize=10)
    return fig, ax


def _empty(ax, what: str):
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def yaw_plot(index: pd.DataFrame) -> str:
    fig, ax = _fig("head yaw per clip (deg; > 0: face towards image right)")
    mean, lo, hi = _col(index, "m_yaw_mean"), _col(index, "m_yaw_min"), _col(index, "m_yaw_max")
    ok = mean.notna()
    if not ok.any():
        _empty(ax, "head annotations")
        return _png(fig)
    bins = np.arange(-90, 91, 10)
    ax.hist([mean[ok], lo[ok], hi[ok]], bins=bins, label=["mean", "min", "max"], color=["C0", "C2", "C3"])
    ax.set_xlabel("yaw (deg)")
    ax.set_ylabel("clips")
    ax.legend(fontsize=8)
    return _png(fig)


def length_plot(index: pd.DataFrame) -> str:
    fig, ax = _fig("clip length")
    n = _col(index, "n_frames").dropna()
    if n.empty:
        _empty(ax, "clips")
    else:
        ax.hist(n, bins=min(30, max(5, n.nunique())), color="C0")
        ax.set_xlabel("frames")
        ax.set_ylabel("clips")
    return _png(fig)


def shot_scale_plot(index: pd.DataFrame) -> str:
    fig, ax = _fig("shot scale")
    if "m_shot_scale" not in index or index["m_shot_scale"].isna().all():
        _empty(ax, "shot-scale labels")
        return _png(fig)
    counts = index["m_shot_scale"].fillna("").replace("", "unknown").value_counts()
    known = (*SHOT_SCALES, "unknown")
    order = [s for s in known if s in counts] + [s for s in counts.index if s not in known]
    ax.bar(order, [counts[s] for s in order], color="C1")
    ax.set_ylabel("clips")
    return _png(fig)


def failures_plot(failures: pd.DataFrame) -> str:
    fig, ax = _fig("failures by reason")
    if failures is None or not len(failures):
        _empty(ax, "failures")
        return _png(fig)
    labels = (failures["stage"].astype(str) + ": " + failures["error_class"].astype(str)).value_counts()
    ax.barh(labels.index[::-1], labels.values[::-1], color="C3")
    ax.set_xlabel("videos / clips")
    return _png(fig)


def throughput_plot(summary: dict) -> str:
    fig, ax = _fig("per-stage throughput (frames per busy second)")
    sec, frames = summary.get("stage_seconds", {}) or {}, summary.get("stage_frames", {}) or {}
    fps = {k: frames.get(k, 0) / v for k, v in sec.items() if v and frames.get(k)}
    if not fps:
        _empty(ax, "stage timings")
        return _png(fig)
    names = list(fps)
    ax.barh(names[::-1], [fps[k] for k in names][::-1], color="C4")
    for i, k in enumerate(names[::-1]):
        ax.text(fps[k], i, f" {fps[k]:.1f}", va="center", fontsize=8)
    ax.set_xlabel("frames/s")
    return _png(fig)


def coverage_plot(index: pd.DataFrame) -> str:
    fig, ax = _fig("annotation coverage per clip (fraction of frames)")
    cols = {"subject": "m_subject_valid_frac", "head": "m_head_valid_frac", "hands": "m_hands_valid_frac"}
    data = {k: _col(index, c).dropna() for k, c in cols.items()}
    data = {k: v for k, v in data.items() if len(v)}
    if not data:
        _empty(ax, "annotations")
        return _png(fig)
    ax.hist(list(data.values()), bins=np.linspace(0, 1, 11), label=list(data), color=["C0", "C1", "C2"][:len(data)])
    ax.set_xlabel("fraction of frames")
    ax.set_ylabel("clips")
    ax.legend(fontsize=8)
    return _png(fig)


def _table(rows: list[tuple[str, object]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _facts(index: pd.DataFrame, failures: pd.DataFrame, summary: dict) -> list[tuple[str, object]]:
    n = len(index)
    facts = [("clips", n), ("videos", index["video_key"].nunique() if n and "video_key" in index else 0),
             ("hours of clips", round(float(_col(index, "duration_s").sum()) / 3600, 4)),
             ("failures", len(failures) if failures is not None else 0)]
    for k in ("wall_seconds", "videos_done", "videos_failed", "hours_in", "hours_out", "dataset_bytes"):
        if k in summary:
            facts.append((k, summary[k]))
    for label, col in (("clips with several people", "m_person_count_max"),):
        v = _col(index, col)
        if v.notna().any():
            facts.append((label, int((v > 1).sum())))
    for label, col in (("clips without a face identity", "m_identity_valid"),):
        if col in index:
            facts.append((label, int((~index[col].fillna(False).astype(bool)).sum())))
    fb = _col(index, "m_ref_fallbacks")
    if fb.notna().any():
        facts.append(("reference roles filled from the clip itself", int(fb.sum())))
    fit = _col(index, "m_body_fit_px")
    if fit.notna().any():
        facts.append(("median body 3D→2D fit (px)", round(float(fit.median()), 2)))
    return facts


def write_report(output_dir: str, index: pd.DataFrame, failures: pd.DataFrame, summary: dict) -> str:
    """Write ``{output_dir}/report.html`` and return its path."""
    failures = failures if failures is not None else pd.DataFrame(columns=["stage", "error_class"])
    plots = [yaw_plot(index), length_plot(index), shot_scale_plot(index), coverage_plot(index),
             failures_plot(failures), throughput_plot(summary)]
    fail_rows = ""
    if len(failures):
        top = failures.head(50)
        fail_rows = ("<h2>failures (first 50)</h2><table>"
                     "<tr><th>source</th><th>stage</th><th>reason</th><th>message</th></tr>") + "".join(
            f"<tr><td>{html.escape(str(r.get('source', '')))}</td><td>{html.escape(str(r.get('stage', '')))}</td>"
            f"<td>{html.escape(str(r.get('error_class', '')))}</td>"
            f"<td>{html.escape(str(r.get('error_message', ''))[:300])}</td></tr>"
            for r in top.to_dict("records")) + "</table>"
    where = html.escape(str(summary.get("output", output_dir)))
    run_id = html.escape(str(summary.get("run_id", "")))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dataset report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} img{{margin:4px;border:1px solid #ddd}}
table{{border-collapse:collapse;margin:.5em 0}} \
th,td{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}}</style>
</head><body><h1>dataset report</h1><p>{where} · run {run_id}</p>
{_table(_facts(index, failures, summary))}
<div>{''.join(plots)}</div>{fail_rows}</body></html>"""
    path = os.path.join(output_dir, REPORT_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
