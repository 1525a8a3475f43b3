"""Camera, rotation and crop geometry shared by the annotators; the conventions live here.

Camera frame: OpenCV (x right, y down, z forward, metres). With no calibration the intrinsics are a
pinhole with ``f = focal_ratio * max(W, H)`` and the principal point at the image centre
(``focal_ratio = 1`` is a 53° field of view along the long side).

Head rotation (``head_rotation``, FaceVerse-style): maps head-frame vectors to the camera frame of a
view looking straight at the head (the face-crop view: an off-centre face that looks into the lens
has zero rotation, as in face trackers that fit on a face crop). Head frame: x towards the
subject's left ear, y down towards the chin, z from the face into the back of the head, so a face
looking straight into the camera, upright, has the identity rotation. Angles, in degrees:

* yaw > 0: the face turns towards image right (the subject turns to their left);
* pitch > 0: the chin goes up (the subject looks up);
* roll > 0: the head tilts counter-clockwise in the image.

In the right-handed "x right, y up, z towards the viewer" frame G = S R S (S = diag(1, -1, -1)),
``G = Rz(roll) @ Ry(yaw) @ Rx(-pitch)``: roll is applied last, about the viewing axis, so an in-plane
rotation of the image by θ changes roll by θ and nothing else; a horizontal mirror negates yaw and roll.
"""
from __future__ import annotations

import cv2
import numpy as np

_S = np.diag([1.0, -1.0, -1.0])  # OpenCV camera/head frame <-> y-up, z-towards-viewer frame


def intrinsics(width: int, height: int, focal_ratio: float) -> np.ndarray:
    """Pinhole intrinsics of an uncalibrated ``width``×``height`` image (see module doc)."""
    f = focal_ratio * max(width, height)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels of camera-frame points (..., 3) → (..., 2)."""
    q = points @ K.T
    return q[..., :2] / np.maximum(q[..., 2:3], 1e-9)


def solve_translation(X: np.ndarray, uv: np.ndarray, K: np.ndarray, w: np.ndarray,
                      tz: float | None = None) -> np.ndarray:
    """Translation t that best projects the metric points ``X`` (N,3) + t onto pixels ``uv`` (N,2).

    Linear weighted least squares on ``f (X + t)_xy = (uv - c) (X + t)_z`` (the rotation is the
    identity: the backends return camera-aligned axes). With ``tz`` given, only x and y are solved.
    """
    f, c = K[0, 0], K[:2, 2]
    d = uv - c  # (N, 2)
    sw = np.sqrt(np.repeat(np.asarray(w, np.float64), 2))
    if tz is None:
        A = np.zeros((len(X), 2, 3))
        A[:, 0, 0] = A[:, 1, 1] = f
        A[:, :, 2] = -d
        b = d * X[:, 2:3] - f * X[:, :2]
        t, *_ = np.linalg.lstsq(A.reshape(-1, 3) * sw[:, None], b.reshape(-1) * sw, rcond=None)
        return t
    # f (X + t)_xy = d (X_z + tz)  →  t_xy = d (X_z + tz) / f - X_xy, weighted mean over points
    txy = d * (X[:, 2:3] + tz) / f - X[:, :2]
    wn = np.asarray(w, np.float64)
    txy = (txy * wn[:, None]).sum(0) / max(wn.sum(), 1e-9)
    return np.array([txy[0], txy[1], tz])


def lift_to_rays(depth: np.ndarray, uv: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Camera-frame points at ``depth`` (N,) on the rays through pixels ``uv`` (N,2): they project onto ``uv``."""
    f, c = K[0, 0], K[:2, 2]
    xy = (uv - c) / f * depth[:, None]
    return np.concatenate([xy, depth[:, None]], axis=1)


def place_on_image(X: np.ndarray, uv: np.ndarray, K: np.ndarray, w: np.ndarray,
                   tz: float | None = None, min_depth: float = 0.05) -> tuple[np.ndarray, float]:
    """Camera-frame joints from metric, camera-aligned joints ``X`` and their detected pixels ``uv``.

    The rigid placement (:func:`solve_translation`) gives every joint a depth; each joint is then put
    on its pixel's ray at that depth, so the stored 3D joints project exactly onto the detected 2D
    joints and keep the backend's depth structure. Returns the joints and the weighted mean
    reprojection error (px) of the rigid placement, a measure of how well 3D and 2D agree.
    """
    t = solve_translation(X, uv, K, w, tz)
    P = X + t
    err = np.linalg.norm(project(P, K) - uv, axis=1)
    wn = np.asarray(w, np.float64)
    fit = float((err * wn).sum() / max(wn.sum(), 1e-9))
    depth = np.maximum(P[:, 2], min_depth)
    return lift_to_rays(depth, uv, K), fit


# ---- rotations -------------------------------------------------------------------------------

def ypr_from_rotation(R: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in degrees of head rotations (..., 3, 3) (convention: module doc)."""
    R = np.asarray(R, np.float64)
    yaw = np.arcsin(np.clip(R[..., 2, 0], -1.0, 1.0))
    pitch = -np.arctan2(R[..., 2, 1], R[..., 2, 2])
    roll = np.arctan2(-R[..., 1, 0], R[..., 0, 0])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def rotation_from_ypr(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Inverse of :func:`ypr_from_rotation` (degrees)."""
    y, p, r = np.radians([yaw, pitch, roll])
    cz, sz, cy, sy, cx, sx = np.cos(r), np.sin(r), np.cos(y), np.sin(y), np.cos(-p), np.sin(-p)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return _S @ (Rz @ Ry @ Rx) @ _S


def rotation_from_yup(G: np.ndarray) -> np.ndarray:
    """Head rotation (OpenCV frames) from a rotation between y-up, z-towards-viewer frames (e.g. MediaPipe's)."""
    return _S @ G @ _S


def orthonormalize(R: np.ndarray) -> np.ndarray:
    """The nearest rotation matrix (SVD)."""
    U, _, Vt = np.linalg.svd(R)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


# ---- crops and boxes ---------------------------------------------------------------------------

def crop_affine(center, side: float, out_size: int) -> np.ndarray:
    """2×3 affine mapping the axis-aligned square (``center``, ``side``) of an image onto an ``out_size`` crop."""
    s = out_size / max(float(side), 1e-6)
    cx, cy = float(center[0]), float(center[1])
    return np.array([[s, 0.0, out_size / 2.0 - s * cx], [0.0, s, out_size / 2.0 - s * cy]])


def crop(image: np.ndarray, A: np.ndarray, out_size: int) -> np.ndarray:
    """The crop that ``A`` (from :func:`crop_affine`) describes; outside the image is black."""
    return cv2.warpAffine(image, A, (out_size, out_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def uncrop_points(points: np.ndarray, A: np.ndarray) -> np.ndarray:
    """Crop pixels (..., 2) → image pixels, for the crop made with affine ``A``."""
    s = A[0, 0]
    return (points - A[:, 2]) / s


def box_of(points: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """x0, y0, x1, y1 of 2D points (N,2) where ``mask``; NaNs when none."""
    p = points if mask is None else points[mask]
    if len(p) == 0:
        return np.full(4, np.nan)
    return np.array([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])


def square_box(center, side: float) -> np.ndarray:
    """x0, y0, x1, y1 of a square."""
    h = side / 2.0
    return np.array([center[0] - h, center[1] - h, center[0] + h, center[1] + h])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0,y0,x1,y1 boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def smooth_series(x: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over time (axis 0) that uses valid frames only; invalid frames stay as they are.

    A normalised convolution: a linear motion stays linear (up to the clip ends), jitter is damped.
    """
    if sigma <= 0 or valid.sum() < 2:
        return x.copy()
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    v = valid.astype(np.float64)
    flat = x.reshape(len(x), -1).astype(np.float64) * v[:, None]
    # zero padding + "valid" keeps the length for any clip length (unlike mode="same")
    num = np.stack([np.convolve(np.pad(flat[:, j], r), k, mode="valid") for j in range(flat.shape[1])], axis=1)
    den = np.convolve(np.pad(v, r), k, mode="valid")[:, None]
    out = x.reshape(len(x), -1).astype(np.float64).copy()
    out[valid] = num[valid] / den[valid]
    return out.reshape(x.shape)
