"""Body stage: the main subject and its SMPL-X body joints in the camera frame (paper 3.2, "3D Body Skeletons").

Per clip: a body backend finds every person in every frame; the main subject is tracked by box
overlap (tracking.py); its metric, camera-aligned joints are placed in the camera frame of the stored
clip (intrinsics: geometry.intrinsics) so that they project onto the detected 2D joints
(geometry.place_on_image). Frames without the subject stay zero with ``subject_valid = 0`` and
``body_conf = 0``: marked, never filled in. The shot scale (portrait / upper_body / full_body) of the
clip is the majority over frames of what the visible joints reach.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..schema import BODY_JOINT_NAMES, BODY_SMPLX_INDEX, N_BODY, N_SMPLX_JOINTS, SHOT_SCALES, SMPLX_FIT_GROUPS
from ..stage import OK, run_clip_stage
from .backends import BodyBackend, BodyFrame, KeypointsBackend, load_backend
from .common import BackendClipStage, finite_or_none, frac, timestamps_ms
from .geometry import intrinsics, lift_to_rays, place_on_image, project, smooth_series
from .tracking import distinct_people, main_subject

_J = {n: i for i, n in enumerate(BODY_JOINT_NAMES)}
_FEET = [_J[n] for n in ("left_ankle", "right_ankle", "left_heel", "right_heel", "left_big_toe", "right_big_toe")]
_HIPS = [_J["left_hip"], _J["right_hip"]]
_ELBOWS = [_J["left_elbow"], _J["right_elbow"]]


def shot_scale_of_frame(visible: np.ndarray) -> str:
    """What the visible joints reach: full_body (a foot and a hip), upper_body (a hip or an elbow), portrait."""
    if visible[_FEET].any() and visible[_HIPS].any():
        return "full_body"
    if visible[_HIPS].any() or visible[_ELBOWS].any():
        return "upper_body"
    return "portrait"


def shot_scale(conf: np.ndarray, inside: np.ndarray, valid: np.ndarray, min_conf: float) -> str:
    """The clip's shot scale: majority over frames with the subject ('' when it is never seen)."""
    votes = Counter(shot_scale_of_frame((conf[t] >= min_conf) & inside[t]) for t in np.flatnonzero(valid))
    if not votes:
        return ""
    best = max(votes.values())
    return next(s for s in reversed(SHOT_SCALES) if votes.get(s) == best)  # ties: the wider shot


class BodyStage(BackendClipStage):
    """Subject tracking + SMPL-X body joints (``subject`` and ``body`` field groups)."""

    name = "body"
    reads = ("frames", "timestamps", "frame_index", "video_key", "width", "height")
    writes = ("subject_box", "subject_valid", "person_count", "camera_K", "body_joints3d", "body_joints2d",
              "body_conf", "body_filled", "body_fit_px",
              "m_shot_scale", "m_person_count_max", "m_subject_valid_frac", "m_body_fit_px",
              # the SMPL-X fit (params.fit set: annotators=full); absent otherwise
              "smplx_valid", "smplx_betas", "smplx_global_orient", "smplx_body_pose", "smplx_hand_pose",
              "smplx_jaw_pose", "smplx_transl", "smplx_joints3d", "smplx_fit_px", "m_smplx_valid_frac",
              "m_smplx_fit_s", *(f"m_smplx_fit_px_{g}" for g in SMPLX_FIT_GROUPS))

    backend_kind = BodyBackend

    @dataclass
    class Params:
        backend: dict[str, Any] = field(default_factory=dict)  # {target: ..., params: {...}}
        focal_ratio: float = 1.0  # f = focal_ratio * max(W, H) px, principal point at the centre
        min_conf: float = 0.5  # joints at least this sure are "visible" (boxes, shot scale)
        box_pad: float = 0.15  # person box: visible joints' box grown by this fraction of its size per side
        track_min_iou: float = 0.2  # a detection continues a track when its box overlaps this much
        track_max_gap: int = 5  # frames a track may miss before it ends
        same_person_dist: float = 0.15  # detections this close (tracking.distinct_people) are one person
        smooth_sigma: float = 1.0  # temporal Gaussian (frames) on 2D joints and depths; 0: off
        # SMPL-X fit (smplx_fit.FitParams as a dict; null: no fit, body joints are the backend's)
        fit: dict[str, Any] | None = None
        # 2D keypoints the fit uses: a KeypointsBackend run top-down on the tracked subject's boxes
        # ({target, params}); null: the body backend's own joints
        keypoints: dict[str, Any] | None = None
        fitted_conf: float = 0.5  # confidence of a fitted joint that has no keypoint of its own

    def __init__(self, params: dict | None = None):
        super().__init__(params)
        self.keypoints = (None if not self.params.keypoints else
                          load_backend(self.params.keypoints, KeypointsBackend, "annotators.body.params.keypoints"))
        self.fitter = None

    def setup(self) -> None:
        # The keypoints model first: importing mmpose loads torch's triton (CUDA builds of torch), whose bundled LLVM
        # crashes the process (SIGSEGV) when Mesa's LLVM is already loaded, which MediaPipe's GPU-delegate check
        # loads where EGL is Mesa; the other order works (checked: torch 2.14.1 + triton, Mesa llvmpipe).
        if self.keypoints is not None:
            self.keypoints.setup()
        super().setup()
        self.filled = np.array([n in self.backend.filled for n in BODY_JOINT_NAMES])
        if self.params.fit is not None:
            from .smplx_fit import FitParams, SMPLXFitter

            self.fitter = SMPLXFitter(FitParams(**self.params.fit))

    def fit_input(self, frames: np.ndarray, people: list[BodyFrame], main: np.ndarray, box: np.ndarray,
                  K: np.ndarray):
        """The subject's keypoints as the fit takes them (``smplx_fit.FitClip``) and their confidences."""
        from .smplx_fit import FitClip

        T = len(frames)
        valid = main >= 0
        kp, kconf = np.zeros((T, N_SMPLX_JOINTS, 2)), np.zeros((T, N_SMPLX_JOINTS))
        init3d, init_conf = np.zeros((T, N_SMPLX_JOINTS, 3)), np.zeros((T, N_SMPLX_JOINTS))
        for t in np.flatnonzero(valid):
            fr, i = people[t], main[t]
            kp[t, BODY_SMPLX_INDEX] = fr.joints2d[i]
            kconf[t, BODY_SMPLX_INDEX] = fr.conf[i] * self.filled
            init3d[t, BODY_SMPLX_INDEX] = fr.joints3d[i]  # metric, camera-aligned: the initial orientation
            init_conf[t, BODY_SMPLX_INDEX] = fr.conf[i] * self.filled
        if self.keypoints is not None:
            kc = self.keypoints.estimate(frames, box, valid)
            kp, kconf = kc.joints2d, kc.conf * valid[:, None]
        return FitClip(kp, kconf, K, valid, init3d, init_conf, subject_height_px=box[:, 3] - box[:, 1]), kconf

    def person_boxes(self, fr: BodyFrame, width: int, height: int) -> np.ndarray:
        """(P, 4) boxes: the backend's, or the padded box of each person's visible joints."""
        if fr.boxes is not None:
            return np.asarray(fr.boxes, np.float64).reshape(-1, 4)
        out = np.zeros((len(fr.conf), 4))
        for k in range(len(fr.conf)):
            vis = fr.conf[k] >= self.params.min_conf
            if not vis.any():
                vis = fr.conf[k] > 0
            if not vis.any():
                vis = self.filled
            p = fr.joints2d[k][vis]
            x0, y0 = p.min(0)
            x1, y1 = p.max(0)
            pad = self.params.box_pad * max(x1 - x0, y1 - y0, 1.0)
            out[k] = np.clip([x0 - pad, y0 - pad, x1 + pad, y1 + pad], 0, [width, height, width, height])
        return out

    def distinct(self, fr: BodyFrame, width: int, height: int) -> BodyFrame:
        """The frame's detections less the duplicates of one person (tracking.distinct_people)."""
        keep = distinct_people(fr.joints2d, fr.conf, self.person_boxes(fr, width, height),
                               min_conf=self.params.min_conf, max_dist=self.params.same_person_dist)
        if len(keep) == len(fr.conf):
            return fr
        return BodyFrame(joints2d=fr.joints2d[keep], joints3d=fr.joints3d[keep], conf=fr.conf[keep],
                         boxes=None if fr.boxes is None else np.asarray(fr.boxes).reshape(-1, 4)[keep])

    def process(self, row: dict) -> dict:
        obs = self.observe(row)
        return self.finish(obs, None if self.fitter is None else _raise_error(self.fitter.fit_many([obs["fit"][0]])[0]))

    def process_batch(self, rows: list[dict]) -> list[dict]:
        """With a SMPL-X fit: every clip of the batch observed first, then one fit of all of them
        (``SMPLXFitter.fit_many``: its time per frame falls with the frames per fit), then each clip finished.
        A clip that fails any step fails alone, with its reason; the fit's time is shared out by frames."""
        todo = [r for r in rows if r["status"] == OK and r["kind"] == "clip"]
        if self.fitter is None or len(todo) < 2:
            return super().process_batch(rows)
        obs: dict[int, dict] = {}

        def observe(row: dict) -> dict:
            obs[id(row)] = self.observe(row)
            return {}  # the clip's fields come with finish

        for r in todo:
            run_clip_stage(self, r, observe)
        ready = [r for r in todo if r["status"] == OK]
        fits = self.fitter.fit_many([obs[id(r)]["fit"][0] for r in ready]) if ready else []
        for r, res in zip(ready, fits):  # each fitted clip's share of the fit (FitResult.seconds) is its time
            r["timings"][self.name] = r["timings"].get(self.name, 0.0) + getattr(res, "seconds", 0.0)
            run_clip_stage(self, r, lambda row, res=res: self.finish(obs.pop(id(row)), _raise_error(res)))
        return rows

    def observe(self, row: dict) -> dict:
        """Everything of a clip but the SMPL-X fit: the subject tracked, its joints placed, the fit's input."""
        frames = row["frames"]
        T, H, W = frames.shape[:3]
        people = [self.distinct(fr, W, H) for fr in
                  self.backend.estimate(frames, timestamps_ms(row), self.continuity.new_sequence(row))]
        boxes = [self.person_boxes(fr, W, H) for fr in people]
        main = main_subject(boxes, W, H, min_iou=self.params.track_min_iou, max_gap=self.params.track_max_gap)
        K = intrinsics(W, H, self.params.focal_ratio)

        valid = main >= 0
        uv = np.zeros((T, N_BODY, 2))
        depth = np.zeros((T, N_BODY))
        conf = np.zeros((T, N_BODY), np.float32)
        box = np.zeros((T, 4), np.float32)
        fit = np.zeros(T, np.float32)
        for t in np.flatnonzero(valid):
            fr, i = people[t], main[t]
            w = fr.conf[i] * self.filled
            if w.sum() < 1e-3:
                w = self.filled.astype(np.float64)
            p3, fit[t] = place_on_image(fr.joints3d[i], fr.joints2d[i], K, w)
            uv[t], depth[t] = fr.joints2d[i], p3[:, 2]
            conf[t] = fr.conf[i] * self.filled
            box[t] = boxes[t][i]
        # Per-frame detections jitter by a few px (measured: docs/annotators.md); a short symmetric
        # Gaussian over the frames that have the subject damps it without lagging the motion.
        uv = smooth_series(uv, valid, self.params.smooth_sigma)
        depth = smooth_series(depth, valid, self.params.smooth_sigma)
        j2 = np.where(self.filled[None, :, None], uv, 0.0).astype(np.float32)
        j3 = np.zeros((T, N_BODY, 3), np.float32)
        for t in np.flatnonzero(valid):
            j3[t] = np.where(self.filled[:, None], lift_to_rays(depth[t], uv[t], K), 0.0)
        return {"T": T, "H": H, "W": W, "K": K, "valid": valid, "people": people, "box": box, "conf": conf,
                "j2": j2, "j3": j3, "fit_px": fit,
                "fit": None if self.fitter is None else self.fit_input(frames, people, main, box, K)}

    def finish(self, obs: dict, res) -> dict:
        """The clip's fields from its observation and its SMPL-X fit (``smplx_fit.FitResult``; None: no fit)."""
        T, W, H, K, valid, people = obs["T"], obs["W"], obs["H"], obs["K"], obs["valid"], obs["people"]
        box, conf, j2, j3, fit = obs["box"], obs["conf"], obs["j2"], obs["j3"], obs["fit_px"]
        extra = {}
        filled = self.filled
        if res is not None:
            kconf = obs["fit"][1]
            ok = res.valid
            # fitted frames: every skeleton joint from the fitted body (bone lengths are the body's); a joint
            # with a keypoint keeps its confidence, one without gets fitted_conf
            j3[ok] = res.joints3d[ok][:, BODY_SMPLX_INDEX]
            j2[ok] = project(j3[ok].astype(np.float64), K)
            conf[ok] = np.maximum(kconf[ok][:, BODY_SMPLX_INDEX], self.params.fitted_conf)
            filled = np.ones(N_BODY, bool) if ok.any() else filled
            fit_px = res.fit_px[ok]
            extra = {
                "smplx_valid": ok.astype(np.uint8), "smplx_betas": res.betas, "smplx_global_orient": res.global_orient,
                "smplx_body_pose": res.body_pose, "smplx_hand_pose": res.hand_pose, "smplx_jaw_pose": res.jaw_pose,
                "smplx_transl": res.transl, "smplx_joints3d": res.joints3d, "smplx_fit_px": res.fit_px,
                "m_smplx_valid_frac": frac(ok), "m_smplx_fit_s": round(res.seconds, 3),
                **{f"m_smplx_fit_px_{g}": finite_or_none(np.nanmedian(fit_px[:, k]) if np.isfinite(fit_px[:, k]).any()
                                                        else np.nan) for k, g in enumerate(SMPLX_FIT_GROUPS)},
            }
        inside = (j2[..., 0] >= 0) & (j2[..., 0] < W) & (j2[..., 1] >= 0) & (j2[..., 1] < H)
        count = np.array([len(fr.conf) for fr in people])
        return {**extra,
            "subject_box": box, "subject_valid": valid.astype(np.uint8),
            "person_count": np.minimum(count, 255).astype(np.uint8),
            "camera_K": np.repeat(K[None].astype(np.float32), T, axis=0),
            "body_joints3d": j3, "body_joints2d": j2, "body_conf": conf,
            "body_filled": filled.astype(np.uint8), "body_fit_px": fit,
            "m_shot_scale": shot_scale(conf, inside, valid, self.params.min_conf),
            "m_person_count_max": int(count.max(initial=0)),
            "m_subject_valid_frac": frac(valid),
            "m_body_fit_px": finite_or_none(np.median(fit[valid]) if valid.any() else np.nan),
        }


def _raise_error(res):
    """A fit result, or its FitError raised (the clip fails with the fit's reason)."""
    if isinstance(res, Exception):
        raise res
    return res
