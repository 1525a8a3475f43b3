"""Keypoints backend: a COCO-WholeBody (133 points) top-down model of mmpose (RTMW, DWPose / RTMPose-wholebody).

Built and run by mmpose's own API: ``mmpose.apis.init_model`` builds the network from its config; inference is
``mmpose.apis.inference_topdown``'s steps (the model's test pipeline on each box, ``pseudo_collate``,
``model.test_step``) over all boxes of a clip in batches of ``batch_size`` instead of one frame at a time. The boxes
are the body stage's tracked subject boxes. The 133 points map onto the SMPL-X joints they locate
(:data:`WHOLEBODY_TO_SMPLX`): 17 body, 6 feet, the 51 inner face points (68-point layout less the jaw contour, which
SMPL-X's static landmarks are), 2 x 20 hand points (the hand's wrist point
duplicates the body's wrist, which is kept); that is 114 of the 127 fitted joints' targets.

Files (local paths, nothing downloaded): ``config``, a config file of mmpose's, named by its path or as
``mmpose::<path under mmpose's configs>`` (the copy inside the installed mmpose package, which its ``_base_`` files sit
next to: ``mmpose::wholebody_2d_keypoint/rtmpose/cocktail14/rtmw-x_8xb320-270e_cocktail14-384x288.py``), and
``checkpoint`` (Apache-2.0 weights from the mmpose model zoo; a plain state dict, or a released file converted with
``python -m preprocess.annotators.backends.mmpose_wholebody --convert IN.pth OUT.pth``: torch >= 2.6 loads only
weights, and released OpenMMLab checkpoints carry pickled metadata). docs/annotators.md says where to get them and
how to install mmpose (``scripts/install_mmpose.sh``).
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...config import ConfigError
from ...schema import N_SMPLX_JOINTS
from ..assets import ModelFileError
from . import KeypointsBackend, KeypointsClip

RTMW_DOCS = "https://github.com/open-mmlab/mmpose/tree/main/projects/rtmw (configs and checkpoint links)"
RTMW_X_CONFIG = "wholebody_2d_keypoint/rtmpose/cocktail14/rtmw-x_8xb320-270e_cocktail14-384x288.py"
_KEY = "annotators.body.params.keypoints.params"


def coco_wholebody_names() -> list[str]:
    """The 133 COCO-WholeBody keypoint names in order, spelled as mmpose's ``coco_wholebody.py`` metainfo spells them:
    17 body, 6 feet, 68 face (iBUG order), 2 x 21 hand (root, then 4 points per finger from the palm out)."""
    body = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
            "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee",
            "left_ankle", "right_ankle"]
    feet = ["left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe", "right_heel"]
    fingers = ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
    hands = [n for side in ("left", "right")
             for n in [f"{side}_hand_root"] + [f"{side}_{f}{k}" for f in fingers for k in range(1, 5)]]
    return body + feet + [f"face-{k}" for k in range(68)] + hands


_FINGERS = {"thumb": "thumb", "forefinger": "index", "middle_finger": "middle", "ring_finger": "ring",
            "pinky_finger": "pinky"}  # COCO-WholeBody's finger names -> SMPL-X's


def _wholebody_to_smplx() -> tuple[tuple[int, int], ...]:
    """(COCO-WholeBody index, SMPL-X joint index) pairs, by name: body and feet points are the SMPL-X joints and
    vertex keypoints of the same names; face points 17..67 (the 68-point layout less the jaw contour) are SMPL-X's
    51 static landmarks (joints 76..126, same order); finger points 1..3 are the finger's joints, point 4 its tip
    vertex; the hand roots duplicate the body's wrists and are left out."""
    from ..smplx_model import smplx_joint_names

    idx = {n: i for i, n in enumerate(smplx_joint_names())}
    pairs = []
    for w, name in enumerate(coco_wholebody_names()):
        side, _, part = name.partition("_")
        if name.startswith("face-"):
            if int(name[5:]) >= 17:
                pairs.append((w, 76 + int(name[5:]) - 17))
        elif part[:-1] in _FINGERS:
            pairs.append((w, idx[f"{side}_{_FINGERS[part[:-1]]}" + ("" if part[-1] == "4" else part[-1])]))
        elif name in idx:
            pairs.append((w, idx[name]))
    return tuple(pairs)


def wholebody_to_smplx(kp: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, 133, 2) points and (…, 133) scores → (…, 127, 2) and (…, 127) in SMPL-X joint order (0 elsewhere)."""
    pairs = np.array(_wholebody_to_smplx())
    out = np.zeros((*kp.shape[:-2], N_SMPLX_JOINTS, 2))
    conf = np.zeros((*kp.shape[:-2], N_SMPLX_JOINTS))
    out[..., pairs[:, 1], :] = kp[..., pairs[:, 0], :]
    conf[..., pairs[:, 1]] = np.clip(score[..., pairs[:, 0]], 0.0, 1.0)
    return out, conf


def load_state_dict(path: Path):
    """The weights of a checkpoint file, loaded with ``weights_only`` (a pickle of anything else is refused)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError / RuntimeError with the offending type
        raise ModelFileError(
            f"checkpoint {path} is not a plain state dict ({type(e).__name__}: {str(e)[:200]}); released OpenMMLab "
            "checkpoints carry pickled metadata: convert the trusted file once with `python -m "
            f"preprocess.annotators.backends.mmpose_wholebody --convert {path} {path.with_suffix('.weights.pth')}`"
        ) from None
    return ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt


def resolve_config(config: str) -> Path:
    """The config file: a path, or ``mmpose::REL`` for ``REL`` under the installed mmpose's packaged configs
    (``mmpose/.mim/configs``, where mmengine's ``mmpose::`` ``_base_`` references also point)."""
    if config.startswith("mmpose::"):
        spec = importlib.util.find_spec("mmpose")
        if spec is None or not spec.submodule_search_locations:
            return Path(config)  # reported as missing by setup (with the install hint)
        return Path(next(iter(spec.submodule_search_locations))) / ".mim" / "configs" / config.split("::", 1)[1]
    return Path(config).expanduser()


class MMPoseWholeBody(KeypointsBackend):
    """133-point whole-body keypoints, top-down on the subject's boxes, through ``mmpose.apis``."""

    @dataclass
    class Params:
        config: str = ""  # COCO-WholeBody model's mmpose config (RTMW, DWPose, RTMPose-wholebody): path or mmpose::REL
        checkpoint: str | None = ""  # its weights; null: random weights (tests and benchmarks only)
        device: str = "auto"  # auto: cuda:0 when available, else cpu
        batch_size: int = 32  # boxes per forward pass
        # the test pipeline (crop, affine warp, packing: CPU work) of the next batch runs in these threads while the
        # model runs on the current one; 0: min(8, the CPUs this process may use)
        threads: int = 0
        # GPU arithmetic: tf32 (fp32 weights, TF32 tensor-core matmuls and convolutions, what onnxruntime's CUDA
        # provider does by default) or fp32 (exact); mmpose's heads decode in numpy, which has no bfloat16
        precision: str = "tf32"

    def setup(self) -> None:
        p = self.params
        if p.precision not in ("tf32", "fp32"):
            raise ConfigError(f"{_KEY}.precision={p.precision!r}: tf32 or fp32")
        cfg = resolve_config(p.config) if p.config else None
        if cfg is None or not cfg.is_file():
            raise ModelFileError(f"mmpose config {p.config or '(unset)'} is missing ({cfg}): install mmpose "
                                 "(scripts/install_mmpose.sh) and set "
                                 f"{_KEY}.config=mmpose::{RTMW_X_CONFIG}, or a path to a config ({RTMW_DOCS})")
        ckpt = Path(p.checkpoint).expanduser() if p.checkpoint else None
        if p.checkpoint is not None and (ckpt is None or not ckpt.is_file()):
            raise ModelFileError(f"mmpose checkpoint {p.checkpoint or '(unset)'} is missing: download the model's "
                                 f"weights (Apache-2.0, {RTMW_DOCS}) and set {_KEY}.checkpoint=/path/to/file.pth")
        try:
            import torch
            from mmpose.apis import init_model
        except ImportError as e:
            raise ModelFileError(f"mmpose is not installed ({e}): scripts/install_mmpose.sh (mmcv 2.1.0 built from "
                                 "source, mmpose 1.3.2 --no-deps; docs/annotators.md, 'Installing mmpose')") from None
        device = p.device if p.device != "auto" else ("cuda:0" if torch.cuda.is_available() else "cpu")
        self.model = init_model(str(cfg), None, device=device)  # mmpose builds the network from its config
        if ckpt is not None:
            missing, unexpected = self.model.load_state_dict(load_state_dict(ckpt), strict=False)
            if missing:
                raise ModelFileError(f"checkpoint {ckpt} does not fit config {cfg}: {len(missing)} weights missing, "
                                     f"e.g. {missing[:3]}")
        meta = self.model.dataset_meta or {}
        names = [meta.get("keypoint_id2name", {}).get(k) for k in range(meta.get("num_keypoints") or 0)]
        if names != coco_wholebody_names():  # the map below is by index: the layout must be COCO-WholeBody's
            raise ValueError(f"{cfg}: a {len(names)}-keypoint model (first names {names[:3]}); this backend maps "
                             "COCO-WholeBody's 133 points")
        from mmengine.dataset import Compose

        self.pipeline = Compose(self.model.cfg.test_dataloader.dataset.pipeline)
        import os
        from concurrent.futures import ThreadPoolExecutor

        n = p.threads or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self._pool = ThreadPoolExecutor(max(1, n), thread_name_prefix="mmpose-pipeline")

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._pool = None

    def estimate(self, frames: np.ndarray, boxes: np.ndarray, valid: np.ndarray) -> KeypointsClip:
        import torch
        from mmengine.dataset import pseudo_collate
        from mmengine.registry import init_default_scope

        from ..common import tf32

        init_default_scope(self.model.cfg.get("default_scope", "mmpose"))
        T = len(frames)
        kp, score = np.zeros((T, 133, 2)), np.zeros((T, 133))
        todo = [t for t in np.flatnonzero(valid) if np.isfinite(boxes[t]).all() and boxes[t][2] > boxes[t][0]]
        meta = self.model.dataset_meta

        def prepare(t):  # inference_topdown's per-box input (mmpose reads BGR)
            info = dict(img=np.ascontiguousarray(frames[t][..., ::-1]), bbox=np.asarray(boxes[t], np.float32)[None],
                        bbox_score=np.ones(1, np.float32))
            info.update(meta)
            return self.pipeline(info)

        chunks = [todo[s: s + self.params.batch_size] for s in range(0, len(todo), self.params.batch_size)]
        cuda = next(self.model.parameters()).is_cuda
        pending = [self._pool.map(prepare, chunks[0])] if chunks else []
        for k, chunk in enumerate(chunks):
            data = list(pending.pop())
            if k + 1 < len(chunks):  # the next batch's crops while this one runs
                pending.append(self._pool.map(prepare, chunks[k + 1]))
            with torch.no_grad(), tf32(cuda and self.params.precision == "tf32"):
                results = self.model.test_step(pseudo_collate(data))
            for t, r in zip(chunk, results):
                kp[t] = r.pred_instances.keypoints[0]
                score[t] = r.pred_instances.keypoint_scores[0]
        j2, conf = wholebody_to_smplx(kp, score)
        return KeypointsClip(joints2d=j2, conf=conf)


def convert(src: str, dst: str) -> None:
    """Save the state dict of a released (trusted) OpenMMLab checkpoint as a plain weights file."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)  # noqa: S614 - the user's own trusted download
    torch.save(ckpt.get("state_dict", ckpt), dst)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--convert":
        convert(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)
        sys.exit(2)
