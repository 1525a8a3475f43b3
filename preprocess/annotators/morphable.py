"""A FaceVerse-style 3D morphable face model and its fit to 2D face landmarks (paper 3.2, "3D Head Spheres": the
head's pose comes from a parametric face model fitted to the video).

**Model** (:class:`MorphableModel`): a mean shape (N vertices), an identity basis and an expression basis (linear
offsets of every vertex) and the vertex indices of the landmarks (``keypoints``). FaceVerse's files
(``faceverse_simple_v2.npy``: a pickled dict with ``meanshape`` (N*3,), ``idBase`` (3N, 150), ``exBase`` (3N, 52),
``keypoints`` (68,)) load as they are; so does any 3DMM with the same structure (BFM as converted by Deep3DFaceRecon:
``.npz`` or ``.npy``, 0-based keypoints). Pickled files are read with an unpickler that builds numpy arrays and
nothing else. Axes: FaceVerse/BFM use x towards the subject's left, y up, z out of the face (``axes: yup``); the
model is turned into the project's head frame (geometry.py: x to the left ear, y down, z into the head). Units: the
power of ten that makes the landmarks' width a face's (6-40 cm) unless given.

**Fit** (:func:`fit_clip`; :func:`fit_clips` fits the clips of one call together, each with its own unknowns and
L-BFGS state): every frame of a clip at once (pure torch, float64 on the CPU, float32 on a GPU). Unknowns: one
identity per clip, per frame an expression, a rotation and a translation, under the clip's pinhole camera ``K``
(geometry.py). Loss: robust (Cauchy) reprojection error of the landmarks normalised by the face's size in the image,
Tikhonov terms on identity and expression (their vertex displacement relative to the face's width, so the basis
scaling does not matter), and temporal smoothness of rotation, translation and expression between neighbouring frames.
Initialisation per frame: a weighted affine camera fit of the mean landmarks (closed form, two reweighted rounds),
turned into a rotation, scale and translation; then L-BFGS on everything.

Depth comes from the model's size: a face 5% wider than the identity prior allows reads 5% farther away (every
monocular fit has this ambiguity; the identity prior sets it). The per-frame error is the mean distance (px) between
the landmarks and the fitted model's projections (weighted by the landmarks' confidence).
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .assets import ModelFileError

_S = np.diag([1.0, -1.0, -1.0])  # y-up, z-towards-viewer model frame <-> head frame (geometry.py)

# Left-right mirror of the 68 iBUG 300-W landmarks (the order of FaceVerse/BFM keypoints and insightface's 3D-68):
# landmark i of a mirrored face is landmark IBUG68_FLIP[i] of the original.
IBUG68_FLIP = np.array(
    [*range(16, -1, -1),  # jaw
     *range(26, 21, -1), *range(21, 16, -1),  # brows
     27, 28, 29, 30, *range(35, 30, -1),  # nose
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,  # eyes
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,  # outer lips
     64, 63, 62, 61, 60, 67, 66, 65])  # inner lips

FACEVERSE_URL = "https://github.com/LizhenWangT/FaceVerse"
_KEYS = {  # accepted names of each part, FaceVerse's first
    "mean": ("meanshape", "mean_shape", "v_template"),
    "id": ("idBase", "id_base", "shapedirs"),
    "exp": ("exBase", "exp_base", "expdirs"),
    "keypoints": ("keypoints", "kp_inds", "landmark_indices"),
}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("collections", "OrderedDict"),
}


class _NumpyOnly(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays; refuses every other class (a model file runs no code)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"model file refers to {module}.{name}: only numpy arrays are read")


def _read_npy_object(path: Path):
    """The object stored in a pickled ``.npy`` (FaceVerse's dict), read with :class:`_NumpyOnly`."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.kind != "O":
            raise ValueError(f"{path}: an array of {dtype}, not a model dict")
        arr = _NumpyOnly(io.BytesIO(f.read())).load()
    return arr.item() if isinstance(arr, np.ndarray) and arr.shape == () else arr


@dataclass
class MorphableModel:
    """A linear face model in the head frame (geometry.py), metres."""

    mean: np.ndarray  # (N, 3)
    id_basis: np.ndarray  # (N, 3, K_id)
    exp_basis: np.ndarray  # (N, 3, K_exp)
    keypoints: np.ndarray  # (L,) vertex index of each landmark

    @property
    def n_landmarks(self) -> int:
        return len(self.keypoints)

    @classmethod
    def from_arrays(cls, d: dict, axes: str = "yup", unit_m: float | None = None, where: str = "model") -> \
            MorphableModel:
        """From a dict with the parts named as in FaceVerse (or the aliases of ``_KEYS``)."""
        part = {}
        for k, names in _KEYS.items():
            name = next((n for n in names if n in d), None)
            if name is None:
                raise ValueError(f"{where}: no {k} array (looked for {list(names)}; has {sorted(d)})")
            part[k] = np.asarray(d[name])
        mean = part["mean"].astype(np.float64).reshape(-1, 3)
        n = len(mean)

        def basis(b, what):
            b = b.astype(np.float64)
            if b.ndim == 2 and b.shape[0] == 3 * n:  # FaceVerse / BFM: (3N, K), x, y, z of each vertex
                return b.reshape(n, 3, -1)
            if b.ndim == 3 and b.shape[:2] == (n, 3):
                return b
            raise ValueError(f"{where}: {what} basis has shape {b.shape}; expected ({3 * n}, K) or ({n}, 3, K)")

        idb, exb = basis(part["id"], "identity"), basis(part["exp"], "expression")
        kp = part["keypoints"].astype(np.int64).reshape(-1)
        if kp.min() < 0 or kp.max() >= n:
            raise ValueError(f"{where}: keypoints index vertices {kp.min()}..{kp.max()}, the model has {n}")
        if axes not in ("yup", "ydown"):
            raise ValueError(f"{where}: axes={axes!r}; use yup (FaceVerse, BFM) or ydown (the head frame)")
        if axes == "yup":
            mean, idb, exb = mean @ _S, np.einsum("ij,njk->nik", _S, idb), np.einsum("ij,njk->nik", _S, exb)
        if unit_m is None:
            unit_m = guess_unit(mean[kp])
        return cls(mean * unit_m, idb * unit_m, exb * unit_m, kp)

    @classmethod
    def load(cls, path: str | Path, axes: str = "yup", unit_m: float | None = None,
             config_key: str = "model_path") -> MorphableModel:
        """A model file: FaceVerse's pickled-dict ``.npy``, or an ``.npz`` with the same arrays."""
        p = Path(path).expanduser() if path else None
        if p is None or not p.is_file():
            raise ModelFileError(
                f"3D face model file {p} is missing: download FaceVerse's model (faceverse_simple_v2.npy, its own "
                f"licence: research use; {FACEVERSE_URL}, 'FaceVerse PCA model') or give any 3DMM with a mean shape, "
                f"identity and expression bases and 68 landmark vertex indices (docs/annotators.md), and set "
                f"{config_key}=/path/to/the/file")
        d = dict(np.load(p)) if p.suffix == ".npz" else _read_npy_object(p)
        if not isinstance(d, dict):
            raise ValueError(f"{p}: holds a {type(d).__name__}, not a dict of model arrays")
        return cls.from_arrays(d, axes, unit_m, where=str(p))

    def landmarks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean (L, 3), identity basis (L, 3, K_id), expression basis (L, 3, K_exp)) at the landmark vertices."""
        return self.mean[self.keypoints], self.id_basis[self.keypoints], self.exp_basis[self.keypoints]


def guess_unit(landmarks: np.ndarray) -> float:
    """Metres per model unit: the power of ten that makes the landmarks 6-40 cm wide."""
    width = float(np.ptp(landmarks[:, 0]))
    for unit in (1.0, 0.1, 0.01, 0.001):
        if 0.06 <= width * unit <= 0.4:
            return unit
    raise ValueError(f"cannot tell the model's unit: its landmarks are {width:g} units wide; set unit_m")


# ---- fitting ----------------------------------------------------------------------------------------------------

@dataclass
class FitConfig:
    """Weights and iterations of :func:`fit_clip` (dimensionless: residuals are fractions of the face's size)."""

    iters: int = 30  # L-BFGS iterations per block (each with a line search)
    rounds: int = 8  # pose / shape alternations before the joint polish
    robust: float = 0.04  # Cauchy scale of a landmark residual, fraction of the face size (outliers count less)
    # identity / expression displacement^2 / face width^2, per frame: ~ (landmark noise / face size)^2 / landmarks,
    # the MAP weight of a unit prior for ~1 px noise on a 130 px face
    id_reg: float = 1e-3
    exp_reg: float = 1e-3
    # temporal smoothness: squared second differences over three consecutive fitted frames of the rotation matrix,
    # of the translation as (x / z, y / z, log z), and of the expression displacement / face width
    smooth_rot: float = 0.01
    smooth_trans: float = 0.01
    smooth_exp: float = 0.01
    device: str = "auto"  # auto: cuda when present, else cpu
    cuda_graph: bool = True  # on a GPU, several clips' evaluations replay as one CUDA graph (optim.lbfgs_per_problem)


@dataclass
class FitResult:
    """Per frame: the model's pose in the camera frame (head frame -> camera: ``X_cam = R X + t``), metres."""

    rotation: np.ndarray  # (T, 3, 3)
    translation: np.ndarray  # (T, 3) where the model's origin is
    identity: np.ndarray  # (K_id,) shared by the clip
    expression: np.ndarray  # (T, K_exp)
    error_px: np.ndarray  # (T,) weighted mean landmark reprojection error; NaN for frames not fitted
    valid: np.ndarray  # (T,) frames that were fitted (had enough landmarks)
    landmarks3d: np.ndarray  # (T, L, 3) fitted landmarks in the camera frame


def _affine_init(X: np.ndarray, uv: np.ndarray, w: np.ndarray, K: np.ndarray, robust: float, size: float):
    """Rotation and translation of metric points ``X`` (L, 3) seen at pixels ``uv`` (L, 2) from a weighted affine
    camera fit (two Cauchy-reweighted rounds), then the depth that the fitted scale implies."""
    A = np.concatenate([X, np.ones((len(X), 1))], 1)
    wk = w.copy()
    for _ in range(3):
        sw = np.sqrt(wk)[:, None]
        P, *_ = np.linalg.lstsq(A * sw, uv * sw, rcond=None)  # (4, 2): uv = X @ P[:3] + P[3]
        r = np.linalg.norm(A @ P - uv, axis=1) / size
        wk = w / (1 + (r / robust) ** 2)
    r1, r2 = P[:3, 0], P[:3, 1]
    s = (np.linalg.norm(r1) + np.linalg.norm(r2)) / 2  # px per metre
    M = np.stack([r1 / np.linalg.norm(r1), r2 / np.linalg.norm(r2), np.cross(r1, r2) / (np.linalg.norm(r1) *
                                                                                          np.linalg.norm(r2))])
    U, _, Vt = np.linalg.svd(M)
    R = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    f, c = K[0, 0], K[:2, 2]
    xc = (X * w[:, None]).sum(0) / max(w.sum(), 1e-9)  # weighted centroid, at depth f / s, seen where P puts it
    uc, zc = xc @ P[:3] + P[3], f / s
    t = np.array([(uc[0] - c[0]) / f * zc, (uc[1] - c[1]) / f * zc, zc]) - R @ xc
    return R, t


def _acc(x):
    """Second differences along the first axis."""
    return x[2:] - 2 * x[1:-1] + x[:-2]


def _rodrigues(w):
    """Rotation matrices (..., 3, 3) of axis-angle vectors (..., 3) (torch)."""
    import torch

    theta = torch.sqrt((w * w).sum(-1, keepdim=True) + 1e-20)
    k = w / theta
    Kx = torch.zeros(*w.shape[:-1], 3, 3, dtype=w.dtype, device=w.device)
    Kx[..., 0, 1], Kx[..., 0, 2], Kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    Kx = Kx - Kx.transpose(-1, -2)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(Kx)
    return eye + s * Kx + (1 - c) * (Kx @ Kx)


def fit_clip(model: MorphableModel, landmarks: np.ndarray, weights: np.ndarray, K: np.ndarray,
             cfg: FitConfig | None = None, min_points: int = 8) -> FitResult:
    """Fit ``model`` to one clip's 2D landmarks ``landmarks`` (T, L, 2) px with confidences ``weights`` (T, L)
    (0: occluded or missing) under intrinsics ``K`` (T, 3, 3) or (3, 3); frames with fewer than ``min_points``
    weighted landmarks are not fitted."""
    return fit_clips(model, [(landmarks, weights, K)], cfg, min_points)[0]


@dataclass
class _Clip:
    """One clip's fitted frames, prepared for a joint fit."""

    T: int
    idx: np.ndarray  # the frames fitted
    uv: np.ndarray  # (n, L, 2) px
    w: np.ndarray  # (n, L)
    K: np.ndarray  # (n, 3, 3)
    size: np.ndarray  # (n,) face size, px
    R0: np.ndarray  # (n, 3, 3) the affine start
    t0: np.ndarray  # (n, 3)


def _prepare(model: MorphableModel, landmarks, weights, K, cfg: FitConfig, min_points: int) -> tuple[_Clip, FitResult]:
    T, L = landmarks.shape[:2]
    if L != model.n_landmarks:
        raise ValueError(f"{L} landmarks per frame, but the model has {model.n_landmarks} keypoints")
    K = np.broadcast_to(np.asarray(K, np.float64), (T, 3, 3))
    w = np.where(np.isfinite(landmarks).all(-1), np.clip(np.asarray(weights, np.float64), 0, None), 0.0)
    uv = np.nan_to_num(np.asarray(landmarks, np.float64))
    valid = (w > 0).sum(1) >= min_points
    mean, idb, exb = model.landmarks()
    out = FitResult(np.tile(np.eye(3), (T, 1, 1)), np.zeros((T, 3)), np.zeros(idb.shape[-1]),
                    np.zeros((T, exb.shape[-1])), np.full(T, np.nan), valid, np.zeros((T, L, 3)))
    idx = np.flatnonzero(valid)
    uv, w, Kv = uv[idx], w[idx], K[idx]
    size = np.array([max(np.ptp(u[m > 0], axis=0).max(), 1.0) for u, m in zip(uv, w)])  # face size, px
    inits = [_affine_init(mean, u, m, k, cfg.robust, s) for u, m, k, s in zip(uv, w, Kv, size)]
    R0 = np.stack([r for r, _ in inits]) if inits else np.zeros((0, 3, 3))
    t0 = np.stack([t for _, t in inits]) if inits else np.zeros((0, 3))
    return _Clip(T, idx, uv, w, Kv, size, R0, t0), out


def fit_clips(model: MorphableModel, clips: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
              cfg: FitConfig | None = None, min_points: int = 8) -> list[FitResult]:
    """:func:`fit_clip` of several clips ``(landmarks, weights, K)`` in one fit: every evaluation is one batched
    pass over the frames of all of them (the fit is bound by kernel launches and host reads, so on a GPU several
    clips cost little more than one), while each clip keeps its own identity, objective and L-BFGS state
    (:func:`optim.lbfgs_per_problem`), so it ends where it would alone. One clip: torch's L-BFGS with a strong-Wolfe
    line search."""
    import torch

    from .optim import lbfgs_per_problem

    cfg = cfg or FitConfig()
    prepared = [_prepare(model, np.asarray(lm), wt, k, cfg, min_points) for lm, wt, k in clips]
    results = [out for _, out in prepared]
    todo = [(c, out) for c, out in prepared if len(c.idx)]
    if not todo:
        return results
    mean, idb, exb = model.landmarks()
    face_w = float(np.ptp(mean[:, 0]))  # metres: the scale of the regularisers
    dev = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    dt = torch.float64 if dev.type == "cpu" else torch.float32

    def tt(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=dev)

    C = len(todo)
    cs = [c for c, _ in todo]
    counts = [len(c.idx) for c in cs]
    clip_np = np.repeat(np.arange(C), counts)
    clip_of = torch.as_tensor(clip_np, device=dev)  # (n,) the clip of every fitted frame
    n = len(clip_np)
    mean_t, idb_t, exb_t = tt(mean), tt(idb), tt(exb)
    uv_t, w_t = tt(np.concatenate([c.uv for c in cs])), tt(np.concatenate([c.w for c in cs]))
    size_t, K_t = tt(np.concatenate([c.size for c in cs])), tt(np.concatenate([c.K for c in cs]))
    R0_t = tt(np.concatenate([c.R0 for c in cs]))
    t0 = np.concatenate([c.t0 for c in cs])
    # smoothness only over three neighbouring frames of one clip
    frame = np.concatenate([c.idx for c in cs])
    consecutive = tt((frame[2:] - frame[:-2] == 2) & (clip_np[2:] == clip_np[:-2]))
    acc_clip = clip_of[:max(n - 2, 0)]  # the clip of each second difference (frames j, j + 1, j + 2)
    frames_per_clip = tt(np.asarray(counts, np.float64))
    # unknowns: rotation update (axis-angle), translation as (x/z, y/z, log z), identity per clip, expression
    rot = torch.zeros(n, 3, dtype=dt, device=dev, requires_grad=True)
    uvz = tt(np.concatenate([t0[:, :2] / t0[:, 2:3], np.log(np.maximum(t0[:, 2:3], 1e-3))], 1)).requires_grad_(True)
    ident = torch.zeros(C, idb.shape[-1], dtype=dt, device=dev, requires_grad=True)
    expr = torch.zeros(n, exb.shape[-1], dtype=dt, device=dev, requires_grad=True)

    def per_clip(v, owner=clip_of):  # per-frame terms (or per-triple, owner acc_clip) summed by clip
        return torch.zeros(C, dtype=dt, device=dev).index_add_(0, owner, v)

    def pose(rot, uvz):
        R = _rodrigues(rot) @ R0_t
        z = torch.exp(uvz[:, 2:3])
        return R, torch.cat([uvz[:, :2] * z, z], 1)

    def terms():
        """Each clip's objective (C,), the projections and the camera-frame landmarks."""
        R, t = pose(rot, uvz)
        did = torch.einsum("ljk,ck->clj", idb_t, ident)  # (C, L, 3)
        dex = torch.einsum("ljk,nk->nlj", exb_t, expr)  # (n, L, 3)
        X = mean_t + did[clip_of] + dex
        P = torch.einsum("nij,nlj->nli", R, X) + t[:, None]
        q = torch.einsum("nij,nlj->nli", K_t, P)
        proj = q[..., :2] / q[..., 2:3].clamp_min(1e-6)
        r2 = ((proj - uv_t) ** 2).sum(-1) / size_t[:, None] ** 2
        data = (w_t * torch.log1p(r2 / cfg.robust ** 2)).sum(1) / w_t.sum(1) * cfg.robust ** 2
        reg = cfg.id_reg * (did ** 2).sum(-1).mean(-1) / face_w ** 2 * frames_per_clip + \
            per_clip(cfg.exp_reg * (dex ** 2).sum(-1).mean(-1) / face_w ** 2)
        # second differences (accelerations) over runs of consecutive frames: steady motion is not penalised
        smooth = consecutive * (cfg.smooth_rot * (_acc(R) ** 2).sum((-1, -2))
                                + cfg.smooth_trans * (_acc(uvz) ** 2).sum(-1)
                                + cfg.smooth_exp * (_acc(dex) ** 2).sum(-1).mean(-1) / face_w ** 2)
        return per_clip(data) + reg + per_clip(smooth, acc_clip), proj, P

    owner_of = {id(rot): clip_of, id(uvz): clip_of, id(expr): clip_of,
                id(ident): torch.arange(C, device=dev)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give (and the actor shares its cores)
    try:
        # block coordinate descent: pose given the shape, shape given the pose (each block is well conditioned;
        # one L-BFGS over all unknowns trades rotation for expression and crawls), then a joint polish
        blocks = [[rot, uvz], [ident, expr]] * cfg.rounds + [[rot, uvz, ident, expr]]
        for params in blocks:
            if C > 1 or (dev.type == "cuda" and cfg.cuda_graph):  # one clip on a GPU too (see smplx_fit)
                lbfgs_per_problem(params, [owner_of[id(p)] for p in params], lambda: terms()[0], C, cfg.iters,
                                  cuda_graph=cfg.cuda_graph)
                continue
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.iters, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15)

            def closure(opt=opt):
                opt.zero_grad()
                loss = terms()[0].sum()
                loss.backward()
                return loss

            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        _, proj, P = terms()
        R, t = pose(rot, uvz)
    proj, P, R, t = (a.cpu().numpy() for a in (proj, P, R, t))
    ident_np, expr_np = ident.detach().cpu().numpy(), expr.detach().cpu().numpy()
    start = 0
    for k, (c, out) in enumerate(todo):
        sl = slice(start, start + len(c.idx))
        start = sl.stop
        out.rotation[c.idx], out.translation[c.idx] = R[sl], t[sl]
        out.identity[:] = ident_np[k]
        out.expression[c.idx] = expr_np[sl]
        out.error_px[c.idx] = (np.linalg.norm(proj[sl] - c.uv, axis=-1) * c.w).sum(1) / c.w.sum(1)
        out.landmarks3d[c.idx] = P[sl]
    return results


def view_rotation(direction: np.ndarray) -> np.ndarray:
    """The rotation (3, 3) of the view looking along ``direction`` (camera frame): the smallest turn of the camera's
    z axis onto it (geometry.py: head rotations are given in this view of the head)."""
    d = np.asarray(direction, np.float64) / np.linalg.norm(direction)
    z = np.array([0.0, 0.0, 1.0])
    v, c = np.cross(z, d), float(z @ d)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    Vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + Vx + Vx @ Vx / (1 + c)
