"""SMPL-X fitting to 2D keypoints (SMPLify-X style, batched over every frame of a clip, or of several clips).

Unknowns: one shape (``betas``) per clip; per frame the global orientation, the 21 body joint rotations, both hands
(PCA coefficients of the model file's hand space), the jaw and the translation, under the clip's pinhole camera
(``geometry.intrinsics``: f = focal_ratio * max(W, H), principal point at the centre). Objective (all frames at once):

* data: confidence-weighted Geman-McClure robust distance (scale ``robust_px``) between the projected joints and
  the 2D keypoints, per keypoint in SMPL-X joint order (``N_SMPLX_JOINTS``: kinematic joints, vertex keypoints,
  face landmarks); normalised by the summed confidence so the weights below do not depend on how many are seen;
* priors: zero-mean isotropic Gaussians (L2) on the body pose (axis-angle), the hand PCA coefficients, the jaw
  and the betas: SMPLify-X's GMM pose prior and VPoser are stronger but licence-bound; these are what a plain
  file allows, and enough with whole-body keypoints;
* joint-angle limits: elbows and knees bend one way (SMPLify's four hinges: elbow rotation about y, knee about x);
  a squared hinge past the limit, zero inside it;
* temporal smoothness: squared 3D joint velocity between consecutive fitted frames (metres per frame).

Initialisation (so that a few hundred Adam steps converge): the body faces the camera or away from it as the image
order of its shoulders and hips says, or, when the body backend gives metric 3D joints (MediaPipe's world
landmarks), the rotation that aligns the model's rest torso with them (Kabsch); the translation is the closed-form
least-squares placement of the rotated rest joints (``geometry.solve_translation``). Stage 1 fits orientation and
translation on the torso, stage 2 everything.

Ambiguities (documented, tested): a body twice as large twice as far projects the same, so absolute depth rests on
the shape prior (mean body size); the recovered 3D joints are right up to that scale about the camera centre.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .optim import lbfgs_per_problem
from .smplx_model import (
    N_BODY_POSE,
    N_SMPLX_JOINTS,
    SMPLXJoints,
    matrix_to_axis_angle,
    rodrigues,
    smplx_joint_names,
)

# Joint groups whose 2D reprojection error is reported (schema field smplx_fit_px, index columns m_smplx_fit_px_*).
FIT_GROUPS = ("body", "feet", "left_hand", "right_hand", "face")


def joint_groups() -> dict[str, np.ndarray]:
    """Indices (into the 127 SMPL-X joints) of each group of :data:`FIT_GROUPS`."""
    names = smplx_joint_names()
    idx = {n: i for i, n in enumerate(names)}
    left = [idx["left_wrist"]] + [i for i, n in enumerate(names) if n.startswith("left_") and
                                  any(f in n for f in ("thumb", "index", "middle", "ring", "pinky"))]
    right = [idx["right_wrist"]] + [i for i, n in enumerate(names) if n.startswith("right_") and
                                    any(f in n for f in ("thumb", "index", "middle", "ring", "pinky"))]
    feet = [idx[n] for n in ("left_big_toe", "left_small_toe", "left_heel", "right_big_toe", "right_small_toe",
                             "right_heel")]
    face = list(range(76, N_SMPLX_JOINTS))
    body = [i for i in range(22)] + [idx[n] for n in ("nose", "right_eye", "left_eye", "right_ear", "left_ear")]
    return {"body": np.array(body), "feet": np.array(feet), "left_hand": np.array(sorted(left)),
            "right_hand": np.array(sorted(right)), "face": np.array(face)}


def mirror_permutation() -> np.ndarray:
    """For each of the 127 joints, the index of its left/right mirror image (itself on the midline)."""
    names = smplx_joint_names()
    idx = {n: i for i, n in enumerate(names)}
    swap = {}
    for n in names:
        for a, b in (("left", "right"), ("right", "left")):
            if n.startswith(a):
                swap[n] = b + n[len(a):]
    # face landmarks 76-126 (68-point scheme less the contour): mirror pairs as in the 68-point layout
    out = np.array([idx.get(swap.get(n, n), i) for i, n in enumerate(names)])
    pairs68 = [(17, 26), (18, 25), (19, 24), (20, 23), (21, 22), (31, 35), (32, 34), (36, 45), (37, 44),
               (38, 43), (39, 42), (40, 47), (41, 46), (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
               (60, 64), (61, 63), (65, 67)]
    for a, b in pairs68:
        out[76 + a - 17], out[76 + b - 17] = 76 + b - 17, 76 + a - 17
    return out


class FitError(RuntimeError):
    """The clip cannot be fitted; the message says why (recorded in failures.parquet)."""


@dataclass
class FitParams:
    """Settings of the SMPL-X fit (``annotators.body.params.fit``)."""

    model_path: str = ""  # SMPLX_NEUTRAL.npz (or .pkl); licence-gated, see docs/annotators.md
    num_betas: int = 10
    hand_pca: int = 12  # hand pose coefficients per hand (of the model file's 45-D hand PCA)
    device: str = "auto"  # auto: cuda when available, else cpu
    cpu_threads: int = 1  # torch threads of this worker on the CPU (0: torch's default)
    iters_torso: int = 40  # stage 1: orientation + translation on the torso joints
    iters: int = 200  # stage 2: everything
    lr: float = 0.03  # Adam's step (optimizer: adam)
    repair_rounds: int = 2  # restarts of badly fitted frames from their nearest well-fitted frame (see fit)
    optimizer: str = "lbfgs"  # lbfgs (strong Wolfe line search; iters = its iterations) | adam
    cuda_graph: bool = True  # on a GPU, several clips' evaluations replay as one CUDA graph (optim.lbfgs_per_problem)
    min_conf: float = 0.3  # keypoints below this confidence are ignored
    min_keypoints: int = 6  # a frame is fitted when it has at least this many confident body keypoints
    robust_px: float = 0.0  # Geman-McClure scale, px; 0: 20% of the image's long side (SMPLify: 100 px)
    init_bend: float = 0.3  # rad: elbows and knees start this bent (see fit)
    w_pose: float = 2e-4  # body pose L2 (per joint and axis), relative to the data term in px^2
    w_hand: float = 1e-4
    w_jaw: float = 1e-3
    w_betas: float = 5e-4
    w_limits: float = 1.0
    w_smooth: float = 2e3  # per (m / frame)^2
    w_face: float = 0.3  # keypoint weight of the 51 face landmarks relative to body joints
    max_body_px: float = 0.1  # a fitted frame's mean body error above this fraction of the subject's height fails
    group_weights: dict = field(default_factory=dict)  # optional per-group keypoint weights {body: 1, ...}


@dataclass
class FitResult:
    """SMPL-X parameters and joints of one clip (zeros and ``valid = False`` where not fitted)."""

    betas: np.ndarray  # (nb,)
    global_orient: np.ndarray  # (T, 3) axis-angle, camera frame
    body_pose: np.ndarray  # (T, 21, 3)
    hand_pose: np.ndarray  # (T, 2, 15, 3) full finger rotations (hand mean included), left then right
    jaw_pose: np.ndarray  # (T, 3)
    transl: np.ndarray  # (T, 3) metres, camera frame (smplx's transl: added to the posed joints)
    joints3d: np.ndarray  # (T, 127, 3) camera frame, metres
    joints2d: np.ndarray  # (T, 127, 2) their projections
    fit_px: np.ndarray  # (T, len(FIT_GROUPS)) mean reprojection error per group, px (NaN: no keypoint)
    valid: np.ndarray  # (T,) bool
    seconds: float = 0.0
    reason: str = ""  # why frames were dropped (empty when all were kept)


@dataclass
class FitClip:
    """One clip to fit (see :meth:`SMPLXFitter.fit`)."""

    kp2d: np.ndarray  # (T, 127, 2) px, SMPL-X joint order
    conf: np.ndarray  # (T, 127)
    K: np.ndarray  # (3, 3) intrinsics
    valid: np.ndarray | None = None  # (T,) frames to fit (None: all)
    init3d: np.ndarray | None = None  # (T, 127, 3) metric camera-aligned joints for the initial orientation
    init_conf: np.ndarray | None = None  # (T, 127)
    subject_height_px: np.ndarray | None = None  # (T,) scales the acceptance test


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# body_pose (index = joint - 1) and axis of the one-way hinges, and the sign of the allowed side (SMPLify)
_LIMITS = ((18 - 1, 1, -1.0), (19 - 1, 1, 1.0), (4 - 1, 0, 1.0), (5 - 1, 0, 1.0))
# betas and hand coefficients move the keypoints a few px per unit, rotations and translation ~100: scaled
# variables give L-BFGS a better conditioned problem (measured: half the iterations for the same error)
_PRECOND = 4.0
_FACING = np.diag([1.0, -1.0, -1.0])  # SMPL-X (y up, z forward) -> camera (y down): a person facing the camera


def _kabsch(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Rotation R minimising |R a_i - b_i| over centred point sets A, B (N, 3)."""
    A, B = A - A.mean(0), B - B.mean(0)
    U, _, Vt = np.linalg.svd(B.T @ A)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


class SMPLXFitter:
    """Fits SMPL-X to a clip's 2D keypoints (see module doc). Built once per worker (the model file is loaded)."""

    def __init__(self, params: FitParams, config_key: str = "annotators.body.params.fit.model_path"):
        self.p = params
        self.device = _device(params.device)
        self.model = SMPLXJoints(params.model_path, params.num_betas, config_key=config_key).to(self.device)
        self.groups = joint_groups()
        names = smplx_joint_names()
        self._torso = np.array([names.index(n) for n in ("left_hip", "right_hip", "left_shoulder", "right_shoulder",
                                                          "neck", "pelvis")])
        w = np.ones(N_SMPLX_JOINTS)
        w[self.groups["face"]] = params.w_face
        for g, gw in (params.group_weights or {}).items():
            w[self.groups[g]] *= gw
        self.kp_weight = w

    # ---- initialisation ------------------------------------------------------------------------
    def initial_rotation(self, kp: np.ndarray, conf: np.ndarray, init3d: np.ndarray | None,
                         init_conf: np.ndarray | None) -> np.ndarray:
        """Camera-frame rotation of the body in one frame (see module doc)."""
        rest = self.model.rest_joints.cpu().numpy().astype(np.float64)
        if init3d is not None and init_conf is not None:
            ok = init_conf[self._torso[:4]] > self.p.min_conf
            if ok.sum() >= 3:
                return _kabsch(rest[self._torso[:4]][ok], init3d[self._torso[:4]][ok])
        names = smplx_joint_names()
        pairs = [(names.index(f"left_{n}"), names.index(f"right_{n}")) for n in ("shoulder", "hip")]
        votes = [kp[a, 0] - kp[b, 0] for a, b in pairs if conf[a] > self.p.min_conf and conf[b] > self.p.min_conf]
        facing = not votes or np.mean(votes) >= 0  # the subject's left on image right: facing the camera
        R = _FACING.copy()
        if not facing:
            R = R @ np.diag([-1.0, 1.0, -1.0])  # turned by 180° about the body's vertical axis
        return R

    def initial_translation(self, R: np.ndarray, kp: np.ndarray, conf: np.ndarray, K: np.ndarray) -> np.ndarray:
        """Closed-form translation of the rest body rotated by ``R`` onto the confident body keypoints."""
        from .geometry import solve_translation

        rest = self.model.rest_joints.cpu().numpy().astype(np.float64)
        body = self.groups["body"][:22]
        w = np.where(conf[body] > self.p.min_conf, conf[body], 0.0)
        t = solve_translation(rest[body] @ R.T, kp[body], K, w)
        if not np.isfinite(t).all() or t[2] < 0.3:
            t = np.array([0.0, 0.0, 3.0])
        return t

    # ---- the fit -----------------------------------------------------------------------------------
    def fit(self, kp2d: np.ndarray, conf: np.ndarray, K: np.ndarray, valid: np.ndarray | None = None,
            init3d: np.ndarray | None = None, init_conf: np.ndarray | None = None,
            subject_height_px: np.ndarray | None = None) -> FitResult:
        """Fit a clip: ``kp2d`` (T, 127, 2) px and ``conf`` (T, 127) in SMPL-X joint order, intrinsics ``K``;
        ``valid`` (T,) frames to fit; ``init3d``/``init_conf`` (T, 127, 3)/(T, 127): metric camera-aligned joints
        for the initial orientation (optional); ``subject_height_px`` (T,) the subject box height, which scales the
        per-frame acceptance test (``max_body_px``). Raises :class:`FitError` when no frame can be fitted."""
        out = self.fit_many([FitClip(kp2d, conf, K, valid, init3d, init_conf, subject_height_px)])[0]
        if isinstance(out, FitError):
            raise out
        return out

    def fit_many(self, clips: list[FitClip]) -> list[FitResult | FitError]:
        """Fit several clips at once: each keeps its own shape, camera, objective, L-BFGS history and step
        (:func:`lbfgs_per_problem`) and acceptance test, so a clip fitted beside others ends where it would alone,
        while every evaluation is one batched forward and backward for all of them. An evaluation costs about what
        one clip's does on a GPU (a few hundred small kernels, and the loss read on the host for the line search),
        so the time per frame falls with the frames per fit (docs/performance.md). A clip that cannot be fitted
        gets its :class:`FitError` in its place; the others are fitted. One clip: torch's L-BFGS with the
        strong-Wolfe line search."""
        t0 = time.perf_counter()
        torch.set_flush_denormal(True)  # denormal gradients made CPU steps 10x slower (measured)
        if self.device.type == "cpu" and self.p.cpu_threads:
            torch.set_num_threads(self.p.cpu_threads)  # small ops: 2 threads on 2 busy cores ran 20x slower
        p, dev = self.p, self.device
        body = self.groups["body"]
        results: list[FitResult | FitError | None] = [None] * len(clips)
        active: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (clip, conf, valid, fitted frames)
        for i, cl in enumerate(clips):
            T = len(cl.kp2d)
            conf = np.where(np.isfinite(cl.conf) & (cl.conf >= p.min_conf), cl.conf, 0.0)
            valid = np.ones(T, bool) if cl.valid is None else np.asarray(cl.valid, bool).copy()
            n_body = (conf[:, body] > 0).sum(1)
            frames = np.flatnonzero(valid & (n_body >= p.min_keypoints))
            if len(frames) == 0:
                results[i] = FitError(
                    f"no frame to fit: the subject was found in {int(valid.sum())} of {T} frames, and none of them "
                    f"has {p.min_keypoints} body keypoints of confidence >= {p.min_conf} "
                    f"(most: {int(n_body[valid].max(initial=0))})")
                continue
            active.append((i, conf, valid, frames))
        if not active:
            return results

        # every fitted frame of every clip, one after the other; cid: the frame's clip (index into active)
        F_c = np.array([len(fr) for _, _, _, fr in active])
        F = int(F_c.sum())
        cid_np = np.repeat(np.arange(len(active)), F_c)
        R0, t_init, kp, cw, Ks, rho_c = [], [], [], [], [], []
        for i, conf, _, frames in active:
            cl = clips[i]
            r0 = [self.initial_rotation(cl.kp2d[t], conf[t], None if cl.init3d is None else cl.init3d[t],
                                        None if cl.init_conf is None else cl.init_conf[t]) for t in frames]
            R0 += r0
            t_init += [self.initial_translation(r, cl.kp2d[t], conf[t], cl.K) for r, t in zip(r0, frames)]
            kp.append(cl.kp2d[frames])
            cw.append(conf[frames] * self.kp_weight)
            Ks.append(np.repeat(np.asarray(cl.K)[None], len(frames), 0))
            rho_c.append(p.robust_px or 0.2 * 2 * float(max(cl.K[0, 2], cl.K[1, 2])))

        def tens(x):
            return torch.tensor(np.asarray(x), dtype=torch.float32, device=dev)

        target, c, Kf = tens(np.concatenate(kp)), tens(np.concatenate(cw)), tens(np.concatenate(Ks))
        cid = torch.as_tensor(cid_np, device=dev)
        rho = tens(rho_c)[cid]  # (F,) each frame's robust scale
        w_frame = tens(1.0 / F_c)[cid]  # (F,): a clip's per-frame terms are means over its frames
        R0t = tens(np.stack(R0))
        d_orient = torch.zeros(F, 3, device=dev, requires_grad=True)
        transl = tens(np.stack(t_init)).requires_grad_(True)
        # elbows and knees start slightly bent the way they can bend: straight, a foreshortened limb has no
        # gradient towards either side (bending forwards or backwards shortens it alike) and the fit stalls there
        bp0 = torch.zeros(F, N_BODY_POSE, 3, device=dev)
        for j, a, sgn in _LIMITS:
            bp0[:, j, a] = sgn * p.init_bend
        body_pose = bp0.requires_grad_(True)
        hands = torch.zeros(F, 2, p.hand_pca, device=dev, requires_grad=True)
        jaw = torch.zeros(F, 3, device=dev, requires_grad=True)
        betas = torch.zeros(len(active), self.model.num_betas, device=dev, requires_grad=True)
        # consecutive fitted frames of one clip, averaged over the clip's pairs
        offsets = np.concatenate([[0], np.cumsum(F_c)])  # clip k's frames: offsets[k]:offsets[k + 1]
        pair_w = np.zeros(max(F - 1, 0))  # pair f: frames f and f + 1; a pair across two clips weighs 0
        for k, (_, _, _, fr) in enumerate(active):
            pair_w[offsets[k]:offsets[k + 1] - 1] = (np.diff(fr) == 1) / max(len(fr) - 1, 1)
        pair_w = tens(pair_w)
        lim_idx = torch.tensor([j for j, _, _ in _LIMITS], device=dev)
        lim_ax = torch.tensor([a for _, a, _ in _LIMITS], device=dev)
        lim_sign = tens([s for _, _, s in _LIMITS])
        torso = torch.tensor(self._torso, device=dev)
        zeros_eyes = torch.zeros(F, 2, 3, device=dev)
        n_clips = len(active)

        def joints():
            # the body's global rotation = exp(d_orient) @ R0: start at the initialisation, no axis-angle singularity
            R = rodrigues(d_orient) @ R0t
            local = torch.cat([body_pose, jaw[:, None], zeros_eyes], 1)  # joints 1-24
            hp = self.model.hand_pose(hands * _PRECOND).reshape(F, 30, 3)
            full = torch.cat([torch.zeros(F, 1, 3, device=dev), local, hp], 1)  # root rotation applied below
            J = self.model((betas * _PRECOND)[cid], full)
            root = J[:, :1]
            J = (J - root) @ R.transpose(1, 2) + root  # rotate about the root joint, as smplx's global_orient does
            return J + transl[:, None], R

        def project(J):
            q = torch.einsum("fkj,fij->fki", J, Kf)
            return q[..., :2] / q[..., 2:3].clamp(min=1e-3)

        def per_clip(x, owner=cid):  # (F,) -> (clips,) sums
            return torch.zeros(n_clips, device=dev, dtype=x.dtype).index_add_(0, owner, x)

        def data_term(uv, mask=None):  # (clips,)
            cc = c if mask is None else c * mask
            d2 = ((uv - target) ** 2).sum(-1)
            r2 = (rho ** 2)[:, None]
            gm = r2 * d2 / (d2 + r2)
            return per_clip((cc * gm).sum(-1)) / per_clip(cc.sum(-1)).clamp(min=1e-6)

        torso_mask = torch.zeros(N_SMPLX_JOINTS, device=dev)
        torso_mask[torso] = 1.0
        def torso_stage() -> None:  # its last loss (and the autograd graph behind it) must not outlive it: a graph
            opt = torch.optim.Adam([d_orient, transl], lr=p.lr)  # kept alive ties the leaves' gradient accumulators
            for _ in range(p.iters_torso):  # to the default stream, and the L-BFGS stage's CUDA graph capture fails
                opt.zero_grad()
                J, _ = joints()
                data_term(project(J), torso_mask).sum().backward()
                opt.step()
            d_orient.grad, transl.grad = None, None

        torso_stage()

        rho_clip, pair_cid = tens(rho_c), cid[:-1]  # a pair belongs to its first frame's clip

        def objective():  # (clips,): each clip's own objective
            J, _ = joints()
            loss = data_term(project(J))
            frame_prior = (p.w_pose * (body_pose ** 2).flatten(1).sum(1)
                           + p.w_hand * ((hands * _PRECOND) ** 2).flatten(1).sum(1) + p.w_jaw * (jaw ** 2).sum(1))
            beta_prior = p.w_betas * ((betas * _PRECOND) ** 2).sum(1)
            prior = per_clip(w_frame * frame_prior * rho) + beta_prior * rho_clip
            bent = body_pose[:, lim_idx, lim_ax] * lim_sign  # negative: past the hinge's limit
            limits = p.w_limits * per_clip(w_frame * (torch.relu(-bent) ** 2).sum(1) * rho)
            smooth = p.w_smooth * per_clip(((J[1:] - J[:-1]) ** 2).sum(-1).mean(-1) * pair_w, pair_cid)
            return loss + prior + limits + smooth

        params = [d_orient, transl, body_pose, hands, jaw, betas]
        per_frame = [d_orient, transl, body_pose, hands, jaw]
        owners = [cid] * len(per_frame) + [torch.arange(n_clips, device=dev)]  # the clip of each row of each

        def minimise(iters: int) -> None:
            # one clip on a GPU too: a replayed evaluation beats torch's L-BFGS (strong-Wolfe line search, host reads
            # at every trial point) there; one clip on the CPU keeps torch's
            if p.optimizer == "lbfgs" and (n_clips > 1 or (dev.type == "cuda" and p.cuda_graph)):
                lbfgs_per_problem(params, owners, objective, n_clips, iters, cuda_graph=p.cuda_graph)
                return
            if p.optimizer == "lbfgs":
                opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, history_size=20, tolerance_grad=1e-9,
                                        tolerance_change=1e-12, line_search_fn="strong_wolfe")

                def closure():
                    opt.zero_grad()
                    loss = objective().sum()
                    loss.backward()
                    return loss

                opt.step(closure)
                return
            opt = torch.optim.Adam(params, lr=p.lr)
            for k in range(iters):
                opt.zero_grad()
                objective().sum().backward()
                opt.step()
                if k == iters // 2:  # a smaller step for the last half: converge instead of orbiting the minimum
                    for g in opt.param_groups:
                        g["lr"] = p.lr / 3

        def frame_error() -> np.ndarray:
            with torch.no_grad():
                J, _ = joints()
                e = ((project(J) - target) ** 2).sum(-1).sqrt() * (c > 0)
                return e.max(1).values.cpu().numpy()  # the worst keypoint: one limb off is a bad frame

        minimise(p.iters)
        # Repair from the previous (or next) frame: a frame whose limb went the wrong way in depth (forearm
        # towards vs away from the camera) sits in a local minimum its neighbours are not in; restart it from the
        # nearest well-fitted frame of its clip and minimise again.
        for _ in range(p.repair_rounds):
            e = frame_error()
            dst, src = [], []
            for k, (_, _, _, frames) in enumerate(active):
                ek = e[offsets[k]:offsets[k + 1]]
                bad = ek > np.median(ek) * 2 + 3.0
                if not bad.any() or bad.all():
                    continue
                good = np.flatnonzero(~bad)
                nearest = good[np.abs(frames[good][None, :] - frames[np.flatnonzero(bad)][:, None]).argmin(1)]
                dst += (offsets[k] + np.flatnonzero(bad)).tolist()
                src += (offsets[k] + nearest).tolist()
            if not dst:
                break
            with torch.no_grad():
                for x in per_frame:
                    x[torch.as_tensor(dst, device=dev)] = x[torch.as_tensor(src, device=dev)]
            minimise(max(p.iters // 2, 1))

        with torch.no_grad():
            J, R = joints()
            uv = project(J)
            hand_pose = self.model.hand_pose(hands * _PRECOND)
        J, R, uv = J.cpu().numpy().astype(np.float64), R.cpu().numpy(), uv.cpu().numpy().astype(np.float64)
        B = (betas * _PRECOND).detach().cpu().numpy()
        orient, pose = matrix_to_axis_angle(R), body_pose.detach().cpu().numpy()
        hand_pose, jaw_np = hand_pose.cpu().numpy(), jaw.detach().cpu().numpy()
        transl_np = transl.detach().cpu().numpy()
        seconds = time.perf_counter() - t0
        for k, (i, conf, _, frames) in enumerate(active):
            sl = slice(offsets[k], offsets[k + 1])
            results[i] = self._clip_result(clips[i], conf, frames, B[k], orient[sl], pose[sl], hand_pose[sl],
                                           jaw_np[sl], transl_np[sl], J[sl], uv[sl], seconds * F_c[k] / F)
        return results

    def _clip_result(self, cl: FitClip, conf: np.ndarray, frames: np.ndarray, betas, orient, pose, hand_pose, jaw,
                     transl, J, uv, seconds: float) -> FitResult | FitError:
        """One clip's :class:`FitResult` (its fitted frames in place, the rest zero and not valid), or its
        :class:`FitError` when no frame passes the acceptance test."""
        p, T, K = self.p, len(cl.kp2d), cl.K
        F = len(frames)
        out = FitResult(
            betas=betas, global_orient=np.zeros((T, 3)), body_pose=np.zeros((T, 21, 3)),
            hand_pose=np.zeros((T, 2, 15, 3)), jaw_pose=np.zeros((T, 3)), transl=np.zeros((T, 3)),
            joints3d=np.zeros((T, N_SMPLX_JOINTS, 3)), joints2d=np.zeros((T, N_SMPLX_JOINTS, 2)),
            fit_px=np.full((T, len(FIT_GROUPS)), np.nan), valid=np.zeros(T, bool))
        # the rotation about the root joint + transl is smplx.SMPLX's own global_orient / transl convention
        out.global_orient[frames] = orient
        out.body_pose[frames] = pose
        out.hand_pose[frames] = hand_pose
        out.jaw_pose[frames] = jaw
        out.transl[frames] = transl
        out.joints3d[frames], out.joints2d[frames] = J, uv
        err = np.linalg.norm(uv - cl.kp2d[frames], axis=-1)
        cf = conf[frames] > 0
        for g, name in enumerate(FIT_GROUPS):
            ix = self.groups[name]
            n = cf[:, ix].sum(1)
            out.fit_px[frames, g] = np.where(n > 0, (err[:, ix] * cf[:, ix]).sum(1) / np.maximum(n, 1), np.nan)
        height = (np.full(T, float(max(K[0, 2], K[1, 2]) * 2)) if cl.subject_height_px is None
                  else np.asarray(cl.subject_height_px, np.float64))
        ok = out.fit_px[frames, 0] <= p.max_body_px * np.maximum(height[frames], 1.0)
        out.valid[frames[ok]] = True
        if not ok.all():
            out.reason = (f"{int((~ok).sum())} of {F} frames off by more than max_body_px={p.max_body_px} of the "
                          f"subject's height (median body error {float(np.median(out.fit_px[frames[~ok], 0])):.1f} px)")
        for a in (out.global_orient, out.body_pose, out.hand_pose, out.jaw_pose, out.transl, out.joints3d,
                  out.joints2d):
            a[~out.valid] = 0.0
        out.fit_px[~out.valid] = np.nan
        if not out.valid.any():
            return FitError(f"the fit failed in every frame: {out.reason}")
        out.seconds = seconds
        return out
