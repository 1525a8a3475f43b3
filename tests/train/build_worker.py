"""One rank of a model build as the trainer does it (``train.stages.build_model``), launched by the tests under
torchrun (CPU, gloo): ``python -m torch.distributed.run --nproc_per_node N tests/train/build_worker.py OUT
[override ...]``.

Each rank writes ``OUT/rank_<r>.json``: the peak of its heap while the model is built and its weights are loaded
(glibc's ``mallinfo2``: every tensor's storage is there, so the figure is the bytes of weights the rank
held, plus interpreter noise), the growth of its resident set over the same time (which also counts the pages of
a weights file it read through ``mmap``), the bytes of parameter storage it holds afterwards, and the model's
size.
Rank 0 writes ``OUT/weights.safetensors``: the whole weights, gathered one module at a time.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap_bytes() -> int:
    """Bytes allocated by malloc and not freed (small chunks + mmapped blocks): tensors included."""
    m = _libc.mallinfo2()
    return int(m.uordblks + m.hblkhd)


class PeakHeap:
    """The highest :func:`heap_bytes` seen: sampled by a thread every millisecond and at every point where a
    ZeRO-3 build holds whole tensors (a module before its partitioning, a gathered module before its release)."""

    def __init__(self):
        self.peak = heap_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, heap_bytes())

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def __enter__(self):
        import deepspeed

        gp = deepspeed.zero.GatheredParameters
        init = deepspeed.zero.Init
        self._patched = [(gp, "__exit__", gp.__exit__), (init, "_post_init_method", init._post_init_method)]
        for cls, name, fn in self._patched:
            setattr(cls, name, self._sampling(fn))
        self._thread.start()
        return self

    def _sampling(self, fn):
        def wrapped(*args, **kwargs):
            self.sample()
            return fn(*args, **kwargs)
        return wrapped

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        for cls, name, fn in self._patched:
            setattr(cls, name, fn)


def main(out: Path, overrides: list[str]) -> None:
    import torch
    from safetensors.torch import save_file

    from models.partitioned import gathered, numel
    from tests.conftest import compose
    from train.config import to_job
    from train.distributed import setup, shutdown
    from train.stages import build_model

    job = to_job(compose("train", overrides))
    dist = setup(job.launch, job.train.seed)
    try:
        torch.distributed.barrier()
        time.sleep(0.2)
        base, rss = heap_bytes(), _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from here
        with PeakHeap() as peak:
            model = build_model(job)
        torch.distributed.barrier()
        held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
                   else p.numel() * p.element_size() for p in model.parameters())
        record = {"rank": dist.rank, "world": dist.world_size, "peak_bytes": peak.peak - base, "held_bytes": held,
                  "model_bytes": sum(numel(p) * p.element_size() for p in model.parameters()),
                  "largest_module_bytes": max(sum(numel(p) * p.element_size() for p in m.parameters(recurse=False))
                                              for m in model.modules()),
                  "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
                  "rss_growth_bytes": (_status("VmHWM") - rss) * 1024}
        (out / f"rank_{dist.rank}.json").write_text(json.dumps(record))
        weights = {}
        for name, p in model.named_parameters():
            with gathered([p]):
                weights[name] = p.detach().clone()
        weights.update({n: b.detach().clone() for n, b in model.state_dict().items() if n not in weights})
        if dist.is_main:
            save_file(weights, str(out / "weights.safetensors"))
        torch.distributed.barrier()
    finally:
        shutdown()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]), sys.argv[2:])
