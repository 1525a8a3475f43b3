"""Animate reference image(s) with a driving video (paper 3.1 "Inference", 3.2, 3.3, Fig. 3).

The steps of :func:`animate`, each a function here:

1. :func:`load_export`: the model and its preset from an export (``model.safetensors`` / ``ema.safetensors`` +
   the run's ``config.yaml``) or a sharded checkpoint (exported on the fly); the VAE the model was trained with.
2. :func:`read_references` / :func:`read_video`: the reference image(s) and the driving frames, resampled by
   presentation time to the output fps.
3. Annotation (:mod:`infer.annotate`): the same clip stages as preprocessing, on the references and the
   driving frames; driving frames without a person borrow the nearest good frame's annotations.
4. :func:`plan_geometry`: the output size (the training area at the reference's aspect), the crop of every
   reference, and where the driving skeleton lands in the output (on the reference subject, or as driven).
5. :func:`driving_controls`: bone-length adjustment of the driving skeleton to the reference's proportions
   (directions kept; ``bone_adjust=false`` turns it off), the head sphere at the reference head's size, the
   [skeleton ; sphere] maps and the face crops.
6. Sampling (:func:`models.flow.generate_long`): segments of ``segment_frames`` (73) frames, each after the
   first starting from the last latent of the one before, dual CFG 2.5 / 2.5; then the VAE decode.

Optional: pseudo-references (paper 3.3, :mod:`infer.pseudo_refs`) before step 6, and a side-by-side video
[driving | skeleton + sphere | output]. :func:`animate` returns the frames and a JSON-ready record of what was
used (weights and their sha256, seed, settings, frames without a person).
"""
from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from models import render
from models.conditions import Conditions
from models.config import ModelConfig
from models.dreamactor import DreamActor
from models.flow import decode_segments, generate_long, segment_plan
from models.typed_config import ConfigError, resolved
from models.vae import VideoVAE, frames_uint8
from preprocess.schema import BODY_JOINT_NAMES

if TYPE_CHECKING:  # the annotators (MediaPipe, PyAV) load only where annotation runs, not on a sampling box
    from .annotate import Annotations, Annotator

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HEAD_JOINT = BODY_JOINT_NAMES.index("head")


class InferError(RuntimeError):
    """An input that cannot be animated; the message names the file and what to do."""


# ----------------------------------------------------------------------------- 1. the model


@dataclass
class Export:
    """A trained model ready to sample, and where it came from."""

    model: DreamActor
    vae: VideoVAE
    cfg: ModelConfig
    weights_path: Path
    weights_sha256: str
    train_area: int  # pixels of the training bucket (the default output area)
    stage: int | None = None  # the training stage that wrote the weights (run config's stage.id), if said


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def find_weights(checkpoint: str, weights: str) -> tuple[Path, Path]:
    """(weights file, the run's config.yaml) of an export dir, a weights file, or a sharded checkpoint dir
    (exported into a temporary directory first)."""
    path = Path(checkpoint)
    name = {"ema": "ema.safetensors", "model": "model.safetensors"}.get(weights)
    if name is None:
        raise ConfigError(f"weights={weights!r}: use ema or model")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise InferError(f"checkpoint={path}: not a .safetensors file, an export dir or a checkpoint dir")
        return path, path.parent / "config.yaml"
    if not path.is_dir():
        raise InferError(f"checkpoint={path}: no such file or directory")
    if (path / name).is_file():
        return path / name, path / "config.yaml"
    from train import checkpoint as ckpt

    if ckpt.read_meta(path) is not None:  # a sharded DeepSpeed checkpoint: consolidate it first
        from train.export import export

        out = Path(tempfile.mkdtemp(prefix="dreamactor-export-")) / "export"
        log.info("exporting checkpoint %s to %s", path, out)
        export(path, out)
        return out / name, out / "config.yaml"
    raise InferError(f"checkpoint={path}: no {name} in it and not a complete training checkpoint "
                     "(give stage<N>/export, a *.safetensors file, or checkpoints/step_XXXXXXXX)")


def load_export(checkpoint: str, weights: str, device: torch.device, dtype: torch.dtype,
                preset: str | None = None) -> Export:
    """The model of ``checkpoint`` with its preset (from the run's config.yaml), on ``device`` in ``dtype``."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from train.step import vae_seed

    weights_path, config_path = find_weights(checkpoint, weights)
    if not config_path.is_file():
        raise InferError(f"{config_path} is missing: the export's config.yaml says which model preset the weights are")
    run_cfg = resolved(OmegaConf.load(config_path))
    cfg = ModelConfig.from_run_config(run_cfg["model"])
    if preset is not None and preset != cfg.name:
        raise InferError(f"{weights_path}: these weights are of the {cfg.name!r} preset, not {preset!r} "
                         f"(leave preset unset to use the export's)")
    state = load_file(str(weights_path))
    # a stage-4 (audio) export carries the audio encoder: speech can drive the face (infer/talking.py)
    model = DreamActor.from_config(cfg, load_weights=False, audio=any(k.startswith("audio_encoder.") for k in state))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InferError(f"{weights_path}: the weights do not fit the {cfg.name!r} preset of {config_path} "
                         f"({str(e).splitlines()[0]})") from None
    model.to(device=device, dtype=dtype).eval()
    seed = int(run_cfg.get("train", {}).get("seed", 0))
    torch.manual_seed(vae_seed(seed))  # the VAE the trainer built (a random init for test presets)
    vae = VideoVAE.from_config(cfg.vae, cfg.weights.vae_dir).to(device)
    area = int(run_cfg.get("data", {}).get("buckets", {}).get("area", 0) or 0)
    stage = run_cfg.get("stage", {}).get("id")
    return Export(model, vae, cfg, weights_path, sha256_file(weights_path), area, None if stage is None else int(stage))


# ----------------------------------------------------------------------------- 2. media


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file; an unreadable one is an error naming it."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InferError(f"reference {path}: not a readable image (jpg, png, webp, bmp)")
    return np.ascontiguousarray(img[:, :, ::-1])


def read_references(spec) -> list[tuple[str, np.ndarray]]:
    """(path, RGB image) of a reference spec: one image, a list of images, or a folder of images (sorted)."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items or items == [None]:
        raise ConfigError("reference is not set: give an image, a list of images or a folder")
    paths: list[Path] = []
    for item in items:
        p = Path(str(item))
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InferError(f"reference {p}: the folder has no image ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise InferError(f"reference {p}: no such file or directory")
    return [(str(p), read_image(p)) for p in paths]


@dataclass
class Driving:
    """The driving frames resampled to ``fps`` (T, H, W, 3), and what was read."""

    path: str
    frames: np.ndarray
    fps: float
    source_fps: float
    has_audio: bool
    damaged: list = field(default_factory=list)


def read_video(path: str, fps: float | None, max_side: int, max_frames: int | None = None) -> Driving:
    """Every displayable frame of ``path`` (long side at most ``max_side``), resampled by presentation time to
    ``fps`` (None: the video's own average rate)."""
    import av

    from preprocess.video import VideoError, ffmpeg_words, probe, scaled_size, scan

    if not Path(path).is_file():
        raise InferError(f"driving {path}: no such file")
    try:
        info = probe(path)
        frames: list[np.ndarray] = []  # in the order of the scan's times (skipped frames never reach it)
        sc = scan(path, lambda a: frames.append(a) or 0.0, rotation=info.rotation,
                  size=scaled_size(info.width, info.height, max_side), fps=info.fps or 25.0)
    except VideoError as e:
        raise InferError(f"driving {e}" if path in str(e) else f"driving {path}: {e}") from None
    except (av.error.FFmpegError, OSError) as e:
        raise InferError(f"driving {path}: not a readable video ({ffmpeg_words(e)})") from None
    if not frames:
        raise InferError(f"driving {path}: no frame decodes")
    src_fps = sc.mean_fps or info.fps or 25.0
    out_fps = float(fps or src_fps)
    n = int(math.floor(float(sc.times[-1]) * out_fps + 1e-6)) + 1
    if max_frames is not None:
        n = min(n, max_frames)
    want = np.arange(n) / out_fps
    idx = np.clip(np.searchsorted(sc.times, want), 0, len(sc.times) - 1)
    prev = np.clip(idx - 1, 0, len(sc.times) - 1)  # the nearest frame by time, not the next one
    idx = np.where(np.abs(sc.times[prev] - want) <= np.abs(sc.times[idx] - want), prev, idx)
    with av.open(path) as c:
        has_audio = bool(c.streams.audio)
    return Driving(path, np.stack([frames[i] for i in idx]), out_fps, float(src_fps), has_audio, sc.damaged)


# ----------------------------------------------------------------------------- 4. geometry


def output_size(aspect: float, area: int, multiple: int) -> tuple[int, int]:
    """(H, W) of about ``area`` pixels at ``aspect`` = W / H, both sides multiples of ``multiple``."""
    h = math.sqrt(area / aspect)
    w = h * aspect
    return (max(multiple, int(round(h / multiple)) * multiple), max(multiple, int(round(w / multiple)) * multiple))


def subject_center(ann: Annotations, t: int = 0) -> np.ndarray:
    """Centre (x, y) of the subject box of frame ``t``."""
    b = ann["subject_box"][t]
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])


def joints_box(joints3d: np.ndarray, conf: np.ndarray, K: np.ndarray, transform: np.ndarray,
               min_conf: float) -> np.ndarray | None:
    """(x0, y0, x1, y1) of the confident joints of one frame, projected and transformed."""
    uv, depth = render.project(joints3d[None], K[None])
    ok = (conf > min_conf) & (depth[0] > 0)
    if ok.sum() < 2:
        return None
    p = render.transform_points(uv[0][ok], transform)
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def placement_transform(ref_box: np.ndarray | None, drive_box: np.ndarray | None) -> np.ndarray:
    """The similarity (scale + shift) that puts the driving subject's box onto the reference subject's: same
    height, same centre. Identity when either is unknown."""
    if ref_box is None or drive_box is None or drive_box[3] - drive_box[1] < 1e-6:
        return np.eye(3)
    s = (ref_box[3] - ref_box[1]) / (drive_box[3] - drive_box[1])
    rc, dc = (ref_box[:2] + ref_box[2:]) / 2, (drive_box[:2] + drive_box[2:]) / 2
    return render.scale_offset_transform(s, tuple(rc - s * dc))


# ----------------------------------------------------------------------------- 5. controls


def adjusted_joints(drive: Annotations, ref: Annotations, min_conf: float, enabled: bool):
    """(body (T, J, 3), hands (T, 2, 21, 3) or None) of the driving video, each bone rescaled to the reference
    subject's length with its direction kept (paper 3.2), or as driven when ``enabled`` is False."""
    hands = drive["hand_joints3d"] if "hand_joints3d" in drive else None
    if not enabled:
        return drive["body_joints3d"].astype(np.float64), None if hands is None else hands.astype(np.float64)
    has_hands = hands is not None and "hand_joints3d" in ref
    return render.bone_length_adjust(
        drive["body_joints3d"], drive["body_conf"], ref["body_joints3d"], ref["body_conf"],
        joint_names=BODY_JOINT_NAMES, min_confidence=min_conf,
        drive_hands3d=hands, drive_hand_conf=drive["hand_conf"] if hands is not None else None,
        ref_hands3d=ref["hand_joints3d"] if has_hands else None, ref_hand_conf=ref["hand_conf"] if has_hands else None)


def head_shift(drive: Annotations, body: np.ndarray) -> np.ndarray:
    """(T, 2) px: how far the adjusted skeleton moved each frame's head joint (the sphere follows it)."""
    before, _ = render.project(drive["body_joints3d"][:, HEAD_JOINT:HEAD_JOINT + 1], drive["camera_K"])
    after, _ = render.project(body[:, HEAD_JOINT:HEAD_JOINT + 1], drive["camera_K"])
    shift = (after - before)[:, 0]
    return np.where(np.isfinite(shift), shift, 0.0)


def control_maps(drive: Annotations, body: np.ndarray, hands, transform: np.ndarray, size: tuple[int, int],
                 ref_radius_px: float, cfg) -> np.ndarray:
    """(T, H, W, 6) uint8 [skeleton ; head sphere] maps of the driving video in the output frame."""
    hv = drive["head_valid"].astype(bool)
    target = ref_radius_px / max(render.transform_scale(transform), 1e-9)  # in driving pixels
    radius = drive["head_radius"]
    if ref_radius_px > 0:
        radius = render.retarget_head_radius(radius, target, hv)
    return render.render_control_maps(
        size, cfg.render, joints3d=body, joint_conf=drive["body_conf"], K=drive["camera_K"],
        head_center=drive["head_center"] + head_shift(drive, body), head_rotation=drive["head_rotation"],
        head_radius=radius, head_valid=hv, joint_names=BODY_JOINT_NAMES, hands3d=hands,
        hand_conf=drive["hand_conf"] if hands is not None else None, transform=transform)


def face_tensor(ann: Annotations, crop_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, 3, S, S) face crops in [-1, 1] and (1, T) validity."""
    import cv2

    faces = ann["face_crops"]
    if faces.shape[1] != crop_size:
        faces = np.stack([cv2.resize(f, (crop_size, crop_size), interpolation=cv2.INTER_AREA) for f in faces])
    x = torch.from_numpy(np.ascontiguousarray(faces)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x[None], torch.from_numpy(ann["face_valid"].astype(bool))[None]


def pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- the whole job


@dataclass
class Settings:
    """What :func:`animate` needs besides the inputs (``conf/infer.yaml``)."""

    segment_frames: int | None = None  # None: the preset's (73)
    steps: int | None = None  # None: the preset's
    guidance_ref: float | None = None
    guidance_motion: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    max_side: int = 1024  # frames are annotated at most this large
    bone_adjust: bool = True
    placement: str = "reference"  # reference | driving
    use_face: bool = True


@dataclass
class Prepared:
    """Everything sampling needs, and what the record reports."""

    refs: list[tuple[str, np.ndarray]]  # (name, RGB crop at the output size)
    ref_ann: list[Annotations]
    driving: Driving
    drive_ann: Annotations
    size: tuple[int, int]
    transform: np.ndarray  # driving pixels -> output pixels
    maps: np.ndarray  # (T, H, W, 6) uint8
    ref_radius_px: float
    ref_transforms: list[np.ndarray] = field(default_factory=list)  # reference pixels -> output pixels


@dataclass
class References:
    """The reference image(s) read, annotated and cropped to the output size."""

    crops: list[tuple[str, np.ndarray]]  # (name, RGB crop at the output size)
    ann: list[Annotations]
    size: tuple[int, int]
    transforms: list[np.ndarray]  # reference pixels -> output pixels
    radius_px: float  # the first reference's head radius in output pixels (0: no head found)


def prepare_references(exp: Export, annotator: Annotator, reference, s: Settings) -> References:
    """Steps 2-4 for the references: read, annotate, choose the output size, crop."""
    from train.data.sample import crop_box, resize_crop

    from .annotate import AnnotationError

    cfg = exp.cfg
    refs = read_references(reference)
    ref_ann = []
    for name, img in refs:
        a = annotator.annotate(img[None], 25.0, name)
        if not a.person[0]:
            raise AnnotationError(f"reference {name}: no person detected in it (the model animates a person)")
        ref_ann.append(a)
    multiple = cfg.vae.spatial_compression * cfg.dit.patch_size[1]
    h0, w0 = refs[0][1].shape[:2]
    if s.height and s.width:
        size = (s.height // multiple * multiple, s.width // multiple * multiple)
    else:
        size = output_size(w0 / h0, exp.train_area or 512 * 512, multiple)
    crops, ref_transforms = [], []
    for (name, img), a in zip(refs, ref_ann):
        box = crop_box(img.shape[1], img.shape[0], size[0], size[1], subject_center(a))
        crops.append((name, resize_crop(img, box, *size)))
        ref_transforms.append(render.crop_resize_transform(box, size))
    r0 = ref_ann[0]
    ref_radius_px = 0.0
    if r0["head_valid"][0]:
        ref_radius_px = float(r0["head_radius"][0]) * render.transform_scale(ref_transforms[0])
    return References(crops, ref_ann, size, ref_transforms, ref_radius_px)


def prepare(exp: Export, annotator: Annotator, reference, driving_path: str, s: Settings) -> Prepared:
    """Steps 2-5: read, annotate, place and draw (see the module docstring)."""
    from train.data.sample import crop_box

    from .annotate import fill_missing

    cfg = exp.cfg
    r = prepare_references(exp, annotator, reference, s)
    ref_ann, size, ref_transforms = r.ann, r.size, r.transforms
    driving = read_video(driving_path, s.fps, s.max_side, s.max_frames)
    drive_ann = fill_missing(annotator.annotate(driving.frames, driving.fps, driving_path), driving_path)
    dh, dw = driving.frames.shape[1:3]
    centers = [subject_center(drive_ann, t) for t in range(len(drive_ann.person))]
    d_box = crop_box(dw, dh, size[0], size[1], np.median(centers, 0))
    transform = render.crop_resize_transform(d_box, size)
    body, hands = adjusted_joints(drive_ann, ref_ann[0], cfg.render.min_confidence, s.bone_adjust)
    if s.placement == "reference":
        mc = cfg.render.min_confidence
        first = [joints_box(body[t], drive_ann["body_conf"][t], drive_ann["camera_K"][t], transform, mc)
                 for t in range(min(5, len(body)))]
        first = [b for b in first if b is not None]
        ref_box = joints_box(ref_ann[0]["body_joints3d"][0], ref_ann[0]["body_conf"][0], ref_ann[0]["camera_K"][0],
                             ref_transforms[0], mc)
        transform = placement_transform(ref_box, np.median(first, 0) if first else None) @ transform
    elif s.placement != "driving":
        raise ConfigError(f"placement={s.placement!r}: use reference or driving")
    maps = control_maps(drive_ann, body, hands, transform, size, r.radius_px, cfg)
    return Prepared(r.crops, ref_ann, driving, drive_ann, size, transform, maps, r.radius_px, ref_transforms)


def conditions(exp: Export, refs: list[np.ndarray], prep: Prepared, use_face: bool, dtype,
               face_tokens: torch.Tensor | None = None) -> Conditions:
    """The model's conditions for the whole driving video (segments take their frames from it); the face motion
    tokens come from ``face_tokens`` (1, T, D) when given (from speech: infer/talking.py), else from the driving
    video's face crops."""
    device = next(exp.model.parameters()).device
    ref_pix = torch.cat([pixels(r[None]) for r in refs])  # (R, 3, 1, H, W): each reference a one-frame clip
    ref_lat = exp.vae.encode(ref_pix.to(device)).permute(2, 1, 0, 3, 4)  # (1, C, R, h, w)
    pose = render.maps_to_tensor(prep.maps)[None].to(device)
    if face_tokens is not None:
        return Conditions(ref_lat.to(dtype), pose.to(dtype), face_tokens=face_tokens.to(device, dtype))
    face, valid = (None, None)
    if use_face:
        face, valid = face_tensor(prep.drive_ann, exp.cfg.face_encoder.crop_size)
        face, valid = face.to(device, dtype), valid.to(device)
    return Conditions(ref_lat.to(dtype), pose.to(dtype), face, valid)


def sample_video(exp: Export, cond: Conditions, n_frames: int, s: Settings, progress=None) -> np.ndarray:
    """(T, H, W, 3) uint8 of ``n_frames`` frames sampled in segments."""
    g = torch.Generator(device=cond.ref_latents.device).manual_seed(s.seed)
    segments = generate_long(exp.model, cond, exp.cfg.flow, n_frames, generator=g, steps=s.steps,
                             guidance_ref=s.guidance_ref, guidance_motion=s.guidance_motion, use_face=s.use_face,
                             segment_frames=s.segment_frames, on_step=progress)
    video = decode_segments(exp.vae, [x.float() for x in segments], n_frames)
    return frames_uint8(video[0])


def total_steps(exp: Export, n_frames: int, s: Settings) -> int:
    """Sampling steps of a whole video (for the progress bar)."""
    seg = s.segment_frames or exp.cfg.flow.segment_frames
    return len(segment_plan(n_frames, seg, exp.cfg.vae.temporal_compression)) * (s.steps or exp.cfg.flow.sample_steps)


def side_by_side(driving: np.ndarray, maps: np.ndarray, output: np.ndarray) -> np.ndarray:
    """(T, H, 3 W, 3): the driving frames letterboxed to the output size | skeleton + sphere | output."""
    from train.data.sample import letterbox

    h, w = output.shape[1:3]
    drive = np.stack([letterbox(f, h, w) for f in driving[: len(output)]])
    controls = np.maximum(maps[: len(output), ..., :3], maps[: len(output), ..., 3:6])
    return np.concatenate([drive, controls, output], axis=2)


def record(exp: Export, prep: Prepared, s: Settings, extra: dict) -> dict:
    """JSON-ready: what was used to make the video."""
    from dataclasses import asdict

    f = exp.cfg.flow
    return {
        "weights": str(exp.weights_path), "weights_sha256": exp.weights_sha256, "preset": exp.cfg.name,
        "references": [name for name, _ in prep.refs], "driving": prep.driving.path,
        "frames": int(len(prep.driving.frames)), "fps": prep.driving.fps, "source_fps": prep.driving.source_fps,
        "size": {"height": prep.size[0], "width": prep.size[1]},
        "driving_frames_without_person": prep.drive_ann.filled,
        "driving_damaged_stretches_s": [list(d) for d in prep.driving.damaged],
        "settings": {**asdict(s), "segment_frames": s.segment_frames or f.segment_frames,
                     "steps": s.steps or f.sample_steps,
                     "guidance_ref": f.guidance_ref if s.guidance_ref is None else s.guidance_ref,
                     "guidance_motion": f.guidance_motion if s.guidance_motion is None else s.guidance_motion},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra,
    }
