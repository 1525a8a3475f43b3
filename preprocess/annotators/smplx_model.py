"""The SMPL-X body model for fitting: loaded through ``smplx``, evaluated only where the fit looks.

:class:`SMPLXJoints` loads a user-supplied SMPL-X model file (``SMPLX_NEUTRAL.npz`` or ``.pkl``, licence-gated:
docs/annotators.md) with ``smplx.SMPLX`` and returns the 127 joints ``smplx.SMPLX.forward`` returns
(``use_face_contour=False``: 55 kinematic joints, 21 vertex keypoints (nose, eyes, ears, feet, finger tips) and 51
face landmarks; names ``SMPLX_JOINT_NAMES``), with the same linear blend skinning, but skins only the ~170 vertices
those keypoints and landmarks sit on instead of all 10,475: a fit needs joints, not the mesh, and this makes one
forward pass of a 121-frame clip a few milliseconds on a CPU. ``tests/preprocess/annotators/test_smplx_fit.py``
checks it against ``smplx.SMPLX.forward`` joint for joint.

:func:`write_synthetic_model` writes a model file of the real structure (joint count, kinematic tree, vertex
count, every array smplx reads) with a human-proportioned rest skeleton and random shape/pose blend shapes: what
tests and ``bench/annotators_gpu.py`` use where the licensed file is not available.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .assets import ModelFileError

N_SMPLX_JOINTS = 127  # what smplx.SMPLX(use_face_contour=False).forward returns
N_KINEMATIC = 55
N_BODY_POSE = 21  # body_pose joints (1..21); 0 is global_orient, 22 jaw, 23-24 eyes, 25-54 fingers
N_HAND_JOINTS = 15
SMPLX_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 15, 15, 15,
                 20, 25, 26, 20, 28, 29, 20, 31, 32, 20, 34, 35, 20, 37, 38,
                 21, 40, 41, 21, 43, 44, 21, 46, 47, 21, 49, 50, 21, 52, 53)

SMPLX_URL = "https://smpl-x.is.tue.mpg.de (register, accept the licence, download 'SMPL-X v1.1', models/smplx/)"


def smplx_joint_names() -> tuple[str, ...]:
    """Names of the 127 fitted joints, ``smplx.joint_names.JOINT_NAMES[:127]``."""
    from smplx.joint_names import JOINT_NAMES

    return tuple(JOINT_NAMES[:N_SMPLX_JOINTS])


def missing_model_error(path, config_key: str) -> ModelFileError:
    """The error for an absent SMPL-X model file: what it is, where to get it, which key sets it."""
    return ModelFileError(
        f"SMPL-X model file {path} is missing. It is licence-gated (non-commercial research licence of MPI-IS): "
        f"download it from {SMPLX_URL} and set {config_key}=/path/to/SMPLX_NEUTRAL.npz")


def rodrigues(aa: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of axis-angle vectors (..., 3); smooth at zero."""
    theta = torch.sqrt((aa * aa).sum(-1, keepdim=True) + 1e-12)
    k = aa / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    Kx = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand(Kx.shape)
    return eye + s * Kx + (1 - c) * (Kx @ Kx)


def matrix_to_axis_angle(R: np.ndarray) -> np.ndarray:
    """Axis-angle vectors (..., 3) of rotation matrices (..., 3, 3), via the quaternion (robust near pi)."""
    from scipy.spatial.transform import Rotation

    shape = R.shape[:-2]
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(*shape, 3)


class SMPLXJoints(torch.nn.Module):
    """The 127 joints of ``smplx.SMPLX`` from (betas, full pose, translation), skinning only the vertices they use."""

    def __init__(self, model_path: str | Path, num_betas: int = 10, config_key: str = "fit.model_path"):
        super().__init__()
        import smplx

        p = Path(model_path).expanduser()
        if not p.is_file():
            raise missing_model_error(p, config_key)
        ext = "pkl" if p.suffix == ".pkl" else "npz"
        # the file is a trusted, user-downloaded model (smplx reads .pkl with pickle, .npz with allow_pickle)
        m = smplx.SMPLX(str(p), ext=ext, num_betas=num_betas, use_pca=False, flat_hand_mean=True,
                        use_face_contour=False, num_expression_coeffs=10)
        self.num_betas = m.num_betas
        raw = _load_raw(p, ext)  # the hand PCA of the file (smplx keeps none with use_pca=False)
        comps = [np.asarray(_get(raw, p, f"hands_components{s}"), np.float32) for s in "lr"]
        means = [np.asarray(_get(raw, p, f"hands_mean{s}"), np.float32) for s in "lr"]
        parents = m.parents.clone()
        extra = m.vertex_joint_selector.extra_joints_idxs.long()
        lmk_v = m.faces_tensor[m.lmk_faces_idx].long()  # (51, 3) vertex ids of each landmark's triangle
        sel, inv = torch.unique(torch.cat([extra, lmk_v.reshape(-1)]), return_inverse=True)
        V = m.v_template.shape[0]
        posedirs = m.posedirs.reshape(m.posedirs.shape[0], V, 3)[:, sel]  # (486, S, 3)
        with torch.no_grad():
            self.register_buffer("J_template", m.J_regressor @ m.v_template)  # (55, 3)
            self.register_buffer("J_shapedirs", torch.einsum("jv,vcb->jcb", m.J_regressor, m.shapedirs))
        self.register_buffer("parents", parents)
        self.register_buffer("v_template", m.v_template[sel].clone())  # (S, 3)
        self.register_buffer("shapedirs", m.shapedirs[sel].clone())  # (S, 3, B)
        self.register_buffer("posedirs", posedirs.reshape(posedirs.shape[0], -1).clone())  # (486, S*3)
        self.register_buffer("weights", m.lbs_weights[sel].clone())  # (S, 55)
        self.register_buffer("extra_idx", inv[: len(extra)].clone())
        self.register_buffer("lmk_idx", inv[len(extra):].reshape(-1, 3).clone())
        self.register_buffer("lmk_bary", m.lmk_bary_coords.clone())
        self.register_buffer("hand_components", torch.from_numpy(np.stack(comps)))  # (2, C, 45)
        self.register_buffer("hand_mean", torch.from_numpy(np.stack(means)))  # (2, 45)
        self.register_buffer("rest_joints", self.J_template.clone())
        self._build_levels()
        del m

    def forward(self, betas: torch.Tensor, full_pose: torch.Tensor, transl: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 127, 3) joints of ``betas`` (B or 1, nb), axis-angle ``full_pose`` (B, 55, 3), ``transl`` (B, 3)."""
        B = full_pose.shape[0]
        betas = betas.expand(B, -1)
        rot = rodrigues(full_pose)  # (B, 55, 3, 3)
        J = self.J_template + torch.einsum("jcb,nb->njc", self.J_shapedirs, betas)
        joints, A = self.rigid_transform(rot, J)
        v = self.v_template + torch.einsum("scb,nb->nsc", self.shapedirs, betas)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(B, -1)
        v = v + (pose_feature @ self.posedirs).reshape(B, -1, 3)
        T = (self.weights @ A.reshape(B, N_KINEMATIC, 16)).reshape(B, -1, 4, 4)
        v = (T[..., :3, :3] @ v[..., None])[..., 0] + T[..., :3, 3]
        extra = v[:, self.extra_idx]
        lmk = (v[:, self.lmk_idx] * self.lmk_bary[None, :, :, None]).sum(2)
        out = torch.cat([joints, extra, lmk], 1)
        return out if transl is None else out + transl[:, None]

    def rigid_transform(self, rot: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posed joints (B, 55, 3) and skinning transforms (B, 55, 4, 4), as ``smplx.lbs.batch_rigid_transform``,
        one batched product per depth of the kinematic tree (12) instead of one per joint (55): 20x faster."""
        B = rot.shape[0]
        rel = J - torch.cat([torch.zeros_like(J[:, :1]), J[:, self.parents[1:]]], 1)
        bottom = self.bottom_row.to(rot.dtype).expand(B, N_KINEMATIC, 1, 4)
        local = torch.cat([torch.cat([rot, rel[..., None]], -1), bottom], -2)
        world = local[:, self.level_0]
        for d in range(1, self._n_levels):
            idx, ppos = getattr(self, f"level_{d}"), getattr(self, f"parent_pos_{d}")
            world = torch.cat([world, world[:, ppos] @ local[:, idx]], 1)
        world = world[:, self.joint_order]  # back to joint order
        joints = world[..., :3, 3]
        A = torch.cat([world[..., :3, :3], (joints - (world[..., :3, :3] @ J[..., None])[..., 0])[..., None]], -1)
        A = torch.cat([A, world[..., 3:, :]], -2)
        return joints, A

    def _build_levels(self) -> None:
        parents = self.parents.tolist()
        depth = [0] * N_KINEMATIC
        for j in range(1, N_KINEMATIC):
            depth[j] = depth[parents[j]] + 1
        levels = [[j for j in range(N_KINEMATIC) if depth[j] == d] for d in range(max(depth) + 1)]
        flat = [j for lv in levels for j in lv]
        pos = {j: k for k, j in enumerate(flat)}
        # buffers, so they follow the model to its device: an index tensor left on the host is copied to the GPU at
        # every use (a synchronous copy, and one that a CUDA graph cannot capture)
        self._n_levels = len(levels)
        for d, lv in enumerate(levels):
            self.register_buffer(f"level_{d}", torch.tensor(lv), persistent=False)
            if d:
                self.register_buffer(f"parent_pos_{d}", torch.tensor([pos[parents[j]] for j in lv]), persistent=False)
        self.register_buffer("joint_order", torch.tensor([pos[j] for j in range(N_KINEMATIC)]), persistent=False)
        self.register_buffer("bottom_row", torch.tensor([0.0, 0, 0, 1]), persistent=False)

    def hand_pose(self, coeffs: torch.Tensor) -> torch.Tensor:
        """(B, 2, 15, 3) finger rotations from PCA coefficients (B, 2, C) of the model's hand space."""
        C = coeffs.shape[-1]
        hp = self.hand_mean + torch.einsum("nsc,scd->nsd", coeffs, self.hand_components[:, :C])
        return hp.reshape(coeffs.shape[0], 2, N_HAND_JOINTS, 3)


def _load_raw(path: Path, ext: str):
    if ext == "npz":
        return np.load(path, allow_pickle=True)
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _get(raw, path: Path, key: str):
    try:
        return raw[key]
    except (KeyError, TypeError):
        raise ModelFileError(f"SMPL-X model file {path} has no {key!r}: not an SMPL-X model file") from None


# ---- a synthetic model of the real structure ------------------------------------------------------

def _rest_skeleton() -> np.ndarray:
    """(55, 3) rest joints of an adult, metres, SMPL-X axes (y up, x to the subject's left, z forward)."""
    half = {  # left side (x > 0) and centre; the right side mirrors x
        0: (0, 0, 0), 1: (0.06, -0.09, 0), 3: (0, 0.11, -0.01), 4: (0.10, -0.47, 0), 6: (0, 0.25, 0),
        7: (0.08, -0.87, -0.04), 9: (0, 0.31, 0.02), 10: (0.11, -0.93, 0.08), 12: (0, 0.52, -0.02),
        13: (0.07, 0.44, -0.01), 15: (0, 0.60, 0.01), 16: (0.17, 0.47, -0.02), 18: (0.43, 0.46, -0.04),
        20: (0.68, 0.46, -0.04), 22: (0, 0.58, 0.03), 23: (0.03, 0.67, 0.08),
    }
    J = np.zeros((N_KINEMATIC, 3))
    mirror = {1: 2, 4: 5, 7: 8, 10: 11, 13: 14, 16: 17, 18: 19, 20: 21, 23: 24}
    for j, p in half.items():
        J[j] = p
        if j in mirror:
            J[mirror[j]] = (-p[0], p[1], p[2])
    # fingers: index, middle, pinky, ring, thumb (SMPL-X order), three joints each, left hand from 25
    bases = {"index": (0.77, 0.0, 0.025), "middle": (0.78, 0.0, 0.0), "pinky": (0.75, 0.0, -0.05),
             "ring": (0.77, 0.0, -0.025), "thumb": (0.71, -0.01, 0.03)}
    step = {"thumb": (0.02, -0.01, 0.02)}
    for f, (x, dy, z) in enumerate(bases.values()):
        name = list(bases)[f]
        d = step.get(name, (0.03, 0.0, 0.0))
        for k in range(3):
            p = np.array([x, 0.46 + dy, z]) + k * np.array(d)
            J[25 + 3 * f + k] = p
            J[40 + 3 * f + k] = p * [-1, 1, 1]
    return J


def _extra_points(J: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """Rest positions (and the joint that carries them) of smplx's vertex keypoints (vertex_ids['smplx'])."""
    out = {"nose": ((0, 0.63, 0.11), 15), "reye": ((-0.03, 0.67, 0.09), 15), "leye": ((0.03, 0.67, 0.09), 15),
           "rear": ((-0.075, 0.64, 0.0), 15), "lear": ((0.075, 0.64, 0.0), 15),
           "LBigToe": ((0.11, -0.95, 0.16), 10), "LSmallToe": ((0.16, -0.95, 0.13), 10),
           "LHeel": ((0.08, -0.95, -0.07), 7), "RBigToe": ((-0.11, -0.95, 0.16), 11),
           "RSmallToe": ((-0.16, -0.95, 0.13), 11), "RHeel": ((-0.08, -0.95, -0.07), 8)}
    for s, base in (("l", 25), ("r", 40)):
        for f, name in enumerate(("index", "middle", "pinky", "ring", "thumb")):
            last = base + 3 * f + 2
            out[s + name] = (J[last] + (J[last] - J[last - 1]) * 0.9, last)
    return {k: (np.asarray(p, np.float64), j) for k, (p, j) in out.items()}


def write_synthetic_model(path: str | Path, seed: int = 0, n_vertices: int = 10475, n_shape: int = 20,
                          shape_scale: float = 0.02, pose_scale: float = 0.002) -> Path:
    """Write an SMPL-X ``.npz`` of the real structure with a human-proportioned rest skeleton (not a real body).

    Every joint's regressor averages 8 vertices placed symmetrically around it, so the rest joints are the
    skeleton of :func:`_rest_skeleton`; the vertex keypoints and face landmarks smplx reads by index sit where
    a person's nose, eyes, ears, toes, heels, finger tips and face are. Shape blend shapes are random per body
    part (``shape_scale`` m per unit beta; beta 0 scales the whole body by ~10%), pose blend shapes random and
    small, the hand PCA an orthonormal random basis of the 45 finger angles.
    """
    from smplx.vertex_ids import vertex_ids

    rng = np.random.default_rng(seed)
    J = _rest_skeleton()
    V = n_vertices
    owner = rng.integers(0, N_KINEMATIC, V)  # the joint each vertex belongs to
    v = J[owner] + rng.normal(0, 0.02, (V, 3))
    reserved = set(vertex_ids["smplx"].values())
    free = np.array([i for i in range(V) if i not in reserved])
    anchors = free[: N_KINEMATIC * 8].reshape(N_KINEMATIC, 8)
    cube = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * 0.01
    for j in range(N_KINEMATIC):
        v[anchors[j]] = J[j] + cube
        owner[anchors[j]] = j
    for name, (p, j) in _extra_points(J).items():
        v[vertex_ids["smplx"][name]] = p
        owner[vertex_ids["smplx"][name]] = j
    # 51 face landmarks: small triangles on the face plane (brows, nose, eyes, mouth: a 17 x 3 grid)
    start = N_KINEMATIC * 8
    tri = free[start: start + 51 * 3].reshape(51, 3)
    grid = [(x, y) for y in (0.69, 0.655, 0.60) for x in np.linspace(-0.05, 0.05, 17)]
    for k, (x, y) in enumerate(grid):
        c = np.array([x, y, 0.10 + 0.01 * np.cos(x * 20)])
        v[tri[k]] = c + np.array([[0.003, 0, 0], [-0.003, 0.002, 0], [0, -0.003, 0]])
        owner[tri[k]] = 15
    other = free[start + 153:]
    faces = np.concatenate([tri, other[: (len(other) // 3) * 3].reshape(-1, 3)]).astype(np.int64)
    weights = np.zeros((V, N_KINEMATIC))
    weights[np.arange(V), owner] = 1.0
    J_regressor = np.zeros((N_KINEMATIC, V))
    for j in range(N_KINEMATIC):
        J_regressor[j, anchors[j]] = 1.0 / 8
    # shape: beta 0 a uniform scale about the pelvis, the others random per-joint displacements (+ noise)
    shapedirs = np.zeros((V, 3, n_shape + 10))
    shapedirs[:, :, 0] = v * 0.1 / 1.0
    part = rng.normal(0, shape_scale, (N_KINEMATIC, 3, n_shape + 9))
    shapedirs[:, :, 1:] = part[owner] + rng.normal(0, shape_scale * 0.05, (V, 3, n_shape + 9))
    posedirs = np.zeros((V, 3, (N_KINEMATIC - 1) * 9))
    used = np.unique(np.concatenate([tri.reshape(-1), list(reserved)]))
    posedirs[used] = rng.normal(0, pose_scale, (len(used), 3, posedirs.shape[2]))
    comps = [np.linalg.qr(rng.normal(size=(45, 45)))[0].T * 0.3 for _ in range(2)]
    kintree = np.array([[2**32 - 1 if p < 0 else p for p in SMPLX_PARENTS], list(range(N_KINEMATIC))], np.int64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, v_template=v.astype(np.float32), f=faces, shapedirs=shapedirs.astype(np.float32),
        posedirs=posedirs.astype(np.float32), J_regressor=J_regressor.astype(np.float32),
        weights=weights.astype(np.float32), kintree_table=kintree,
        hands_componentsl=comps[0].astype(np.float32), hands_componentsr=comps[1].astype(np.float32),
        hands_meanl=rng.normal(0, 0.1, 45).astype(np.float32), hands_meanr=rng.normal(0, 0.1, 45).astype(np.float32),
        lmk_faces_idx=np.arange(51, dtype=np.int64), lmk_bary_coords=np.full((51, 3), 1 / 3, np.float32))
    return path


def known_clip(model: SMPLXJoints, T: int = 8, seed: int = 1):
    """Joints (T, 127, 3) of a known moving body (turning, arms and knees bending, hands in the model's space):
    the ground truth of the fit's tests and of bench/annotators_gpu.py."""
    from scipy.spatial.transform import Rotation as _Rotation

    rng = np.random.default_rng(seed)
    dev = next(iter(model.buffers())).device  # the model's device (the fitter's: CUDA when present)
    t = np.linspace(0, 1, T)
    pose = np.zeros((T, 55, 3))
    facing = np.diag([1.0, -1.0, -1.0])
    pose[:, 0] = matrix_to_axis_angle(np.stack([facing @ _Rotation.from_euler("y", 0.3 * np.sin(2 * np.pi * x))
                                                .as_matrix() for x in t]))
    pose[:, 16, 2], pose[:, 17, 2] = -0.6, 0.6  # arms lowered
    pose[:, 18, 1], pose[:, 19, 1] = -0.5 - 0.2 * t, 0.4 + 0.2 * t  # elbows bending the way they can
    pose[:, 4, 0], pose[:, 5, 0], pose[:, 1, 0] = 0.5 * t, 0.3, -0.3 * t
    pose[:, 25:55] = model.hand_pose(torch.tensor(rng.normal(0, 1.0, (T, 2, 12)), dtype=torch.float32, device=dev)) \
        .reshape(T, 30, 3).cpu().numpy()
    betas = torch.tensor(rng.normal(0, 0.8, (1, 10)), dtype=torch.float32, device=dev)
    transl = np.stack([0.1 * t, 0.2 + 0 * t, 3.0 + 0.3 * t], 1)
    with torch.no_grad():
        J = model(betas, torch.tensor(pose, dtype=torch.float32, device=dev),
                  torch.tensor(transl, dtype=torch.float32, device=dev))
    return J.cpu().numpy().astype(np.float64)
