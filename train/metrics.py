"""Training metrics: loss, lr, grad norm, samples/s, tokens/s, achieved TFLOP/s and MFU (model FLOPs from
``models.flops`` over the device's dense bf16 peak, nanoGPT-style), data-wait fraction, skipped samples;
to stdout, TensorBoard and ``metrics.jsonl`` (rank 0), with a tqdm progress bar showing the ETA.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def device_peak_tflops(setting, device: torch.device) -> float | None:
    """The peak to divide by for MFU: a number, ``auto`` (by CUDA device name) or None."""
    if setting in (None, "null"):
        return None
    if setting != "auto":
        return float(setting)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    log.warning("no dense bf16 peak known for %r: set launch.peak_tflops to log MFU", name)
    return None


class StepStats:
    """Per-step numbers of one rank, summed over ranks with one all-reduce."""

    FIELDS = ("loss_sum", "micro_steps", "samples", "tokens", "flops", "data_s", "step_s", "stop", "over_time",
              "elapsed_s", "forward_s", "backward_s", "optimizer_s", "ema_s")

    def __init__(self):
        self.values = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, **kw) -> None:
        for k, v in kw.items():
            self.values[k] += float(v)

    def all_reduce(self, device: torch.device) -> dict[str, float]:
        """Sums over ranks (``stop`` / ``over_time`` > 0 when any rank was asked to stop / ran out of time)."""
        t = torch.tensor([self.values[k] for k in self.FIELDS], dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return dict(zip(self.FIELDS, t.tolist()))


class LogWindow(StepStats):
    """The steps since the last metric record: their stats (each already summed over ranks) added up, the slowest
    step's wall time (mean over ranks) and the sample keys of this rank. A record with ``train.log.every=N``
    describes all N steps, so a slow step between two records shows in ``step_s_max`` instead of being missed or
    taken for the steady rate."""

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.max_step_s = 0.0
        self.keys: list = []

    def add_step(self, stats: dict[str, float], keys: list, world_size: int) -> None:
        self.add(**stats)
        self.steps += 1
        self.max_step_s = max(self.max_step_s, stats["step_s"] / world_size)
        self.keys += keys


class MetricLogger:
    """Writes metric records (rank 0 only; other ranks get a no-op)."""

    def __init__(self, stage_dir: Path, enabled: bool, tensorboard: bool, progress_bar: bool, total_steps: int,
                 start_step: int, time_limit_s: float | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.time_limit_s = time_limit_s
        self.start_step = start_step
        self.t_start = time.perf_counter()
        self.tb = self.bar = self.jsonl = None
        if not enabled:
            return
        stage_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(stage_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run, closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage_dir.name[-1]}", unit="step",
                            dynamic_ncols=True, mininterval=2.0, disable=None)  # None: only on a terminal

    def eta_seconds(self, step: int) -> float:
        """Seconds to the stage's end at the average rate since this process started, or to the time limit
        (``train.time_limit_min``) when that comes first."""
        done = step - self.start_step
        if done <= 0:
            return math.nan
        elapsed = time.perf_counter() - self.t_start
        eta = elapsed / done * (self.total - step)
        if self.time_limit_s:
            eta = min(eta, max(self.time_limit_s - elapsed, 0.0))
        return eta

    def log(self, step: int, record: dict, to_stdout: bool) -> None:
        """One record: jsonl always, TensorBoard scalars, a stdout line when ``to_stdout``."""
        if not self.enabled:
            return
        record = dict(record, step=step, eta_s=round(self.eta_seconds(step), 1), time=round(time.time(), 3))
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.bar is not None and not self.bar.disable:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if not to_stdout:
            return
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time") and math.isfinite(v):
                    self.tb.add_scalar(_tb_name(k), v, step)
            self.tb.flush()
        keys = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops", "mfu", "data_wait", "step_s")
        parts = [f"{k} {record[k]:.4g}" for k in keys if isinstance(record.get(k), float) and math.isfinite(record[k])]
        if record.get("steps", 1) > 1:
            parts.append(f"(mean of {record['steps']} steps, slowest {record['step_s_max']:.4g} s)")
        skips = record.get("skipped", {})
        if skips:
            parts.append("skipped " + ",".join(f"{k}={v}" for k, v in sorted(skips.items())))
        line = f"step {step}/{self.total} " + " ".join(parts) + f" eta {_hms(record['eta_s'])}"
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            log.info(line)

    def scalars(self, step: int, record: dict, name: str = "eval") -> None:
        """A side record (``<name>.jsonl`` next to metrics.jsonl, TensorBoard scalars under ``<name>/``)."""
        if not self.enabled:
            return
        path = Path(self.jsonl.name).with_name(f"{name}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(dict(record, step=step, time=round(time.time(), 3))) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{name}/{k}", v, step)
            self.tb.flush()

    def image(self, tag: str, image_hwc, step: int) -> None:
        """A uint8 (H, W, 3) image in TensorBoard."""
        if self.tb is not None:
            self.tb.add_image(tag, image_hwc, step, dataformats="HWC")
            self.tb.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _tb_name(key: str) -> str:
    if key.startswith("skipped/"):
        return "data/" + key
    return {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}.get(key, "perf/" + key)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
