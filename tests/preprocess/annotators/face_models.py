"""Stand-ins for the production face models, made by the tests: a synthetic FaceVerse-structured 3DMM file and an
insightface model pack of tiny ONNX models with the real input/output signatures (so insightface's own model
router classifies them as the real ones: SCRFD with keypoints, 2D-106 and 3D-68 landmarks, ArcFace 112 -> 512).

The tiny models answer deterministically: the detector sees one face in the middle of whatever it is given (40% of
the side, five keypoints where a frontal face has them), the landmark models return a frontal face's landmarks in
their crop (the 3D-68 ones: the synthetic 3DMM's mean face), ArcFace is a fixed random projection of the 8x8-pooled
aligned face (the same face under a small shift embeds alike, two photos do not)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from preprocess.annotators.morphable import IBUG68_FLIP

_S = np.diag([1.0, -1.0, -1.0])


def ibug68_face_cm() -> np.ndarray:
    """(68, 3) iBUG-ordered landmarks of a plausible face, head frame (x to the left ear, y down, z into the head),
    centimetres, mirror-symmetric (landmark IBUG68_FLIP[i] is landmark i mirrored)."""
    p = np.zeros((68, 3))
    k = np.arange(17)
    p[:17, 0], p[:17, 1] = -7.0 * np.cos(np.pi * k / 16), -1.0 + 10.0 * np.sin(np.pi * k / 16)  # jaw, 0 = right ear
    p[17:22, 0], p[17:22, 1] = np.linspace(-6.0, -1.5, 5), -5.0 - np.array([0, .6, .8, .6, .3])  # right brow
    p[27:31, 0], p[27:31, 1] = 0.0, np.linspace(-3.5, 0.0, 4)  # nose bridge to tip
    p[31:36, 0], p[31:36, 1] = np.linspace(-1.6, 1.6, 5), 1.0 + np.array([0, .2, .3, .2, 0])  # nostrils
    ring = np.array([[-1.4, 0], [-0.6, -0.55], [0.6, -0.55], [1.4, 0], [0.6, 0.5], [-0.6, 0.5]])  # outer corner first
    p[36:42, :2] = ring + [-3.2, -3.0]  # right eye: 36 outer corner, 39 inner corner
    p[48:60, 0] = 2.5 * np.cos(np.pi - np.linspace(0, 2 * np.pi, 12, endpoint=False))  # outer lips, 48 right corner
    p[48:60, 1] = 4.2 - 1.1 * np.sin(np.linspace(0, 2 * np.pi, 12, endpoint=False))
    p[60:68, 0] = 1.8 * np.cos(np.pi - np.linspace(0, 2 * np.pi, 8, endpoint=False))  # inner lips
    p[60:68, 1] = 4.2 - 0.4 * np.sin(np.linspace(0, 2 * np.pi, 8, endpoint=False))
    for i in range(68):  # the other halves: mirror of their partners
        j = IBUG68_FLIP[i]
        if i in range(22, 27) or i in range(42, 48):
            p[i, :2] = [-p[j, 0], p[j, 1]]
    p[:, 2] = -9.0 * np.sqrt(np.clip(1 - (p[:, 0] / 8.5) ** 2 - (p[:, 1] / 12.0) ** 2, 0.05, None))  # face surface
    p[27:36, 2] -= np.array([0.8, 1.4, 2.0, 2.6, 1.2, 1.5, 1.7, 1.5, 1.2])  # the nose stands out
    return p


def synthetic_faceverse(n_extra: int = 300, n_id: int = 20, n_exp: int = 12, seed: int = 0) -> dict:
    """A FaceVerse-structured model dict (decimetres, y up, z out of the face, bases (3N, K), 68 keypoints) with a
    mirror-symmetric mean face whose identity basis does not change its overall size (so depth is identifiable)."""
    rng = np.random.default_rng(seed)
    lm = ibug68_face_cm() / 100.0  # metres, head frame
    # other vertices: a head surface around the face (ellipsoid), so the model is more than its landmarks
    u = rng.uniform(-1, 1, (n_extra, 2))
    extra = np.stack([u[:, 0] * 0.085, u[:, 1] * 0.12,
                      -0.09 * np.sqrt(np.clip(1 - u[:, 0] ** 2 - u[:, 1] ** 2, 0.05, None))], 1)
    verts = np.concatenate([extra[: n_extra // 2], lm, extra[n_extra // 2:]])
    kp = np.arange(n_extra // 2, n_extra // 2 + 68)
    N = len(verts)

    def smooth_fields(n, scale, centre=None, width=None):
        # sums of localised bumps (a wider nose, a longer jaw, an open mouth), optionally near ``centre``
        B = np.zeros((N, 3, n))
        for k in range(n):
            for _ in range(3):
                c = rng.uniform([-0.06, -0.06], [0.06, 0.09]) if centre is None else centre + rng.normal(0, width, 2)
                bump = np.exp(-((verts[:, :2] - c) ** 2).sum(1) / (2 * 0.03 ** 2))
                B[:, :, k] += bump[:, None] * rng.normal(0, 1, 3)
        return B / np.sqrt((B ** 2).sum((0, 1)) / N) * scale  # RMS displacement per unit coefficient

    # like a real 3DMM (built from Procrustes-aligned scans), the bases hold no rigid motion and no change of size:
    # the similarity fields (3 translations, 3 small rotations, 1 scale) are projected out, as the landmarks see them
    c0 = verts - verts[kp].mean(0)
    # (+ the shears x += z, y += z: a turn of the head as a weak-perspective view sees it)
    shear = [np.outer(c0[:, 2], e) for e in np.eye(3)[:2]]
    sim = [np.tile(e, (N, 1)) for e in np.eye(3)] + [np.cross(e, c0) for e in np.eye(3)] + [c0] + shear
    full = np.stack([f.reshape(-1) for f in sim], 1)
    coef = np.linalg.lstsq(np.stack([f[kp].reshape(-1) for f in sim], 1), np.eye(len(kp) * 3), rcond=None)[0]

    def no_similarity(B):
        flat = B.reshape(N * 3, -1)
        return (flat - full @ (coef @ flat.reshape(N, 3, -1)[kp].reshape(len(kp) * 3, -1))).reshape(B.shape)

    idb = no_similarity(smooth_fields(n_id, 0.0015))
    exb = no_similarity(np.concatenate([smooth_fields(n_exp // 2, 0.003, np.array([0.0, 0.045]), 0.03),
                                        smooth_fields(n_exp - n_exp // 2, 0.002, np.array([0.0, -0.03]), 0.04)], 2))
    to_fv = lambda a: np.einsum("ij,nj...->ni...", _S, a) * 10.0  # noqa: E731 - head frame m -> y-up decimetres
    return {"meanshape": to_fv(verts).reshape(-1).astype(np.float32),
            "idBase": to_fv(idb).reshape(3 * N, n_id).astype(np.float32),
            "exBase": to_fv(exb).reshape(3 * N, n_exp).astype(np.float32),
            "keypoints": kp.astype(np.int64), "tri": np.zeros((1, 3), np.int64)}


def write_faceverse(path: Path, **kw) -> Path:
    """The synthetic model saved as FaceVerse saves its own: a pickled dict in a .npy."""
    np.save(path, synthetic_faceverse(**kw), allow_pickle=True)
    return Path(path)


# ---- a tiny insightface model pack -------------------------------------------------------------------------------

def _const_model(path: Path, in_shape, outputs: dict[str, np.ndarray], name: str, batch_dynamic: bool = True):
    """An ONNX model whose outputs are ``const + 0 * mean(input)`` (input-connected, deterministic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims = ["None" if (i == 0 and batch_dynamic) else d for i, d in enumerate(in_shape)]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, dims)
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["m"], name="pool_all", axes=[1, 2, 3], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "ax1"], ["m1"], name="expand"),
             helper.make_node("Constant", [], ["zero"], name="zeroc",
                              value=numpy_helper.from_array(np.zeros((1, 1), np.float32)))]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes.append(helper.make_node("MatMul", ["m1", "zero"], ["z"], name="scale0"))  # (B, 1) zeros
    outs = []
    for k, (oname, val) in enumerate(outputs.items()):
        inits.append(numpy_helper.from_array(val.astype(np.float32), f"c{k}"))
        if val.shape[0] == 1 or batch_dynamic:  # per-image outputs: (B, D)
            nodes.append(helper.make_node("Add", ["z", f"c{k}"], [oname], name=f"out{k}"))
            shape = ["None" if batch_dynamic else 1, val.shape[1]]
        else:  # anchor outputs (N, D) of a fixed-size detector: the zero broadcasts
            nodes.append(helper.make_node("ReduceSum", ["z"], [f"zs{k}"], name=f"zs{k}", keepdims=0))
            nodes.append(helper.make_node("Add", [f"zs{k}", f"c{k}"], [oname], name=f"out{k}"))
            shape = list(val.shape)
        outs.append(helper.make_tensor_value_info(oname, TensorProto.FLOAT, shape))
    g = helper.make_graph(nodes, name, [inp], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _detector(path: Path, size: int = 160, face_frac: float = 0.4):
    """SCRFD-like: 9 outputs (score, bbox, kps at strides 8, 16, 32, 2 anchors each), a fixed size x size input; one
    confident face in the middle (the anchor nearest the centre at stride 16)."""
    from insightface.utils.face_align import arcface_dst

    outs = {}
    per_stride = {}
    for s in (8, 16, 32):
        g = size // s
        n = g * g * 2
        score = np.full((n, 1), 0.01)
        bbox, kps = np.zeros((n, 4)), np.zeros((n, 10))
        if s == 16:
            centres = np.repeat(np.stack(np.mgrid[:g, :g][::-1], -1).reshape(-1, 2) * s, 2, axis=0).astype(float)
            j = int(np.argmin(np.linalg.norm(centres - size / 2, axis=1)))
            c, half = centres[j], size * face_frac / 2
            score[j] = 0.95
            bbox[j] = np.array([c[0] - (size / 2 - half), c[1] - (size / 2 - half),
                                size / 2 + half - c[0], size / 2 + half - c[1]]) / s
            k5 = (arcface_dst / 112.0 - 0.5) * 2 * half + size / 2  # a frontal face's keypoints in that box
            kps[j] = ((k5 - c) / s).reshape(-1)
        per_stride[s] = (score, bbox, kps)
    for part, name in enumerate(("score", "bbox", "kps")):
        for s in (8, 16, 32):
            outs[f"{name}_{s}"] = per_stride[s][part]
    _const_model(path, [1, 3, size, size], outs, "scrfd_tiny", batch_dynamic=False)


def _frontal_landmarks(n: int) -> np.ndarray:
    """(n, 2) landmarks of a frontal face in [-1, 1] crop coordinates of insightface's landmark crop (the face box
    spans 1/1.5 of the crop)."""
    lm = ibug68_face_cm()[:, :2]
    lm = (lm - (lm.max(0) + lm.min(0)) / 2) / np.ptp(lm, axis=0).max()  # face box -> [-0.5, 0.5]
    if n != 68:
        t = np.linspace(0, 1, n)
        lm = np.stack([np.interp(t, np.linspace(0, 1, 68), lm[:, 0]), np.interp(t, np.linspace(0, 1, 68), lm[:, 1])],
                      1)
    return lm * 2 / 1.5


def _landmarks_106(path: Path):
    _const_model(path, [1, 3, 192, 192], {"fc1": _frontal_landmarks(106).reshape(1, -1)}, "lmk_2d106_tiny")


def _landmarks_3d68(path: Path):
    out = np.zeros((1103, 3))  # 3309 values: insightface keeps the last 68 rows
    out[-68:, :2] = _frontal_landmarks(68)
    out[-68:, 2] = ibug68_face_cm()[:, 2] / 20.0
    _const_model(path, [1, 3, 192, 192], {"fc1": out.reshape(1, -1)}, "lmk_3d68_tiny")


def _arcface(path: Path, dim: int = 512, seed: int = 0):
    """112x112 -> dim: a fixed random projection of the 8x8-average-pooled face (mean-centred per image)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    W = np.random.default_rng(seed).normal(0, 1, (3 * 14 * 14, dim)).astype(np.float32)
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])
    out = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])
    nodes = [helper.make_node("AveragePool", ["input.1"], ["p"], name="pool8", kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
             helper.make_node("ReduceMean", ["f"], ["fm"], name="avg", axes=[1], keepdims=1),
             helper.make_node("Sub", ["f", "fm"], ["fc"], name="centre"),
             helper.make_node("MatMul", ["fc", "W"], ["683"], name="proj")]
    g = helper.make_graph(nodes, "arcface_tiny", [inp], [out], [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def write_model_pack(d: Path, det_size: int = 160, identity_dim: int = 512) -> Path:
    """A buffalo_l-laid-out directory of tiny models (same file names as the real pack)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    _detector(d / "det_10g.onnx", det_size)
    _landmarks_106(d / "2d106det.onnx")
    _landmarks_3d68(d / "1k3d68.onnx")
    _arcface(d / "w600k_r50.onnx", identity_dim)
    return d
