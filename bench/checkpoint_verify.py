"""Time what checkpoint verification costs (train/manifest.py): the sha256 of every file that a save records in
``COMPLETE``, and the checks a resume runs before loading (``train.checkpoint.verify=size`` or ``sha256``).

    python bench/checkpoint_verify.py --files 4 --gib 1 [--dir DIR] [--out bench_verify.json]
    python bench/checkpoint_verify.py --checkpoint outputs/train/tiny/stage1/checkpoints/step_00000012

Without ``--checkpoint`` it writes ``--files`` files of ``--gib`` GiB into a temporary directory (or ``--dir``)
and times, with the files in the page cache as right after a save: one file hashed by one thread (hashlib's
sha256 per core), the save's recording of all files (one thread per file), and the resume's size and sha256
checks. With ``--checkpoint`` it times the same on a real checkpoint directory as a single rank does it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import manifest  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def make_files(folder: Path, files: int, gib: float) -> list[str]:
    """``files`` files of ``gib`` GiB (content does not change sha256's speed), flushed to disk."""
    block = os.urandom(1 << 20) * 64  # 64 MiB
    rels = []
    for i in range(files):
        rel = f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt"
        left = int(gib * 2**30)
        with open(folder / rel, "wb") as f:
            while left > 0:
                f.write(block[:left])
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())
        rels.append(rel)
    return rels


def measure(folder: Path, rels: list[str]) -> dict:
    """Seconds and GB/s of one file's sha256, of recording every file, and of both resume checks."""
    total = sum((folder / r).stat().st_size for r in rels)
    for r in rels:  # warm the page cache, as right after a save
        with open(folder / r, "rb") as f:
            while f.read(64 << 20):
                pass
    _, one = _timed(lambda: manifest.sha256_file(folder / rels[0]))
    files, record = _timed(lambda: manifest.describe(folder, rels))
    problems, size = _timed(lambda: manifest.file_problems(folder, files, "size"))
    assert not problems
    problems, sha = _timed(lambda: manifest.file_problems(folder, files, "sha256"))
    assert not problems
    gb = total / 1e9
    first = (folder / rels[0]).stat().st_size / 1e9
    return {"files": len(rels), "bytes": total, "cpus": os.cpu_count(),
            "one_file_one_thread_s": round(one, 3), "sha256_gb_per_s_per_thread": round(first / one, 3),
            "record_s": round(record, 3), "record_gb_per_s": round(gb / record, 3),
            "verify_size_s": round(size, 4), "verify_sha256_s": round(sha, 3),
            "verify_sha256_gb_per_s": round(gb / sha, 3), "sha256_s_per_gb_one_thread": round(one / first, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary dir)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint directory to time instead")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.checkpoint is not None:
        result = dict(measure(args.checkpoint, manifest.listed(args.checkpoint)), checkpoint=str(args.checkpoint))
    else:
        folder = Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.dir))
        try:
            result = measure(folder, make_files(folder, args.files, args.gib))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
