"""torchrun --nproc_per_node 2 train/run.py [group=option ...] [key=value ...]: one stage of DreamActor-M1
training with DeepSpeed ZeRO (conf/train.yaml; docs/training.md).

With no argument: the tiny model on the shards of the no-argument preprocessing run, on this machine's CPUs.
Any launcher that exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT works (torchrun, the
``deepspeed`` launcher, srun + torchrun, a Kubernetes job). Exit codes: 0 done (or checkpointed after
SIGTERM), 2 configuration error, 3 the checkpoint to resume cannot be used (the message names the file and
what to do), 4 non-finite gradients.
"""
from __future__ import annotations

import logging
import os
import sys

if __package__ in (None, ""):  # `python train/run.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.distributed import strip_local_rank_arg  # noqa: E402

sys.argv[1:] = strip_local_rank_arg(sys.argv[1:])  # the deepspeed launcher's --local_rank=N is not a Hydra override

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger("train")


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from models.command_line import finish
    from models.redact import install_log_redaction
    from train import distributed
    from train.config import TrainConfigError, to_job
    from train.data import DataConfigError

    install_log_redaction()  # no credential of the config or a URL reaches a log line
    try:
        job = to_job(dcfg)
    except (TrainConfigError, DataConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        dist = distributed.setup(job.launch, job.train.seed, job.train.sequence_parallel)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.shutdown()
        sys.exit(2)
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        from train.checkpoint import CheckpointError
        from train.guard import NonFiniteGradients
        from train.manifest import KeyFileError
        from train.trainer import Trainer

        try:
            code = Trainer(job, dist).fit()
        except (CheckpointError, KeyFileError) as e:
            log.error("rank %d: %s", dist.rank, e)
            code = 3
        except NonFiniteGradients as e:
            log.error("rank %d: %s", dist.rank, e)
            code = 4
    finally:
        distributed.shutdown()
    finish(code)


if __name__ == "__main__":
    from models.command_line import exit_on_bad_command_line
    from train.config import to_job

    exit_on_bad_command_line("train", to_job)
    main()
