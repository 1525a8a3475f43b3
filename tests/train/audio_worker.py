"""One rank of stage 4 (``stage=audio``) through the real trainer (train/trainer.py: DeepSpeed ZeRO, checkpoints,
EMA, export) on made-up talking clips (train/synthetic.py; the shards of the test dataset have no audio), launched
by tests/train/test_audio_stage.py under torchrun (CPU, gloo):

    python -m torch.distributed.run --nproc_per_node 2 tests/train/audio_worker.py OUT:STEPS[,STEPS...] ... \
        [override ...]

For each run ``OUT:STEPS``, and each comma-separated step count in turn, a fresh Trainer (``stage.steps`` = that
count, ``train.resume=auto``) fits into ``OUT``: ``OUT:4,6`` stops after step 4 and a second Trainer resumes it to
step 6, as a restarted job would. One process start serves every run (DeepSpeed starts in seconds then).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from models.command_line import compose
    from train import distributed
    from train.config import to_job
    from train.synthetic import TalkingLoader
    from train.trainer import Trainer

    runs = [a.rsplit(":", 1) for a in sys.argv[1:] if "=" not in a]
    overrides = [a for a in sys.argv[1:] if "=" in a]
    dist = None
    for out, targets in runs:
        for steps in targets.split(","):
            job = to_job(compose("train", [f"train.out_dir={out}", "stage=audio", f"stage.steps={steps}", *overrides]))
            if dist is None:
                dist = distributed.setup(job.launch, job.train.seed)
            # each rank its own clips; the last row of every batch without audio (masked out of the loss)
            loader = TalkingLoader(job.model.face_encoder.crop_size, seed=1000 * dist.rank, batch=3, frames=9,
                                   fps=(25.0, 30.0), face_dropout=0.1, no_audio_rows=1)
            Trainer(job, dist, loader=loader).fit()
    distributed.shutdown()


if __name__ == "__main__":
    main()
