"""What the annotator clip stages share: a backend chosen by config, clip continuity for trackers."""
from __future__ import annotations

import contextlib
from typing import ClassVar

import numpy as np

from ..stage import ClipStage
from .backends import Backend, load_backend


class Continuity:
    """Tells whether a clip directly continues the previous clip this worker saw (same video, next
    frames), so VIDEO-mode trackers can keep their state instead of starting over."""

    def __init__(self):
        self._last: tuple[str, int, int] | None = None  # video_key, last frame index, frame step

    def new_sequence(self, row: dict) -> bool:
        fi = np.asarray(row["frame_index"])
        step = int(np.median(np.diff(fi))) if len(fi) > 1 else 1
        new = True
        if self._last is not None:
            vk, last, last_step = self._last
            new = not (vk == row["video_key"] and 0 < int(fi[0]) - last <= 2 * max(step, last_step))
        self._last = (row["video_key"], int(fi[-1]), step)
        return new


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 tensor-core matmuls and cuDNN convolutions on or off for the block (what onnxruntime's CUDA provider
    runs by default), the process's settings restored after it."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def timestamps_ms(row: dict) -> np.ndarray:
    """Source-video time of each frame of the clip, milliseconds."""
    return np.asarray(row["timestamps"], np.float64) * 1000.0


def frac(mask: np.ndarray) -> float:
    """Fraction of true entries (0 for an empty mask)."""
    return float(np.mean(mask)) if len(mask) else 0.0


def finite_or_none(x: float) -> float | None:
    """A scalar for meta.json / the index: None where undefined."""
    return float(x) if np.isfinite(x) else None


class BackendClipStage(ClipStage):
    """A clip stage whose model is a backend of kind ``backend_kind``, set by ``params.backend``
    (``{target: module.Class, params: {...}}``); the stage's own ``Params`` must have that field."""

    backend_kind: ClassVar[type[Backend]] = Backend

    def __init__(self, params: dict | None = None):
        super().__init__(params)
        self.backend = load_backend(self.params.backend, self.backend_kind, f"annotators.{self.name}.params.backend")
        self.continuity = Continuity()

    def setup(self) -> None:
        self.backend.setup()
