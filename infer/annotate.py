"""Annotate frames in this process with the preprocessing's own clip stages (``conf/annotators/*``).

Inference needs the same signals as training: the driving video's body joints, hands, head sphere and face
crops, and the reference image's body joints (bone lengths), head size (sphere radius) and face. The stages,
backends and parameters are the ones a dataset was made with (``annotators=embedded`` by default; a GPU
backend through the same keys), run on chunks of frames without Ray: one video, one process.

Frames where no person was found take the annotations of the nearest frame that has one
(:func:`fill_missing`), and are listed, so a short occlusion does not break the driving signal.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from models.typed_config import ConfigError, from_node
from preprocess.config import StageSpec
from preprocess.stage import ClipStage, load_stage, new_row
from preprocess.video import decode_mp4

log = logging.getLogger(__name__)

# per-frame annotation fields that a missing frame copies from its nearest good frame
PER_FRAME = ("subject_box", "subject_valid", "camera_K", "body_joints3d", "body_joints2d", "body_conf", "body_filled",
             "hand_joints3d", "hand_joints2d", "hand_conf", "head_rotation", "head_ypr", "head_center", "head_radius",
             "head_translation", "head_scale", "head_valid", "face_box", "face_valid", "face_crops")


class AnnotationError(RuntimeError):
    """An input the annotators cannot use (no person in a reference, none in any driving frame)."""


@dataclass
class Annotations:
    """Per-frame annotation arrays of T frames (the fields of ``preprocess.schema`` plus ``face_crops``
    (T, 224, 224, 3) uint8), and the frames that borrowed a neighbour's annotations."""

    arrays: dict[str, np.ndarray]
    filled: list[int] = field(default_factory=list)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    @property
    def person(self) -> np.ndarray:
        """(T,) bool: a person was found in the frame."""
        return self.arrays["subject_valid"].astype(bool)


class Annotator:
    """The enabled clip stages of an annotators config, set up once (models loaded) and run in order."""

    def __init__(self, annotators_node, chunk_frames: int = 64, delegate: str | None = None):
        """``delegate`` (cpu | gpu | auto) sets every backend's MediaPipe delegate (None: the config's own)."""
        self.stages: list[ClipStage] = []
        for name, node in (annotators_node or {}).items():
            spec = from_node(StageSpec, node, f"annotators.{name}")
            backend = spec.params.get("backend")
            if delegate is not None and isinstance(backend, dict) and "MediaPipe" in str(backend.get("target")):
                spec.params["backend"] = {**backend, "params": {**backend.get("params", {}), "delegate": delegate}}
            if spec.enabled:
                self.stages.append(load_stage(name, spec, ClipStage))
        if not self.stages:
            raise ConfigError("annotators: no clip stage is enabled; inference needs body and head "
                              "(annotators=embedded)")
        self.chunk_frames = chunk_frames
        self._ready = False

    def setup(self) -> None:
        """Load every stage's models (once)."""
        if not self._ready:
            for st in self.stages:
                st.setup()
            self._ready = True

    def annotate(self, frames: np.ndarray, fps: float, name: str) -> Annotations:
        """Annotations of ``frames`` (T, H, W, 3) uint8, in chunks of ``chunk_frames`` (each a clip to the stages).
        ``name`` names the input in errors."""
        self.setup()
        parts: list[dict[str, np.ndarray]] = []
        t_total = len(frames)
        for start in range(0, t_total, self.chunk_frames):
            chunk = np.ascontiguousarray(frames[start:start + self.chunk_frames])
            idx = np.arange(start, start + len(chunk))
            row = new_row(key=f"infer_{start:06d}", video_key="infer", frames=chunk, fps=float(fps), frame_index=idx,
                          timestamps=idx / float(fps), width=chunk.shape[2], height=chunk.shape[1], clip_index=0,
                          shot_index=0, source=name)
            for st in self.stages:
                try:
                    row.update(st.process(row))
                except Exception as e:  # noqa: BLE001 - a stage's failure names the input and the stage
                    raise AnnotationError(f"{name}: the {st.name} annotator failed on frames {start}-"
                                          f"{start + len(chunk) - 1}: {e}") from e
            part = {k: np.asarray(v) for k, v in row.items() if k in PER_FRAME and isinstance(v, np.ndarray)
                    and len(v) == len(chunk)}
            if "face" in row:
                part["face_crops"] = decode_mp4(row["face"])[: len(chunk)]
            parts.append(part)
        keys = set.intersection(*(set(p) for p in parts)) if parts else set()
        return Annotations({k: np.concatenate([p[k] for p in parts]) for k in sorted(keys)})


def nearest_valid(valid: np.ndarray) -> np.ndarray:
    """For every frame, the index of the nearest frame with ``valid`` (ties: the earlier one)."""
    good = np.flatnonzero(valid)
    if not len(good):
        raise ValueError("no valid frame")
    t = np.arange(len(valid))
    pos = np.clip(np.searchsorted(good, t), 0, len(good) - 1)
    before = good[np.maximum(pos - 1, 0)]
    after = good[pos]
    return np.where(np.abs(t - before) <= np.abs(after - t), before, after)


def fill_missing(ann: Annotations, name: str) -> Annotations:
    """Frames without a person take every per-frame annotation of the nearest frame with one; the frames are
    listed in ``filled``. No person in any frame: :class:`AnnotationError` naming the input."""
    person = ann.person
    if not person.any():
        raise AnnotationError(f"{name}: no person was detected in any of its {len(person)} frames")
    src = nearest_valid(person)
    filled = [int(t) for t in np.flatnonzero(~person)]
    if filled:
        log.warning("%s: no person in %d of %d frames (%s); they reuse the nearest frame with one", name,
                    len(filled), len(person), _ranges(filled))
    arrays = {k: (v[src] if k in PER_FRAME else v) for k, v in ann.arrays.items()}
    return Annotations(arrays, filled)


def _ranges(frames: list[int]) -> str:
    """'3-7, 12' for [3, 4, 5, 6, 7, 12]."""
    out, start = [], None
    for i, f in enumerate(frames):
        if start is None:
            start = f
        if i + 1 == len(frames) or frames[i + 1] != f + 1:
            out.append(f"{start}" if start == f else f"{start}-{f}")
            start = None
    return ", ".join(out)
