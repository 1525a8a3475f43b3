"""Fixtures of the trainer tests: a small dataset written by the project's own preprocessing command, and
helpers that launch ``train/run.py`` under torchrun (2 CPU processes, gloo) exactly as a user does.

DeepSpeed JIT-builds a communication op at its first start (60-100 s); ``TORCH_EXTENSIONS_DIR`` points at
one cache for the whole session (``~/.cache/dreamactor/torch_extensions``, the launch/local default, unless
the environment sets it), so it is built at most once per machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The local default at test sizes: 64 x 64 frames, 5-9 frame clips, up to 2 references.
DATA = ["data.buckets.area=4096", "data.frames.min=5", "data.frames.max=9", "data.frames.step=4", "data.refs.max=2",
        "data.buckets.token_budget=400"]
QUIET = ["train.log.progress_bar=false", "train.sample.every=0"]
REF_STEPS = 10  # steps of the uninterrupted reference runs
CKPT = ["train.checkpoint.every=3", "train.checkpoint.keep=3"]
EVAL = ["train.eval.every=4", "train.eval.clips=2", "train.eval.steps=2"]


def free_port() -> int:
    """A TCP port nobody listens on (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    """The environment of a launched run: one DeepSpeed op cache for the session, no inherited rank vars."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT")}
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dreamactor" / "torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def torchrun_cmd(nproc: int, overrides: list[str], port: int | None = None) -> list[str]:
    """``torchrun --nproc_per_node N train/run.py ...``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={port or free_port()}", str(ROOT / "train" / "run.py"), *overrides]


def start(out_dir: Path, overrides: list[str], nproc: int = 2, log_name: str = "run.log") -> subprocess.Popen:
    """Start a training run in its own process group (so it can be killed whole)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = open(out_dir / log_name, "ab")
    return subprocess.Popen(torchrun_cmd(nproc, [f"train.out_dir={out_dir}", *overrides]), cwd=ROOT, env=env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_job(p: subprocess.Popen) -> None:
    """``kill -9`` the whole job at once, as a node failure would: the launcher, every rank (torchrun puts
    each in its own session) and every data-loader worker."""
    import psutil

    try:
        procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    p.wait()


def run_to_exit(out_dir: Path, overrides: list[str], nproc: int = 2, timeout: float = 600,
                log_name: str = "run.log") -> tuple[int, str]:
    """Run training until it exits (killed after ``timeout``); returns its exit code and its log."""
    p = start(out_dir, overrides, nproc, log_name)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            kill_job(p)
    return rc, (out_dir / log_name).read_text(errors="replace")


def run(out_dir: Path, overrides: list[str], nproc: int = 2, timeout: float = 600, log_name: str = "run.log") -> str:
    """Run training to its end; returns its log, fails the test on a non-zero exit."""
    rc, text = run_to_exit(out_dir, overrides, nproc, timeout, log_name)
    assert rc == 0, f"training exited with {rc}:\n{text[-6000:]}"
    return text


def metrics(out_dir: Path, stage: int = 1) -> dict[int, dict]:
    """{step: record} of a run's metrics.jsonl (the last record of a step wins: a resumed run rewrites it)."""
    out = {}
    path = out_dir / f"stage{stage}" / "metrics.jsonl"
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["step"]] = r
    return out


def wait_for_step(p: subprocess.Popen, out_dir: Path, step: int, timeout: float = 300) -> None:
    """Block until the run has logged ``step`` (or fail if it exits first)."""
    path = out_dir / "stage1" / "metrics.jsonl"
    try:  # react fast even on a loaded machine: the kill must land mid-run
        os.setpriority(os.PRIO_PROCESS, 0, -5)
    except OSError:
        pass
    t0 = time.time()
    while time.time() - t0 < timeout:
        if p.poll() is not None:
            raise AssertionError(f"run exited with {p.returncode} before step {step}:\n"
                                 f"{(out_dir / 'run.log').read_text(errors='replace')[-4000:]}")
        if path.is_file() and any(json.loads(line)["step"] >= step
                                  for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def same_training(a: dict[int, dict], b: dict[int, dict], steps) -> list[str]:
    """Steps whose loss, grad norm, lr or samples differ (bitwise) between two runs."""
    bad = []
    for s in steps:
        ka = {k: a[s][k] for k in ("loss", "grad_norm", "lr", "sample_keys")}
        kb = {k: b[s][k] for k in ("loss", "grad_norm", "lr", "sample_keys")}
        if ka != kb:
            bad.append(f"step {s}: {ka} != {kb}")
    return bad


@pytest.fixture(scope="session")
def base_overrides(train_dataset) -> list[str]:
    """The local default (tiny model, 2 CPU processes, ZeRO-2) on the test dataset at test sizes."""
    return [f"data.source.dataset={train_dataset}", *DATA, *QUIET, *CKPT]


def _reference(tmp_path_factory, base_overrides, zero: str) -> Path:
    out = tmp_path_factory.mktemp(f"ref_{zero}")
    # the sample video (ZeRO-2) and the periodic evaluation (ZeRO-3: every rank takes part) must not perturb
    # training: the resume tests compare runs without them against these references bitwise
    extra = ["train.sample.every=5"] if zero == "zero2" else EVAL
    run(out, [*base_overrides, f"zero={zero}", f"stage.steps={REF_STEPS}", *extra])
    return out


@pytest.fixture(scope="session")
def reference_zero2(tmp_path_factory, base_overrides) -> Path:
    """An uninterrupted 2-rank ZeRO-2 stage-1 run of REF_STEPS steps (checkpoints every 3 steps)."""
    return _reference(tmp_path_factory, base_overrides, "zero2")


@pytest.fixture(scope="session")
def reference_zero3(tmp_path_factory, base_overrides) -> Path:
    """The same under ZeRO-3."""
    return _reference(tmp_path_factory, base_overrides, "zero3")


def copy_run(src: Path, dst: Path, keep_steps_upto: int) -> Path:
    """A copy of a run whose checkpoints stop at ``keep_steps_upto`` (as if it had been stopped there)."""
    shutil.copytree(src, dst)
    ckdir = dst / "stage1" / "checkpoints"
    for d in ckdir.glob("step_*"):
        if int(d.name.split("_")[1]) > keep_steps_upto:
            shutil.rmtree(d)
    shutil.rmtree(dst / "stage1" / "export", ignore_errors=True)
    return dst


def assert_epochs_continue(before: list[tuple], after: list[tuple], change: str) -> None:
    """(epoch, key) samples delivered before and after a resume that changed how ranks read (``change``): none twice,
    and every epoch started before the change is finished after it."""
    seen = before + after
    assert len(seen) == len(set(seen)), f"a sample was delivered twice across the {change}"
    clips = {k for _, k in seen}
    partly = {e for e, _ in before}
    partly = {e for e in partly if {k for ee, k in before if ee == e} != clips}
    for e in partly:
        assert {k for ee, k in seen if ee == e} == clips, f"epoch {e} left incomplete after the resume"
