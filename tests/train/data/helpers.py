"""Independent readers of the test dataset (plain tarfile + numpy), to check the loader against."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

from preprocess import schema


def read_dataset(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {member: bytes}} of every committed shard of a preprocess output."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((Path(out) / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, member = m.name.split(".", 1)
                samples.setdefault(key, {})[member] = tf.extractfile(m).read()
    return samples


def npy(members: dict[str, bytes], name: str) -> np.ndarray:
    """A stored npy field, decoded with the schema."""
    f = schema.field(name)
    return schema.decode(f, members[f.member])


def meta(members: dict[str, bytes]) -> dict:
    """A sample's meta.json."""
    return json.loads(members[schema.field("meta").member])


def frames(data: bytes) -> np.ndarray:
    """Every frame of an in-memory MP4 with PyAV (not the loader's decord path): (N, H, W, 3) uint8."""
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """Write ``{key: {member: bytes}}`` as a WebDataset tar (members of a sample together)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, members in samples.items():
            for member, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{member}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def take(loader, n: int) -> list:
    """The next ``n`` batches of a fresh iterator over ``loader``."""
    it = iter(loader)
    return [next(it) for _ in range(n)]


def summary(batch) -> tuple:
    """What identifies a batch's content: keys, shapes, choices and a checksum of every tensor."""
    import torch

    sums = []
    for name in ("video", "ref_images", "skeleton_maps", "head_sphere_maps", "face_crops", "frame_index", "drop_ref",
                 "drop_motion", "ref_valid"):
        v = getattr(batch, name)
        sums.append(None if v is None else (tuple(v.shape), int(v.to(torch.int64).sum())))
    return (tuple(batch.keys), *sums)


def records(batches) -> list[tuple[str, int]]:
    """(key, epoch) of every sample of ``batches``."""
    return [(k, int(e)) for b in batches for k, e in zip(b.keys, b.epoch)]


def assert_epochs_covered(recs, n_epochs: int, every: set[str]) -> None:
    """Each of the first ``n_epochs`` epochs delivered every clip of ``every`` exactly once (and no other)."""
    from collections import Counter

    for e in range(n_epochs):
        counts = Counter(k for k, ep in recs if ep == e)
        twice = [k for k, n in counts.items() if n > 1]
        assert not twice, f"epoch {e}: delivered twice: {twice}"
        assert set(counts) == every, (f"epoch {e}: missing {sorted(every - set(counts))}, "
                                      f"extra {sorted(set(counts) - every)}")


def latent_pass(dataset: Path, cache: Path, *overrides: str, timeout: float = 600, check: bool = False):
    """``python preprocess/latents.py dataset=... cache=...`` in a child process (Ray's threads must not live in a
    process whose DataLoader workers are forked); returns the CompletedProcess (``check``: after asserting that it
    exited 0)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    cmd = [sys.executable, str(root / "preprocess" / "latents.py"), f"dataset={dataset}", f"cache={cache}",
           "progress_interval_s=1000", *overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(cmd, cwd=root, env={**env, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
                       capture_output=True, text=True, timeout=timeout)
    assert not check or r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r
