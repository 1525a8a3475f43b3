"""python infer/evaluate.py [checkpoint=...] [data.source.dataset=...] [key=value ...]: score a model the way papers do.

Self-driven reconstruction on the held-out split of a preprocessed dataset (``data.split``: by source video,
a pure function of the video key, so training with ``role=train`` never saw these videos; the list used is
written to ``heldout_videos.json``): for each clip the model animates the clip's own stored references with
the clip's own stored controls, and the result is compared with the clip. Beside the model, always, the
copy-the-reference and motion-dropped baselines (``train.evaluate``).

- latent space (always): PSNR of the sampled latents, and the one-step denoising loss;
- pixel space (``pixel_metrics``; meaningful with a real VAE): PSNR, SSIM, LPIPS, FID, FVD through
  ``infer.metrics`` in the ``metrics.mode`` (paper: the DisCo protocol | clean), with the networks whose weight
  files are configured (``conf/metrics/default.yaml``); PSNR and SSIM need none.

Writes ``metrics.json``, ``metrics.md`` (a table like the paper's Table 1), ``clips.png`` (per-clip metric
distributions) and ``psnr_over_time.png`` (per-frame PSNR, mean over clips) under ``output``.

Folder mode: ``generated=<dir> ground_truth=<dir>`` scores any two folders of videos matched by file name.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python infer/evaluate.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger("evaluate")

METHOD_NAMES = {"model": "model", "copy_reference": "copy the reference", "motion_dropped": "motion dropped"}
TABLE_METRICS = (("fid", "FID ↓"), ("ssim", "SSIM ↑"), ("psnr", "PSNR ↑"), ("lpips", "LPIPS ↓"), ("fvd", "FVD ↓"))


def evaluate_dataset(cfg: DictConfig) -> dict:
    """Score the checkpoint on the held-out clips; returns the record written as metrics.json."""
    import torch

    from infer.animate import load_export
    from infer.metrics import MetricsConfig, VideoScorer
    from models.redact import redact_url
    from models.vae import frames_uint8
    from train.data import build_loader, to_config
    from train.data.plan import video_key_of
    from train.evaluate import evaluate_latents

    t0 = time.time()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    exp = load_export(cfg.checkpoint, cfg.weights, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    data = to_config(cfg.data)
    if data.split.heldout_percent <= 0:
        log.warning("data.split.heldout_percent is 0: no video is held out, the scores are on training videos "
                    "(set data.split.heldout_percent for the training run and this evaluation)")
        data.split.role = "train"
    else:
        data.split.role = "heldout"
    loader = build_loader(data, exp.cfg, rank=0, world_size=1, seed=int(cfg.seed))
    batches = []
    for b in loader:
        if int(b.epoch.max()) > 0 or sum(x.size for x in batches) >= cfg.clips:
            break
        batches.append(b)
    extra = sum(b.size for b in batches) - cfg.clips
    if extra > 0:  # exactly ``clips`` clips
        batches[-1] = batches[-1].head(batches[-1].size - extra)
    if not batches:
        raise SystemExit(f"error: no clip of {data.source.dataset} is in the held-out split "
                         f"(data.split.heldout_percent={data.split.heldout_percent})")
    mcfg = MetricsConfig.from_cfg(cfg.metrics)
    nets = None
    pixel = {}
    if cfg.pixel_metrics:
        nets = _configured_nets(mcfg, device)
        pixel = {m: VideoScorer(mcfg.mode, nets, fid_every=mcfg.fid_every, fvd_stride=mcfg.fvd_stride,
                                batch=mcfg.batch) for m in METHOD_NAMES}

    def score_pixels(batch, gt_latents, out):
        gt = batch.video_pixels()
        decoded = {m: exp.vae.decode(x.float()) for m, x in out.items() if m != "copy_reference"}
        ref = batch.ref_images[:, 0].float().div(127.5).sub(1.0)[:, :, None].expand(-1, -1, gt.shape[2], -1, -1)
        decoded["copy_reference"] = ref  # the reference frame itself, held still
        for i, key in enumerate(batch.keys):
            g = frames_uint8(gt[i])
            for m, v in decoded.items():
                pixel[m].add(key, frames_uint8(v[i]), g)

    scores = evaluate_latents(exp.model, exp.vae, batches, steps=cfg.steps or exp.cfg.flow.sample_steps,
                              seed=int(cfg.seed), dtype=next(exp.model.parameters()).dtype, use_face=cfg.use_face,
                              guidance_ref=cfg.guidance_ref, guidance_motion=cfg.guidance_motion,
                              on_batch=score_pixels if pixel else None)
    latent = scores.summary()
    rec = {
        "checkpoint": str(exp.weights_path), "weights_sha256": exp.weights_sha256, "preset": exp.cfg.name,
        "dataset": (redact_url(data.source.dataset) if data.source.dataset
                    else [redact_url(u) for u in data.source.shards]),
        "split": {"heldout_percent": data.split.heldout_percent, "role": data.split.role, "salt": data.split.salt},
        "clips": latent["clips"], "frames": int(batches[0].num_frames),
        "settings": {"steps": cfg.steps or exp.cfg.flow.sample_steps, "seed": int(cfg.seed),
                     "guidance_ref": exp.cfg.flow.guidance_ref if cfg.guidance_ref is None else cfg.guidance_ref,
                     "guidance_motion": (exp.cfg.flow.guidance_motion if cfg.guidance_motion is None
                                         else cfg.guidance_motion), "use_face": cfg.use_face},
        "latent": latent,
        "pixel": {m: s.result() for m, s in pixel.items()},
        "seconds": round(time.time() - t0, 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    heldout = sorted({video_key_of(k) for k in latent["per_clip"]["keys"]})
    (out / "heldout_videos.json").write_text(json.dumps({"split": rec["split"], "video_keys": heldout}, indent=1))
    (out / "metrics.json").write_text(json.dumps(rec, indent=1, default=_json_default))
    (out / "metrics.md").write_text(table(rec))
    plots(out, rec)
    print(table(rec) + f"\n[evaluate] {out / 'metrics.json'}", flush=True)
    return rec


def _configured_nets(mcfg, device):
    """The networks of the learned metrics whose weight files are configured (None when there are none)."""
    wanted = [m for m, w in (("lpips", "lpips_" + mcfg.lpips_net), ("fid", "inception_fid"),
                             ("fvd", mcfg.fvd_network)) if _configured(mcfg, w, m)]
    return mcfg.load_nets(wanted, device=device) if wanted else None


def _configured(mcfg, weight: str, metric: str) -> bool:
    """Whether a learned metric's network file is configured (LPIPS heads ship with torchmetrics; the backbone
    does not); a metric left out is reported as such, not as an error."""
    w = mcfg.weights.get(weight)
    ok = w is not None and w.path is not None
    if metric == "lpips":
        backbone = mcfg.weights.get("vgg16" if mcfg.lpips_net == "vgg" else "alexnet")
        ok = backbone is not None and backbone.path is not None
    if not ok:
        log.info("%s: its network's weights are not configured (metrics.weights): not scored", metric)
    return ok


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    return float(x)


def table(rec: dict) -> str:
    """The paper's Table 1 layout: one row per method, FID / SSIM / PSNR / LPIPS / FVD + latent PSNR."""
    head = "| method | " + " | ".join(n for _, n in TABLE_METRICS) + " | latent PSNR ↑ |\n"
    head += "|---|" + "---:|" * (len(TABLE_METRICS) + 1) + "\n"
    rows = []
    for m, name in METHOD_NAMES.items():
        agg = rec["pixel"].get(m, {}).get("aggregate", {})
        cells = [f"{agg[k]:.4g}" if isinstance(agg.get(k), float) and math.isfinite(agg[k]) else "–"
                 for k, _ in TABLE_METRICS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {rec['latent']['mean_psnr_db'][m]:.2f} |")
    mode = next((r["mode"] for r in rec["pixel"].values()), None)
    note = (f"\n{rec['clips']} held-out clips of {rec['frames']} frames, {rec['settings']['steps']} sampling steps"
            + (f", pixel metrics in {mode} mode" if mode else ", latent metrics only") + ".\n")
    return head + "\n".join(rows) + "\n" + note


def plots(out: Path, rec: dict) -> None:
    """clips.png: per-clip distributions (latent PSNR, and each pixel metric scored); psnr_over_time.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("latent PSNR (dB)", {m: rec["latent"]["per_clip"][m] for m in METHOD_NAMES})]
    for k, name in TABLE_METRICS:
        per = {m: [c[k] for c in rec["pixel"][m]["clips"].values() if k in c] for m in rec["pixel"]}
        if any(per.values()):
            panels.append((name, per))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (name, per) in zip(axes[0], panels):
        ax.boxplot([per[m] for m in per], tick_labels=[METHOD_NAMES[m] for m in per])
        ax.set_title(name)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out / "clips.png", dpi=110)
    plt.close(fig)
    if rec["pixel"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for m, r in rec["pixel"].items():
            curves = [c["per_frame"]["psnr"] for c in r["clips"].values()]
            n = min(len(c) for c in curves)
            ax.plot(np.mean([c[:n] for c in curves], 0), label=METHOD_NAMES[m])
        ax.set_xlabel("frame")
        ax.set_ylabel("PSNR (dB), mean over clips")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "psnr_over_time.png", dpi=110)
        plt.close(fig)


def score_folders_job(cfg: DictConfig) -> dict:
    """Folder mode: ``generated`` vs ``ground_truth`` videos matched by name."""
    from infer.metrics import MetricsConfig, score_folders

    mcfg = MetricsConfig.from_cfg(cfg.metrics)
    nets = _configured_nets(mcfg, "cpu")
    res = score_folders(cfg.generated, cfg.ground_truth, mcfg.mode, nets, fid_every=mcfg.fid_every,
                        fvd_stride=mcfg.fvd_stride, batch=mcfg.batch)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(res, indent=1, default=_json_default))
    print(json.dumps(res["aggregate"], default=_json_default), flush=True)
    return res


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from infer.animate import InferError
    from models.redact import install_log_redaction
    from models.typed_config import ConfigError

    install_log_redaction()  # no credential of a dataset URL reaches a log line
    try:
        if cfg.generated is not None or cfg.ground_truth is not None:
            if cfg.generated is None or cfg.ground_truth is None:
                raise ConfigError("folder mode needs both generated=<dir> and ground_truth=<dir>")
            score_folders_job(cfg)
        else:
            evaluate_dataset(cfg)
    except (ConfigError, InferError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from models.command_line import exit_on_bad_command_line

    exit_on_bad_command_line("evaluate")
    main()
