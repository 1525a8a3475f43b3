"""Consolidated safetensors for inference from a sharded checkpoint: ``model.safetensors`` (the fp32 master
weights + buffers, DeepSpeed's ``zero_to_fp32`` reassembly) and ``ema.safetensors`` (the same with every
trainable parameter replaced by its fp32 EMA), plus the run's ``config.yaml``.

    python -m train.export outputs/train/tiny/stage1/checkpoints/step_00000012 [--out DIR]

Both files load with ``DreamActor.load_state_dict(safetensors.torch.load_file(path))`` (strict).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import checkpoint as ckpt
from train.ema import consolidate

log = logging.getLogger(__name__)


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 model state (parameters and persistent buffers) of a DeepSpeed ZeRO-2/3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def export(tag_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write ``model.safetensors``, ``ema.safetensors`` and ``config.yaml`` of ``tag_dir`` into ``out_dir``
    (through a temporary directory renamed at the end, so a reader never sees half an export)."""
    from safetensors.torch import save_file

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    meta = ckpt.read_meta(tag_dir)
    if meta is None:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint")
    weights = consolidated_state_dict(tag_dir)
    ema = consolidate(ckpt.rank_entries(tag_dir, ckpt.EMA), {k: v.shape for k, v in weights.items()})
    ema_weights = dict(weights)
    ema_weights.update({k: v.contiguous() for k, v in ema.items()})
    info = {"checkpoint": str(tag_dir), "step": str(meta["step"]), "stage": str(meta["stage"]),
            "model": str(meta["model"]), "ema_decay": str(meta.get("ema_decay")),
            "ema_params": str(len(ema))}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata=info)
    save_file(ema_weights, str(tmp / "ema.safetensors"), metadata=dict(info, weights="ema"))
    shutil.copy2(tag_dir / "config.yaml", tmp / "config.yaml")
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("exported %s -> %s (%d tensors, %d with EMA)", tag_dir, out_dir, len(weights), len(ema))
    return {"model": out_dir / "model.safetensors", "ema": out_dir / "ema.safetensors"}


def main(argv: list[str] | None = None) -> None:
    """CLI: export one checkpoint directory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, help="a checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    ap.add_argument("--out", type=Path, default=None, help="default: <stage dir>/export")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.checkpoint.parent.parent / "export"
    paths = export(args.checkpoint, out)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
