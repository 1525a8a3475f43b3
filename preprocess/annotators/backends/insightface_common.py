"""Loading an insightface model pack from a local directory, through insightface's own model router.

A pack is a directory of ONNX files laid out as insightface's ``buffalo_l`` / ``antelopev2`` (e.g. ``det_10g.onnx``,
``2d106det.onnx``, ``1k3d68.onnx``, ``w600k_r50.onnx``). ``insightface.app.FaceAnalysis(name=<directory>)`` builds
one model per file with ``insightface.model_zoo.get_model``, which tells the task from the ONNX signature: 5 or more
outputs is a detector (SCRFD), a 192x192 input is a landmark model (3309 outputs: 3D-68, else 2D with outputs / 2
points), a square input of at least 112 px divisible by 16 is a recognition model (ArcFace). Nothing is downloaded:
a missing directory raises :class:`ModelFileError` naming it and where the packs come from.

Execution: onnxruntime with its CUDA provider when the installed onnxruntime has one, else the CPU.
Model packs are insightface's, licensed for non-commercial research only (docs/annotators.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..assets import ModelFileError

PACK_URL = "https://github.com/deepinsight/insightface/tree/master/python-package#model-zoo"
BUFFALO_L_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_l.zip"


@dataclass
class InsightFaceParams:
    """What every insightface backend is configured with."""

    model_dir: str | None = None  # the unpacked model pack (e.g. /models/insightface/buffalo_l)
    providers: list[str] | None = None  # onnxruntime providers; null: by delegate
    delegate: str | None = None  # gpu: CUDA (refused when onnxruntime has none); cpu; auto/null: CUDA if any
    det_size: int = 640  # detector input side (a fixed-size detector uses its own)
    det_thresh: float = 0.5


def providers(wanted: list[str] | None, delegate: str | None = None) -> list[str]:
    """The onnxruntime providers to run with: ``wanted``; else by ``delegate`` (the key ``+cluster=prod`` sets for
    every head backend): gpu = CUDA (with the CPU behind it), cpu = CPU, null = CUDA when present, else CPU."""
    import onnxruntime

    if wanted:
        return list(wanted)
    if delegate not in (None, "auto", "gpu", "cpu"):
        raise ValueError(f"delegate={delegate!r}: use gpu, cpu or auto (null)")
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if delegate == "gpu" and not cuda:
        raise RuntimeError("delegate=gpu but this onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
                           "on GPU nodes, or set delegate=cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda and delegate != "cpu" else \
        ["CPUExecutionProvider"]


def load_pack(p: InsightFaceParams, tasks: tuple[str, ...], config_key: str) -> dict:
    """``{task: model}`` for ``tasks`` (insightface task names: detection, landmark_2d_106, landmark_3d_68,
    recognition) from the pack at ``p.model_dir``, prepared for the chosen device."""
    d = Path(p.model_dir).expanduser() if p.model_dir else None
    how = (f"download an insightface model pack (e.g. buffalo_l: {BUFFALO_L_URL}; all packs: {PACK_URL}; "
           f"non-commercial research licence), unzip it and set {config_key}=/path/to/buffalo_l")
    if d is None:
        raise ModelFileError(f"no insightface model directory configured: {how}")
    if not d.is_dir() or not any(d.glob("*.onnx")):
        raise ModelFileError(f"insightface model directory {d} is missing or holds no .onnx files: {how}")
    import onnxruntime
    from insightface.app import FaceAnalysis

    onnxruntime.set_default_logger_severity(3)
    prov = providers(p.providers, p.delegate)
    fa = FaceAnalysis(name=str(d), allowed_modules=list(tasks), providers=prov)
    missing = [t for t in tasks if t not in fa.models]
    if missing:
        raise ModelFileError(f"insightface model directory {d} has no {missing} model (found {sorted(fa.models)}): "
                             f"{how}")
    ctx = 0 if prov[0] == "CUDAExecutionProvider" else -1
    fa.prepare(ctx_id=ctx, det_thresh=p.det_thresh, det_size=(p.det_size, p.det_size))
    return {t: fa.models[t] for t in tasks}
