"""python infer/run.py [reference=...] [driving=...] [driving_audio=...] [checkpoint=...] [output=...]: animate a
person.

Reference image(s) + a driving video -> an MP4 of the reference moving like the driving video (paper 3.1
"Inference"; the steps are in :mod:`infer.animate`), plus ``<output>.json`` (weights and their sha256, seed,
settings, driving frames without a person) and ``<output>_side_by_side.mp4`` [driving | controls | output].
With ``driving_audio`` the face talks from a sound file instead (:mod:`infer.talking`; a stage-4 export), the body
and head following the driving video if one is given, else held still with a small head sway.
With no argument: the no-argument training run's export, a shipped photo and a built-in sample video.
Exit codes: 0 done, 2 configuration error or an input that cannot be used (the message names it).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python infer/run.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

log = logging.getLogger("infer")


def default_reference(cfg) -> str:
    """The reference of the no-argument run: grace_hopper's photo."""
    import cv2

    from preprocess import demo_media

    root = Path(cfg.samples.dir or Path.home() / ".cache" / "dreamactor" / "samples")
    ref = root / "grace_hopper.png"
    if not ref.exists():
        root.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(ref), cv2.cvtColor(demo_media.load_photo("grace_hopper"), cv2.COLOR_RGB2BGR))
    return str(ref)


def default_driving(cfg) -> str:
    """The driving video of the no-argument run: the astronaut sample video."""
    from preprocess import demo_media

    s = cfg.samples
    return demo_media.ensure_samples(s.dir, size=s.size, n_frames=s.n_frames, fps=s.fps, megamind=False)[0]


def run(cfg) -> dict:
    """The whole job on a typed config (:class:`infer.config.InferConfig`); returns the record it writes."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from infer import animate as A
    from infer.annotate import Annotator
    from infer.pseudo_refs import pick_by_yaw, turning_annotations
    from infer.video_out import write_video

    t0 = time.time()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise A.InferError("device=cuda but no CUDA device is visible (device=cpu runs on the CPU)")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    talking = cfg.driving_audio is not None
    reference = cfg.reference or default_reference(cfg)
    driving = cfg.driving or (None if talking else default_driving(cfg))  # speech alone: the reference held still
    exp = A.load_export(cfg.checkpoint, cfg.weights, device, dtype, cfg.preset)
    annotator = Annotator(cfg.annotators, cfg.annotate.chunk_frames, cfg.annotate.delegate)
    s = A.Settings(segment_frames=cfg.sampling.segment_frames, steps=cfg.sampling.steps,
                   guidance_ref=cfg.sampling.guidance_ref, guidance_motion=cfg.sampling.guidance_motion,
                   seed=cfg.seed, height=cfg.video.height, width=cfg.video.width, fps=cfg.video.fps,
                   max_frames=cfg.video.max_frames, max_side=cfg.video.max_side, bone_adjust=cfg.bone_adjust,
                   placement=cfg.placement, use_face=cfg.sampling.use_face)
    log.info("annotating %s%s", reference, f" and {driving}" if driving else "")
    extra: dict = {}
    tokens = None
    if talking:  # the face from speech (the audio encoder), the body and head from the driving video or still
        from infer import talking as T

        speech = T.read_audio(cfg.driving_audio)
        if driving is None:
            fps = cfg.video.fps or T.STILL_FPS
            n = T.num_frames(speech, fps, cfg.video.max_frames)
            sway = (cfg.head_sway.yaw_deg, cfg.head_sway.pitch_deg)
            prep = T.prepare_still(exp, annotator, reference, n, fps, s, sway, cfg.seed)
        else:
            prep, n = T.prepare_driven(exp, annotator, reference, driving, speech, s)
        tokens = T.face_tokens_from_audio(exp, speech, prep.driving.fps, n, dtype)
        if exp.stage is not None and exp.stage != 4:
            log.warning("%s was written by stage %d: its audio encoder was never trained (stage=audio trains it)",
                        exp.weights_path, exp.stage)
        extra["driving_audio"] = {"path": cfg.driving_audio, "seconds": round(len(speech) / T.SAMPLE_RATE, 3),
                                  "body_and_head": "driving video" if driving else
                                  f"reference held still, head sway {sway[0]:g} / {sway[1]:g} deg (yaw / pitch)"}
    else:
        prep = A.prepare(exp, annotator, reference, driving, s)
        n = len(prep.driving.frames)
    refs = [img for _, img in prep.refs]
    if cfg.pseudo_refs.enabled:  # paper 3.3: the reference turning, then its yaw max/min/median frames
        p = cfg.pseudo_refs
        turn = turning_annotations(prep.ref_ann[0], p.frames, p.max_yaw_deg)
        hands = turn["hand_joints3d"] if "hand_joints3d" in turn else None
        maps = A.control_maps(turn, turn["body_joints3d"], hands, prep.ref_transforms[0], prep.size,
                              prep.ref_radius_px, exp.cfg)
        turn_prep = A.Prepared(prep.refs[:1], prep.ref_ann[:1], prep.driving, turn, prep.size,
                               prep.ref_transforms[0], maps, prep.ref_radius_px, prep.ref_transforms[:1])
        cond = A.conditions(exp, refs[:1], turn_prep, s.use_face, dtype)
        with tqdm(total=A.total_steps(exp, p.frames, s), desc="pseudo-references", unit="step") as bar:
            frames = A.sample_video(exp, cond, p.frames, s, progress=bar.update)
        gen = annotator.annotate(frames, prep.driving.fps, "pseudo-reference video")
        valid = gen["head_valid"].astype(bool) & gen.person if "head_valid" in gen else gen.person & False
        if valid.any():
            picks = pick_by_yaw(gen["head_ypr"][:, 0], valid)
            refs = refs + [frames[i] for i in picks.values()]
            extra["pseudo_references"] = {role: {"frame": i, "yaw_deg": float(gen["head_ypr"][i, 0])}
                                          for role, i in picks.items()}
        else:  # an undertrained model: no head to measure in what it made
            log.warning("pseudo-references: no head pose could be measured in any of the %d generated frames; "
                        "animating with the given reference(s) only", len(frames))
            extra["pseudo_references"] = {"skipped": "no head pose measured in the generated turning video"}
    cond = A.conditions(exp, refs, prep, s.use_face, dtype, face_tokens=tokens)
    t_sample = time.time()
    with tqdm(total=A.total_steps(exp, n, s), desc="animating", unit="step") as bar:
        video = A.sample_video(exp, cond, n, s, progress=bar.update)
    t_done = time.time()
    out = Path(cfg.output)
    audio = cfg.driving_audio if talking else prep.driving.path if cfg.copy_audio and prep.driving.has_audio else None
    write_video(out, video, prep.driving.fps, audio_from=audio)
    outputs = {"video": str(out)}
    if cfg.side_by_side:
        sbs = out.with_name(out.stem + "_side_by_side" + out.suffix)
        write_video(sbs, A.side_by_side(prep.driving.frames, prep.maps, video), prep.driving.fps, audio_from=audio)
        outputs["side_by_side"] = str(sbs)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    rec = A.record(exp, prep, s, {
        **extra, "outputs": outputs, "audio_copied": audio is not None, "references_used": len(refs),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "seconds": {"total": round(t_done - t0, 3), "sampling": round(t_done - t_sample, 3),
                    "per_output_frame": round((t_done - t_sample) / n, 4)},
        "peak_gpu_memory_gib": None if peak is None else round(peak, 3),
        "frames_out": int(len(video)), "mean_level": float(np.mean(video))})
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(rec, indent=1))
    print(f"[infer] video:  {out}\n[infer] record: {json_path}"
          + (f"\n[infer] side by side: {outputs['side_by_side']}" if "side_by_side" in outputs else ""), flush=True)
    return rec


@hydra.main(config_path="../conf", config_name="infer", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from infer.animate import InferError
    from infer.annotate import AnnotationError
    from infer.config import to_config
    from models.redact import install_log_redaction
    from models.typed_config import ConfigError

    install_log_redaction()
    try:
        run(to_config(dcfg))
    except (ConfigError, InferError, AnnotationError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from infer.config import to_config
    from models.command_line import exit_on_bad_command_line

    exit_on_bad_command_line("infer", to_config)
    main()
