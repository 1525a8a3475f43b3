"""The training loop of one stage: DeepSpeed engine + loader + EMA + checkpoints + logs. The step is flow matching
(train/step.py) in stages 1-3 and the audio encoder's token regression in stage 4 (train/audio_step.py: no DiT, no
VAE, no sample videos; its own evaluation).

Step ``s`` (1-based, optimizer steps) consumes ``train.grad_accum`` loader batches per rank. After a resume
from the checkpoint of step ``s`` the loop continues at ``s + 1`` with the restored module, optimizer,
scheduler, EMA, data cursor and RNG states, so (same world size, deterministic kernels) every later loss
is bitwise the one an uninterrupted run computes.

Sequence parallelism (``train.sequence_parallel`` = N, :mod:`models.sequence_parallel`): the N ranks of a group
get the same batches (the loader runs on data-parallel rank ``rank // N`` of ``world / N``) and the same noise,
and the DiT splits each clip's video tokens over them. DeepSpeed sees a plain data-parallel job of ``world``
ranks: the SP collectives' adjoints make its average over all ranks the mean over the groups, so checkpoints are
those of a ``world``-rank job (an SP run resumes with SP or without it on as many ranks; the data cursor, kept per
data-parallel rank, continues the epoch on the new number of data-parallel ranks).
"""
from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from models.dreamactor import AUDIO_STAGE

from . import checkpoint as ckpt
from .audio_step import AudioEval, AudioTokenStep
from .config import TrainJob
from .distributed import Dist, RNGStates, all_gather, barrier
from .ema import ShardedEMA
from .engine import StageProgress, guard_clips, initialize, set_activation_budget
from .guard import StepHealth, UpdateGuard
from .manifest import load_key
from .metrics import LogWindow, MetricLogger, StepStats, device_peak_tflops
from .stages import build_model, describe, frozen_signature, trainable_names
from .step import FlowMatchingStep, build_vae, counter_seed

log = logging.getLogger(__name__)


class Trainer:
    """Builds everything for one stage and runs it to ``stage.steps`` (or to a SIGTERM).

    ``model``: the stage's model with its trainable set chosen, ``loader``: the rank's batches (an iterable with
    ``state_dict`` / ``load_state_dict`` / ``skip_counts``); both built from the job unless given
    (bench/train_step.py gives a random model on the GPU and synthetic batches)."""

    def __init__(self, job: TrainJob, dist: Dist, model: torch.nn.Module | None = None, loader=None):
        self.job, self.dist = job, dist
        self.stop_requested = False
        self.sync_phases = False  # synchronize the device between the phases of a step (exact phase times)
        self.t_start = time.perf_counter()
        self.kept_batch = None
        c = job.train.checkpoint
        # rank 0 signs and checks COMPLETE: only its node needs the key (made by the first run if missing)
        key, key_from = load_key(c.key_file, create=True) if dist.is_main else (None, "")
        self.checkpointer = ckpt.Checkpointer(
            job.stage_dir / "checkpoints", dist, c.keep, config=job.resolved,
            meta={"stage": job.stage.id, "model": job.model.name, "zero_stage": job.zero.stage,
                  "ema_decay": job.train.ema.decay, "precision": job.launch.precision,
                  "sequence_parallel": dist.sp_size},
            key=key, key_from=key_from, verify=c.verify, trust_unsigned=c.trust_unsigned)
        resume_dir = self.checkpointer.find(job.train.resume)
        universal = self.checkpointer.prepare(resume_dir)

        model = model if model is not None else build_model(job)
        if dist.is_main:
            log.info(describe(model, job.stage.id))
        self.frozen_signature = frozen_signature(model)
        self.trainable = trainable_names(model)
        model.dit.set_sequence_parallel(dist.sp)
        if job.train.compile_blocks:
            model.compile_blocks()
        if job.train.compile_encoders:
            model.compile_encoders()
        self.progress = StageProgress()  # the time-limited stage's fraction done, for the lr cool-down
        self.engine = initialize(model, job, load_universal=universal, progress=self.progress)
        # stage 4 (audio) runs no DiT: no VAE, no sample videos; its step and evaluation are train/audio_step.py's
        self.audio = job.stage.id == AUDIO_STAGE
        self.sample_every = 0 if self.audio else job.train.sample.every
        # the VAE encodes pixel batches and decodes the sample videos: precomputed latents without samples need none
        self.vae = build_vae(job, dist.device) if not self.audio and (
            not job.data.latents or job.train.sample.every or job.train.eval.every) else None
        self.step_fn = (AudioTokenStep(job, dist.device) if self.audio else
                        FlowMatchingStep(job, self.vae, dist.device, dist.dp_rank, dist.sp_size))
        self.loader = loader if loader is not None else self._build_loader()
        named = dict(self.engine.module.named_parameters())
        self.ema = ShardedEMA([(n, named[n]) for n in self.trainable], job.train.ema.decay, dist.rank)
        g = job.train.guard
        self.guard = UpdateGuard(self.engine, [(n, named[n]) for n in self.trainable], g.max_consecutive_nonfinite,
                                 g.poison_steps, g.poison_group, dist.world_size, g.owns_overflow_check,
                                 clip=job.train.optimizer.grad_clip if guard_clips(job) else 0.0)
        self.checkpointer.track(self.engine, per_rank={ckpt.RNG: RNGStates(), ckpt.GUARD: self.guard},
                                sharded={ckpt.EMA: self.ema}, shared={ckpt.DATA: self.loader},
                                meta={"frozen_signature": self.frozen_signature, "trainable": len(self.trainable)})
        self.step = self.checkpointer.load(resume_dir) if resume_dir is not None else int(self.engine.global_steps)
        self.activation_budget = set_activation_budget(self.engine, job, dist)
        if self.activation_budget is not None and dist.is_main:
            log.info("activation checkpointing: auto, %.1f GiB for activations (the fewest checkpointed blocks that "
                     "fit, per batch)", self.activation_budget / 2**30)
        self.peak_tflops = device_peak_tflops(job.launch.peak_tflops, dist.device)
        self.periodic_eval = None
        if job.train.eval.every and self.audio:
            self.periodic_eval = AudioEval(job, dist, self.step_fn.dtype)
        elif job.train.eval.every:
            from .periodic_eval import PeriodicEval

            self.periodic_eval = PeriodicEval(job, dist, self.vae, self.step_fn.dtype)

    # ------------------------------------------------------------------ setup

    def _build_loader(self):
        from train.data import build_loader

        # the ranks of a sequence-parallel group share their data-parallel rank's batches
        return build_loader(self.job.data, self.job.model, rank=self.dist.dp_rank,
                            world_size=self.dist.dp_world_size, seed=self.job.train.seed)

    # ------------------------------------------------------------------ loop

    def _on_sigterm(self, signum, frame) -> None:
        """Preemption: finish the step, checkpoint, exit. torchrun, Slurm and Kubernetes signal the whole
        process group, so the data-loader workers die too: stop torch's SIGCHLD hook from turning their
        death into an exception in the middle of this step (its batch is already here, and the cursor
        needs no worker)."""
        self.stop_requested = True
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log.warning("rank %d: signal %d: checkpoint at the end of this step, then exit", self.dist.rank, signum)

    def fit(self) -> int:
        """Train to the stage's end; returns the exit code (0, also after a SIGTERM checkpoint)."""
        job, dist = self.job, self.dist
        total = job.stage.steps
        signal.signal(signal.SIGTERM, self._on_sigterm)
        limit = job.train.time_limit_min
        logger = MetricLogger(job.stage_dir, dist.is_main, job.train.log.tensorboard, job.train.log.progress_bar,
                              total, self.step, time_limit_s=60 * limit if limit else None)
        if job.train.optimizer.cooldown and limit and self.step and dist.is_main:
            log.warning("train.optimizer.cooldown with train.time_limit_min on a resumed stage (step %d): the "
                        "cool-down follows this launch's time, so the learning rate starts at its full value again; "
                        "for a stage over several launches, leave time_limit_min unset and let it follow stage.steps",
                        self.step)
        it = iter(self.loader)
        window = LogWindow()
        self.t_start = time.perf_counter()
        self.kept_batch = None
        self.engine.train()
        try:
            while self.step < total:
                step = self.step + 1
                stats, keys, health = self.train_step(it, step)
                total_stats = stats.all_reduce(dist.device)
                window.add_step(total_stats, keys, dist.world_size)
                if job.train.time_limit_min:  # the same on every rank: the mean time since launch
                    self.progress.time_fraction = (total_stats["elapsed_s"] / dist.world_size
                                                   / (60 * job.train.time_limit_min))
                if step % job.train.log.every == 0 or step == total or total_stats["stop"] or not health.applied:
                    self._log(logger, step, window, health)
                    window = LogWindow()
                if self.sample_every and step % self.sample_every == 0:
                    self._sample(logger, self.kept_batch, step)
                if self.periodic_eval is not None and step % job.train.eval.every == 0:
                    self.periodic_eval.run(self.engine.module, logger, step)
                    self.engine.train()
                good = self.guard.consecutive == 0  # no checkpoint of a step that applied no update
                if total_stats["stop"]:
                    if good:
                        self.save()
                    log.warning("rank %d: stopped by a signal after step %d (%s)", dist.rank, step,
                                "checkpoint saved" if good else "no checkpoint: the step applied no update")
                    return 0
                if good and (step % job.train.checkpoint.every == 0 or step == total):
                    self.save()
                if total_stats["over_time"] and step < total:  # summed over ranks: every rank stops here
                    log.warning("train.time_limit_min=%s reached at step %d of %d: checkpoint and export; "
                                "train.resume=auto continues the stage", job.train.time_limit_min, step, total)
                    if good and step % job.train.checkpoint.every:
                        self.save()
                    break
            if job.train.checkpoint.export and dist.is_main:
                from .export import export

                # the newest complete checkpoint: the last step may have applied no update and saved none; written
                # or verified by this run, so its sizes are checked again, not its checksums
                export(self.checkpointer.newest(), job.stage_dir / "export", key=self.checkpointer.key,
                       key_from=self.checkpointer.key_from, verify="size",
                       trust_unsigned=job.train.checkpoint.trust_unsigned)
            barrier()
            return 0
        finally:
            logger.close()

    def train_step(self, it, step: int) -> tuple[StepStats, list, StepHealth]:
        """One optimizer step: ``train.grad_accum`` micro-batches through forward, backward and the guarded
        DeepSpeed step, then the EMA (only when the update was applied). The stats hold the seconds of each
        phase (``forward_s``, ``backward_s``, ``optimizer_s``, ``ema_s``: exact with :attr:`sync_phases`)."""
        job = self.job
        stats = StepStats()
        keys = []
        health = None
        self._sync_phase()
        t0 = time.perf_counter()
        for micro in range(job.train.grad_accum):
            td = time.perf_counter()
            batch = self._next_batch(it)
            t = time.perf_counter()
            stats.add(data_s=t - td)
            if self.kept_batch is None and self.sample_every:
                self.kept_batch = batch
            if job.train.log.sample_keys and self.dist.rank % self.dist.sp_size == 0:  # once per SP group
                keys += [[int(e), k] for e, k in zip(batch.epoch.tolist(), batch.keys)]
            out = self.step_fn(self.engine, batch, step, micro)
            t = self._phase_done(stats, "forward_s", t)
            self.engine.backward(self.guard.poison(out.loss, step))
            t = self._phase_done(stats, "backward_s", t)
            if micro == job.train.grad_accum - 1:
                with record_function("guard.before_step"):  # names for a profile of the optimizer phase
                    health = self.guard.before_step(step)
            with record_function("deepspeed.step"):
                self.engine.step()
            stats.add(loss_sum=out.loss.detach().float().item(), micro_steps=1, samples=out.samples,
                      tokens=out.tokens, flops=out.flops)
            if micro < job.train.grad_accum - 1:
                self._phase_done(stats, "optimizer_s", t)
        self.guard.after_step(health)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        t = self._phase_done(stats, "optimizer_s", t)
        if health.applied:
            with record_function("ema.update"):
                self.ema.update()
        self._phase_done(stats, "ema_s", t)
        self.step = step
        limit = job.train.time_limit_min
        now = time.perf_counter()
        stats.add(step_s=now - t0, stop=float(self.stop_requested), elapsed_s=now - self.t_start,
                  over_time=float(bool(limit) and now - self.t_start > 60 * limit))
        return stats, keys, health

    def _sync_phase(self) -> None:
        """Wait for the device's queued work when phases are timed exactly."""
        if self.sync_phases and self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)

    def _phase_done(self, stats: StepStats, name: str, t: float) -> float:
        """Add the seconds since ``t`` to phase ``name``; returns the time now."""
        self._sync_phase()
        now = time.perf_counter()
        stats.add(**{name: now - t})
        return now

    def _next_batch(self, it):
        """The next loader batch; after a preemption signal a dead worker cannot deliver it."""
        try:
            return next(it)
        except RuntimeError:
            if self.stop_requested:
                raise SystemExit(f"rank {self.dist.rank}: the data-loader workers were killed by the preemption "
                                 f"signal before step {self.step + 1}'s batch arrived: exiting without a checkpoint "
                                 f"(resume=auto continues from the last periodic one)") from None
            raise

    def _log(self, logger: MetricLogger, step: int, window: LogWindow, health: StepHealth) -> None:
        """One record (rank 0) of the steps since the last one: their mean loss, throughput, MFU and data wait, the
        slowest step, the skip counts; the gradient norm, learning rate and update of the last step."""
        world, s = self.dist.world_size, window.values
        wall = s["step_s"] / world  # the window's wall time (each step's mean over ranks)
        step_s = wall / window.steps
        record = {
            "loss": s["loss_sum"] / max(1.0, s["micro_steps"]),
            "lr": float(self.engine.get_lr()[0]),
            # the guard's norm (before clipping); DeepSpeed's where the guard cannot reach the partitions
            "grad_norm": (_float(self.engine.get_global_grad_norm()) if math.isnan(health.grad_norm)
                          else health.grad_norm),
            "update_applied": int(health.applied),
            **self.guard.counters(),
            "samples_per_s": s["samples"] / wall,
            "tokens_per_s": s["tokens"] / wall,
            "tflops": s["flops"] / wall / 1e12 / world,  # achieved per device
            "data_wait": s["data_s"] / s["step_s"] if s["step_s"] else math.nan,
            "step_s": step_s,
            "step_s_max": window.max_step_s,
            "steps": window.steps,
            "samples": int(s["samples"]),
        }
        record["mfu"] = record["tflops"] / self.peak_tflops if self.peak_tflops else math.nan
        merged: dict[str, int] = {}
        for part in all_gather(self.loader.skip_counts())[::self.dist.sp_size]:  # one loader per SP group
            for k, v in part.items():
                merged[k] = merged.get(k, 0) + int(v)
        record["skipped"] = merged
        record.update({f"skipped/{k}": float(v) for k, v in merged.items()})
        if window.keys or self.job.train.log.sample_keys:
            record["sample_keys"] = [k for part in all_gather(window.keys) for k in part]
        if self.dist.device.type == "cuda":
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        logger.log(step, record, to_stdout=True)

    def _sample(self, logger: MetricLogger, batch, step: int) -> None:
        """The periodic sample video (every rank runs the sampler; rank 0 writes it)."""
        from .preview import sample_video, write_sample

        t0 = time.perf_counter()
        frames = sample_video(self.engine, self.vae, batch.to(self.dist.device), self.job.train.sample.frames,
                              self.job.train.sample.steps, self.job.stage.use_face,
                              counter_seed(self.job.train.seed, 0x5A, step), self.step_fn.dtype)
        if self.dist.is_main:
            path = write_sample(self.job.stage_dir / "samples" / f"{ckpt.tag_of(step)}.mp4", frames,
                                float(batch.fps[0]))
            logger.image("sample/frames", frames[:: max(1, len(frames) // 4)].reshape(-1, *frames.shape[2:]), step)
            log.info("sample video %s (%.1f s)", path, time.perf_counter() - t0)

    # ------------------------------------------------------------------ checkpoint

    def save(self) -> Path:
        """Collective: a complete checkpoint of the current step (every tracked state)."""
        return self.checkpointer.save(self.step)


def _float(x) -> float:
    if x is None:
        return math.nan
    return float(x.item() if torch.is_tensor(x) else x)
