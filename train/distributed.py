"""Process-group setup for every launcher: torchrun, the ``deepspeed`` launcher, Slurm (``srun torchrun``),
Kubernetes. All of them export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a bare
``python train/run.py`` is a world of one.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from models.sequence_parallel import SequenceParallel, new_groups

from .config import LaunchConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sp: SequenceParallel | None = None  # this rank's sequence-parallel group (train.sequence_parallel > 1)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the shared files (pointer, logs, exports)."""
        return self.rank == 0

    @property
    def sp_size(self) -> int:
        """Ranks per sequence-parallel group (1: none)."""
        return 1 if self.sp is None else self.sp.size

    @property
    def dp_rank(self) -> int:
        """The data-parallel rank: the loader's rank and the noise stream's (every rank of an SP group shares it)."""
        return self.rank // self.sp_size

    @property
    def dp_world_size(self) -> int:
        """The data-parallel ranks: world size / ranks per SP group."""
        return self.world_size // self.sp_size


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """Move the ``--local_rank=N`` (or ``--local_rank N``) the ``deepspeed`` launcher appends unless given
    ``--no_local_rank`` into ``$LOCAL_RANK``: Hydra would reject it as an override."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def setup(cfg: LaunchConfig, seed: int, sequence_parallel: int = 1) -> Dist:
    """Initialise torch.distributed through DeepSpeed (env rendezvous), pick the device, make kernels
    deterministic if asked, seed every global generator; with ``sequence_parallel`` N > 1, make the SP groups of N
    consecutive ranks (N must divide the world size: a ConfigError otherwise)."""
    if cfg.torch_extensions_dir:  # DeepSpeed JIT-builds a comm op at first start: build it once, keep it
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(cfg.torch_extensions_dir))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("launch.device=cuda but no CUDA device is visible (use launch=local on a CPU machine)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cfg.threads_per_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import deepspeed

    deepspeed.init_distributed(dist_backend=cfg.backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=cfg.timeout_min))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # The first collective creates the backend's communicator (NCCL: its device buffers). Made here, before the model
    # and its activations fill the GPU, not at the first barrier of a run: on a 1-rank H200 run that barrier came
    # only at the end with the caching allocator holding nearly all memory, and NCCL failed ("Failed to CUDA calloc
    # async 4 bytes").
    torch.distributed.barrier()
    seed_everything(seed)
    sp = None
    if sequence_parallel > 1:
        from .config import ConfigError

        if world % sequence_parallel:
            raise ConfigError(f"train.sequence_parallel={sequence_parallel} must divide the number of ranks ({world})")
        groups = new_groups(world, sequence_parallel)
        sp = SequenceParallel(sequence_parallel, rank % sequence_parallel, groups[rank // sequence_parallel])
    return Dist(rank, world, local_rank, device, sp)


def seed_everything(seed: int) -> None:
    """The same seed for python, numpy and torch on every rank (model init must agree across ranks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global generator of this process (restored on resume)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStates:
    """Every global generator of this process as a checkpoint state (restored on resume).

    Saved as tensors and plain numbers (numpy's key array as an int64 tensor), so that the rank file loads with
    ``torch.load(weights_only=True)``; :meth:`load_state_dict` also takes the native form that checkpoints
    written before held (numpy arrays, tuples)."""

    def state_dict(self) -> dict:
        state = rng_state()
        version, keys, gauss = state["python"]
        name, np_keys, pos, has_gauss, cached = state["numpy"]
        out = {"python": {"version": int(version), "state": torch.tensor(keys, dtype=torch.int64), "gauss": gauss},
               "numpy": {"name": str(name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                         "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
               "torch": state["torch"]}
        if "cuda" in state:
            out["cuda"] = list(state["cuda"])
        return out

    def load_state_dict(self, state: dict) -> None:
        py, nps = state["python"], state["numpy"]
        if isinstance(py, dict):  # the tensor form of state_dict
            py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])
            nps = (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                   nps["cached_gaussian"])
        set_rng_state(dict(state, python=py, numpy=nps))


def all_gather(obj) -> list:
    """``obj`` of every rank, in rank order (a list of one outside a multi-rank job)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def from_main(obj):
    """Rank 0's ``obj`` on every rank (a decision every rank must share)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """A barrier when torch.distributed is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Destroy the process group (some gloo runs abort at interpreter exit otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - exiting anyway; say why
            print(f"destroy_process_group: {e}", file=sys.stderr)
