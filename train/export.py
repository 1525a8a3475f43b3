"""Consolidated safetensors for inference from a sharded checkpoint: ``model.safetensors`` (the fp32 master
weights + buffers, DeepSpeed's ``zero_to_fp32`` reassembly) and ``ema.safetensors`` (the same with every
trainable parameter replaced by its fp32 EMA), plus the run's ``config.yaml`` (secrets redacted).

    python -m train.export outputs/train/tiny/stage1/checkpoints/step_00000012 [--out DIR]

The checkpoint is verified first (train/manifest.py: every file against ``COMPLETE``, whose signature must be
this machine's checkpoint key's): DeepSpeed's files are pickles, and ``zero_to_fp32`` unpickles them.
``--trust-unsigned`` exports a checkpoint the key did not sign (written before checkpoints were signed, or
elsewhere: only one you trust).

Both files load with ``DreamActor.load_state_dict(safetensors.torch.load_file(path))`` (strict).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.redact import redacted
from train import checkpoint as ckpt
from train import manifest
from train.ema import consolidate

log = logging.getLogger(__name__)


def consolidated_state_dict(tag_dir: Path) -> dict:
    """Full fp32 model state (parameters and persistent buffers) of a DeepSpeed ZeRO-2/3 checkpoint, lazily:
    each value has ``shape`` and ``dtype`` and is made a tensor by ``.contiguous()`` (ZeRO-3's trainable
    parameters are then concatenated from the memory-mapped partitions of every rank, one tensor at a time;
    frozen ones and ZeRO-2's are read whole by DeepSpeed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _fp32(value) -> torch.Tensor:
    """A lazy state value as a contiguous tensor, floating ones in fp32 (the export's precision)."""
    t = value.contiguous()
    return (t.float() if t.is_floating_point() else t).contiguous()


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Write a ``.safetensors`` file one tensor at a time: ``tensors`` maps names to lazy values (``shape``,
    ``dtype``, ``.contiguous()``), each materialised, written and dropped in turn, so the file may be larger
    than the memory of the host that writes it. Floating tensors are written in fp32; the layout is the one
    ``safetensors.torch.save_file`` reads (header, then the tensors back to back in name order)."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        v = tensors[name]
        dtype = torch.float32 if v.dtype.is_floating_point else v.dtype
        n = math.prod(v.shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(v.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in names:
            t = _fp32(tensors[name])
            if tuple(t.shape) != tuple(header[name]["shape"]):
                raise RuntimeError(f"{name}: the checkpoint gave shape {tuple(t.shape)}, not {header[name]['shape']}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def export(tag_dir: Path, out_dir: Path, *, key: bytes | None = None, key_from: str | None = None,
           verify: str = "sha256", trust_unsigned: bool = False) -> dict[str, Path]:
    """Write ``model.safetensors``, ``ema.safetensors`` and ``config.yaml`` of ``tag_dir`` into ``out_dir``
    (through a temporary directory renamed at the end, so a reader never sees half an export). The checkpoint
    must verify first (``verify``: size | sha256) under ``key`` (default: this machine's checkpoint key,
    :func:`train.manifest.load_key`), else :class:`train.checkpoint.CheckpointError` names the bad file."""
    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    meta = ckpt.read_meta(tag_dir)
    if meta is None:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint")
    if key is None and key_from is None:
        key, key_from = manifest.load_key()
    problems = manifest.verify(tag_dir, meta, key, key_from or "", verify, trust_unsigned)
    if problems:
        raise ckpt.CheckpointError(f"not exporting {tag_dir}: {'; '.join(map(str, problems))}. Nothing was loaded "
                                   "(DeepSpeed's files are pickles); export a checkpoint that verifies, or, for a "
                                   "checkpoint you trust that this key did not sign, pass --trust-unsigned "
                                   "(train.checkpoint.trust_unsigned=true)")
    weights = consolidated_state_dict(tag_dir)
    # the rank files are memory-mapped: an EMA tensor is assembled from their shards when it is written
    ema = consolidate(ckpt.rank_entries(tag_dir, ckpt.EMA, mmap=True), {k: v.shape for k, v in weights.items()},
                      lazy=True)
    ema_weights = dict(weights)
    ema_weights.update(ema)
    info = {"checkpoint": str(tag_dir), "step": str(meta["step"]), "stage": str(meta["stage"]),
            "model": str(meta["model"]), "ema_decay": str(meta.get("ema_decay")),
            "ema_params": str(len(ema))}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors(tmp / "model.safetensors", weights, info)
    write_safetensors(tmp / "ema.safetensors", ema_weights, dict(info, weights="ema"))
    run_config = yaml.safe_load((tag_dir / "config.yaml").read_text())  # older checkpoints kept secrets in it
    (tmp / "config.yaml").write_text(yaml.safe_dump(redacted(run_config), sort_keys=False))
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
    ap.add_argument("--key-file", default=None, help=f"the checkpoint key (default: ${manifest.KEY_ENV}, else "
                                                     f"{manifest.DEFAULT_KEY_FILE})")
    ap.add_argument("--verify", choices=manifest.LEVELS, default="sha256", help="check sizes, or sizes and sha256")
    ap.add_argument("--trust-unsigned", action="store_true",
                    help="export a checkpoint this key did not sign (only one you trust: its files are pickles)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or args.checkpoint.parent.parent / "export"
    key, key_from = manifest.load_key(args.key_file)
    paths = export(args.checkpoint, out, key=key, key_from=key_from, verify=args.verify,
                   trust_unsigned=args.trust_unsigned)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
