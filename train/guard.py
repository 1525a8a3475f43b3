"""The update guard: no optimizer step is skipped or corrupted silently.

DeepSpeed skips an update whose gradients hold inf/NaN (its bf16/fp32 overflow check) and says nothing; on
the GPU a configuration once skipped every update from step 2 while the losses looked normal
(docs/performance.md). Around every optimizer step the guard

1. takes the global gradient L2 norm from ZeRO's gradient partitions before the step (one fused
   ``_foreach_norm`` over the partition tensors and one all-reduce: cheap), so a non-finite step is known
   before DeepSpeed decides;
2. on a non-finite norm, names the parameter groups (``models.dreamactor.PARAM_GROUPS``) whose gradients are
   non-finite (a per-parameter gather: slow, but only on bad steps);
3. after the step, checks ``engine.was_step_applied()``: a non-finite step that DeepSpeed applied anyway is
   an error (the weights are corrupted), a finite step that it skipped is counted and logged as skipped;
4. with ``owns_overflow_check`` (ZeRO-1/2, ``train.guard.owns_overflow_check``), replaces DeepSpeed's own
   overflow check: that check runs an inf/NaN test per gradient tensor and a host sync on every step (on one
   H200 it cost ~0.3 s of a 1.3B step); the guard already knows from its one global norm whether the step is
   finite, so it turns DeepSpeed's check on only for a non-finite step, which DeepSpeed then skips as before;
5. with ``clip`` (``train.guard.owns_clipping``, ZeRO-2 without offload) clips the gradient partitions to that
   global norm in place (one fused multiply) before DeepSpeed's step, whose own clipping norm (one norm and one
   fp32 copy per gradient tensor) is then turned off: the same rule as DeepSpeed's
   (``g *= clip / (norm + 1e-6)`` where that is below 1), one norm instead of two;
6. counts non-finite / skipped steps (total and consecutive) for the logs, TensorBoard and metrics.jsonl,
   and stops the run with :class:`NonFiniteGradients` after ``train.guard.max_consecutive_nonfinite`` in a
   row; the trainer saves no checkpoint from a bad step, so the last good one stays ``latest``.

``train.guard.poison_steps`` injects NaN gradients into one parameter group at chosen steps (fault drills
and the tests of this module).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from models.dreamactor import param_group_of

log = logging.getLogger(__name__)


class NonFiniteGradients(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients: training stopped."""


@dataclass
class StepHealth:
    """What the guard saw of one optimizer step."""

    step: int
    grad_norm: float  # global L2 norm of the gradients before clipping (nan if unknown)
    finite: bool
    bad_groups: list[str] = field(default_factory=list)
    applied: bool = True


def _partition_tensors(engine) -> list[torch.Tensor] | None:
    """The gradient tensors this rank holds after the backward of a boundary micro-step (ZeRO-1/2/3
    ``averaged_gradients``), or None where the optimizer keeps them elsewhere (CPU offload)."""
    groups = getattr(engine.optimizer, "averaged_gradients", None)
    if not groups:
        return None
    out = []
    for grads in groups.values():
        if grads is None:
            return None
        flat = getattr(grads, "flat_partition", None)
        if flat is not None:
            out.append(flat)
        else:
            out.extend(g for g in grads if g is not None and g.numel())
    return out or None


def _fp32_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's L2 norm, accumulated and returned in fp32 (fused multi-tensor kernels)."""
    try:
        return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    except TypeError:  # PyTorch without the dtype argument
        return [n.float() for n in torch._foreach_norm(tensors, 2.0)]


class UpdateGuard:
    """See the module docstring. ``named_trainable``: (name, parameter) of the stage's trainable set."""

    def __init__(self, engine, named_trainable: list[tuple[str, torch.nn.Parameter]], max_consecutive: int,
                 poison_steps=(), poison_group: str = "pose_encoder", world_size: int = 1,
                 owns_overflow_check: bool = False, clip: float = 0.0):
        self.engine = engine
        self.clip = clip
        # ZeRO-1/2 read ``check_grad_overflow`` on every step; ZeRO-3 and CPU offload keep their own check
        self.owns_overflow_check = (owns_overflow_check and hasattr(engine.optimizer, "check_grad_overflow")
                                    and not getattr(engine.optimizer, "cpu_offload", False))
        self.named = named_trainable
        self.max_consecutive = max_consecutive
        self.poison_steps = set(int(s) for s in poison_steps)
        self.poison_group = poison_group
        self.world_size = world_size
        self.nonfinite_steps = 0
        self.skipped_steps = 0
        self.consecutive = 0

    def poison(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Fault injection: at a poisoned step the gradients of ``poison_group`` become NaN."""
        if step not in self.poison_steps:
            return loss
        params = [p for n, p in self.named if param_group_of(n) == self.poison_group]
        if not params:
            raise ValueError(f"train.guard.poison_group={self.poison_group!r} has no trainable parameter in this stage")
        return loss + sum(p.sum() for p in params) * float("nan")

    @torch.no_grad()
    def grad_norm(self, tensors: list[torch.Tensor] | None) -> float | None:
        """The global gradient norm of ZeRO's partitions ``tensors`` (collective); None where they are not
        reachable (the same on every rank: it depends on the optimizer's configuration only)."""
        if tensors is None:
            return None
        sq = torch.stack(_fp32_norms(tensors)).square().sum().reshape(1)
        if self.world_size > 1:
            torch.distributed.all_reduce(sq)
        return float(sq.sqrt().item())

    @torch.no_grad()
    def bad_groups(self) -> list[str]:
        """The parameter groups with a non-finite gradient (gathers each parameter's full gradient)."""
        from deepspeed.utils import safe_get_full_grad

        bad = set()
        for name, p in self.named:
            try:
                g = safe_get_full_grad(p)
            except Exception:  # noqa: BLE001 - an optimizer layout that cannot say: report what is known
                g = None
            if g is not None and not torch.isfinite(g).all():
                bad.add(param_group_of(name))
        return sorted(bad)

    def before_step(self, step: int) -> StepHealth:
        """Call after the backward of the last micro-step, before ``engine.step()``."""
        partitions = _partition_tensors(self.engine)
        norm = self.grad_norm(partitions)
        finite = norm is None or math.isfinite(norm)
        health = StepHealth(step, math.nan if norm is None else norm, finite)
        if not finite:
            health.bad_groups = self.bad_groups() or ["unknown"]
        if self.owns_overflow_check:  # DeepSpeed checks (and skips) exactly the steps the guard cannot clear
            self.engine.optimizer.check_grad_overflow = norm is None or not finite
        if self.clip > 0:
            if norm is None:
                raise RuntimeError("train.guard.owns_clipping: the gradient partitions are not reachable in this "
                                   "optimizer layout, so nothing would clip; set train.guard.owns_clipping=false")
            factor = self.clip / (norm + 1e-6)
            if finite and factor < 1.0:
                torch._foreach_mul_(partitions, factor)
        return health

    def after_step(self, health: StepHealth) -> StepHealth:
        """Call after ``engine.step()``: checks that the step did what its gradients allow; counts and logs."""
        health.applied = bool(self.engine.was_step_applied())
        if not health.finite and health.applied:
            raise NonFiniteGradients(
                f"step {health.step}: gradients of {', '.join(health.bad_groups)} are non-finite (norm "
                f"{health.grad_norm}) but the optimizer applied the update: the weights are corrupted. Resume from "
                "the last checkpoint (train.resume=auto) and lower train.optimizer.lr or check the data.")
        if not health.finite:
            self.nonfinite_steps += 1
            self.consecutive += 1
            log.warning("step %d: non-finite gradients in %s (grad norm %s): update skipped (%d in a row, %d in all)",
                        health.step, ", ".join(health.bad_groups), health.grad_norm, self.consecutive,
                        self.nonfinite_steps)
        elif not health.applied:
            self.skipped_steps += 1
            self.consecutive += 1
            log.warning("step %d: the optimizer skipped the update although the gradient norm %.4g is finite "
                        "(%d in a row)", health.step, health.grad_norm, self.consecutive)
        else:
            self.consecutive = 0
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteGradients(
                f"{self.consecutive} optimizer steps in a row up to step {health.step} applied no update "
                f"(non-finite gradients in {', '.join(health.bad_groups) or 'none'}; grad norm {health.grad_norm}): "
                f"stopping. The last complete checkpoint stays 'latest'; lower train.optimizer.lr, check the data, or "
                f"raise train.guard.max_consecutive_nonfinite ({self.max_consecutive}).")
        return health

    def counters(self) -> dict[str, int]:
        """Totals for the metric log."""
        return {"nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps,
                "consecutive_bad_steps": self.consecutive}

    def state_dict(self) -> dict[str, int]:
        """The counters (saved with the trainer's state so that totals survive a resume)."""
        return {"nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
