"""Training data loader (issue 5): WebDataset shards written by ``preprocess/`` -> bucketed
:class:`DreamActorBatch` micro-batches, with an exact, resumable cursor. See docs/data-loader.md.

Public API::

    from train.data import DataConfig, DreamActorBatch, build_loader, to_config

    loader = build_loader(to_config(cfg.data), model_cfg, rank=rank, world_size=world, seed=cfg.seed)
    loader.load_state_dict(ckpt["data"])        # optional: resume (any rank / worker count)
    it = iter(loader)
    for step in ...:
        batch = next(it).to(device)             # one DreamActorBatch per step and rank, forever
        ...
        ckpt["data"] = loader.state_dict()      # collective when torch.distributed is initialised
        log(loader.skip_counts())               # {"samples/<reason>": n, "shards/<reason>": n}

Semantics: ``state_dict()`` after step N describes exactly the batches delivered so far on every rank.
Same world size and worker count: the batches from step N on are those an uninterrupted run yields.
Different world size or worker count: the epoch continues with no sample delivered twice and none left out.
"""
from .batch import DreamActorBatch
from .config import DataConfig, DataConfigError, to_config
from .loader import DreamActorLoader, build_loader

__all__ = ["DataConfig", "DataConfigError", "DreamActorBatch", "DreamActorLoader", "build_loader", "to_config"]
