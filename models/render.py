"""Control signals of paper 3.2, drawn from stored annotations at any resolution.

- Skeleton map: 3D body (and hand) joints in the camera frame, projected with the intrinsics K and
  joined by limb-coloured lines (:func:`render_skeleton_map`).
- Head-sphere map: a sphere at the driving head's image position, its radius that of the reference
  head, coloured by the driving head's orientation: each visible surface normal, expressed in the head
  frame, mapped to RGB as ``(n + 1) / 2`` (:func:`render_head_sphere_map`).
- Bone-length adjustment: each bone of the driving skeleton rescaled to the reference's length,
  directions kept (:func:`bone_length_adjust`).

Conventions. Camera frame: OpenCV (x right, y down, z forward). Pixels: integer coordinates are pixel
centres. Arrays are per frame (leading T) and may be numpy or torch. A 3x3 image transform ``A`` maps
stored-clip pixels to output pixels (``[u', v', 1] = A [u, v, 1]``): resize/crop in the loader become
``A`` (see :func:`crop_resize_transform`), applied to K (``K' = A K``), to 2D points and, through its
scale ``sqrt(|det A[:2, :2]|)``, to radii. Maps are uint8 RGB (T, H, W, 3); background is black.
"""
from __future__ import annotations

import numpy as np

from .config import RenderConfig
from .skeleton import (
    HAND_LIMB_COLORS,
    HAND_LIMBS,
    HAND_PARENTS,
    BodyLayout,
    body_layout,
    bridged_limbs,
    topological_order,
)

_SHIFT = 4  # cv2 fixed-point bits: positions are drawn with 1/16 px precision


def _np(x, dtype=np.float64) -> np.ndarray:
    """numpy view of a numpy array or torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# ----------------------------------------------------------------------------- image transforms


def scale_offset_transform(scale, offset=(0.0, 0.0)) -> np.ndarray:
    """``u' = sx * u + ox``, ``v' = sy * v + oy`` as a 3x3 matrix (scale: a number or (sx, sy))."""
    sx, sy = (scale, scale) if np.isscalar(scale) else scale
    return np.array([[sx, 0.0, offset[0]], [0.0, sy, offset[1]], [0.0, 0.0, 1.0]])


def crop_resize_transform(box, out_size) -> np.ndarray:
    """Transform of cropping ``box = (x0, y0, x1, y1)`` (pixel edges) and resizing it to ``out_size = (H, W)``.

    Matches OpenCV/PyTorch resizing with ``align_corners=False``: ``u' = (u + 0.5 - x0) * W / (x1 - x0) - 0.5``.
    """
    x0, y0, x1, y1 = (float(b) for b in box)
    h, w = out_size
    sx, sy = w / (x1 - x0), h / (y1 - y0)
    return scale_offset_transform((sx, sy), ((0.5 - x0) * sx - 0.5, (0.5 - y0) * sy - 0.5))


def transform_points(points, transform) -> np.ndarray:
    """Apply a 3x3 image transform to (..., 2) pixel coordinates."""
    p = _np(points)
    a = _np(transform)
    return p @ a[:2, :2].T + a[:2, 2]


def transform_scale(transform) -> float:
    """Isotropic scale of an image transform (geometric mean of the axis scales)."""
    return float(np.sqrt(abs(np.linalg.det(_np(transform)[:2, :2]))))


def project(points3d, K) -> tuple[np.ndarray, np.ndarray]:
    """Pinhole projection of (T, J, 3) camera-frame points with (T, 3, 3) or (3, 3) K: (T, J, 2) px, (T, J) depth."""
    p = _np(points3d)
    k = np.broadcast_to(_np(K), p.shape[:-2] + (3, 3))
    z = p[..., 2]
    safe = np.where(np.abs(z) > 1e-9, z, 1.0)[..., None]
    uv = np.einsum("...ij,...nj->...ni", k, p)[..., :2] / safe
    return uv, z


# ----------------------------------------------------------------------------- skeleton map


def _px(value_frac: float, size) -> int:
    """A size given as a fraction of the shorter image side, in whole pixels (at least 1)."""
    return max(1, round(value_frac * min(size)))


def _fixed(p) -> tuple[int, int]:
    """A pixel position in cv2's fixed-point format."""
    return round(p[0] * (1 << _SHIFT)), round(p[1] * (1 << _SHIFT))


def _draw_graph(img, pts, valid, depth, edges, edge_colors, joint_colors, joints, width, radius):
    """Draw edges far-to-near, then joint dots far-to-near, onto ``img`` in place."""
    import cv2

    if len(edges):
        ok = (edges >= 0).all(1) & valid[edges[:, 0]] & valid[edges[:, 1]]
        order = np.argsort(-(depth[edges[:, 0]] + depth[edges[:, 1]]), kind="stable")
        for e in order:
            if ok[e]:
                a, b = edges[e]
                cv2.line(img, _fixed(pts[a]), _fixed(pts[b]), edge_colors[e].tolist(), width, cv2.LINE_AA, _SHIFT)
    for j in sorted((j for j in joints if valid[j]), key=lambda j: -depth[j]):
        cv2.circle(img, _fixed(pts[j]), radius << _SHIFT, joint_colors[j].tolist(), -1, cv2.LINE_AA, _SHIFT)


def draw_skeleton(points2d, valid, size, layout: BodyLayout, cfg: RenderConfig, *, depth=None,
                  hands2d=None, hands_valid=None, hands_depth=None) -> np.ndarray:
    """Draw (T, J, 2) output-pixel joints (+ optional (T, 2, 21, 2) hands) into (T, H, W, 3) uint8 maps."""
    pts = _np(points2d)
    ok = _np(valid, bool) & np.isfinite(pts).all(-1)
    dep = np.zeros(ok.shape) if depth is None else _np(depth)
    h, w = size
    out = np.zeros((pts.shape[0], h, w, 3), dtype=np.uint8)
    width, radius = _px(cfg.limb_width, size), _px(cfg.joint_radius, size)
    hand_width, hand_radius = _px(cfg.hand_limb_width, size), _px(cfg.hand_joint_radius, size)
    hand_edges = np.array(HAND_LIMBS)
    hand_joint_colors = np.concatenate([HAND_LIMB_COLORS[:1] * 0 + 255, HAND_LIMB_COLORS])
    for t in range(pts.shape[0]):
        _draw_graph(out[t], pts[t], ok[t], dep[t], bridged_limbs(layout, ok[t]), layout.limb_colors,
                    layout.joint_colors, layout.drawn_joints, width, radius)
        if hands2d is None or not cfg.draw_hands:
            continue
        hp = _np(hands2d[t])
        hv = _np(hands_valid[t], bool) & np.isfinite(hp).all(-1)
        hd = np.zeros(hv.shape) if hands_depth is None else _np(hands_depth[t])
        for side in range(hp.shape[0]):
            _draw_graph(out[t], hp[side], hv[side], hd[side], hand_edges, HAND_LIMB_COLORS, hand_joint_colors,
                        range(len(HAND_PARENTS)), hand_width, hand_radius)
    return out


def render_skeleton_map(joints3d, joint_conf, K, size, cfg: RenderConfig, *, joint_names=None, hands3d=None,
                        hand_conf=None, transform=None) -> np.ndarray:
    """Skeleton maps (T, H, W, 3) uint8 from camera-frame joints (T, J, 3), confidences (T, J) and K.

    ``joint_names``: SMPL-X names of the J columns (default: full SMPL-X order). Hands: (T, 2, 21, 3)
    joints + (T, 2, 21) confidences, MediaPipe order. A joint is drawn when its confidence exceeds
    ``cfg.min_confidence`` and it lies in front of the camera.
    """
    layout = body_layout(None if joint_names is None else tuple(joint_names))
    k = _np(K)
    if transform is not None:
        k = _np(transform) @ k
    uv, z = project(joints3d, k)
    valid = (_np(joint_conf) > cfg.min_confidence) & (z > 0)
    hands = {}
    if hands3d is not None:
        k_h = k[:, None] if k.ndim == 3 else k
        huv, hz = project(hands3d, k_h)
        hands = {"hands2d": huv, "hands_valid": (_np(hand_conf) > cfg.min_confidence) & (hz > 0), "hands_depth": hz}
    return draw_skeleton(uv, valid, size, layout, cfg, depth=z, **hands)


# ----------------------------------------------------------------------------- head sphere


def render_head_sphere_map(center, rotation, radius, size, *, valid=None, transform=None) -> np.ndarray:
    """Head-sphere maps (T, H, W, 3) uint8.

    ``center`` (T, 2) px and ``rotation`` (T, 3, 3) (head frame -> camera frame) come from the driving
    video; ``radius`` (T,) or a number, in stored-clip pixels, is the size to draw (the reference head's:
    see :func:`retarget_head_radius`). The sphere is shaded orthographically: the camera-frame normal of
    the visible hemisphere at a pixel is ``(dx, dy, -sqrt(1 - dx^2 - dy^2))`` with ``dx, dy`` the offsets
    from the centre in radii; its head-frame version ``R^T n`` gives the colour ``(n + 1) / 2``.
    """
    c = _np(center)
    rot = _np(rotation)
    n_frames = c.shape[0]
    r = np.broadcast_to(_np(radius), (n_frames,)).copy()
    ok = np.ones(n_frames, bool) if valid is None else _np(valid, bool)
    if transform is not None:
        c = transform_points(c, transform)
        r = r * transform_scale(transform)
    h, w = size
    out = np.zeros((n_frames, h, w, 3), dtype=np.uint8)
    for t in range(n_frames):
        if not ok[t] or not np.isfinite(c[t]).all() or not r[t] > 0:
            continue
        x0, x1 = max(0, int(np.floor(c[t, 0] - r[t]))), min(w - 1, int(np.ceil(c[t, 0] + r[t])))
        y0, y1 = max(0, int(np.floor(c[t, 1] - r[t]))), min(h - 1, int(np.ceil(c[t, 1] + r[t])))
        if x0 > x1 or y0 > y1:
            continue
        dx = (np.arange(x0, x1 + 1) - c[t, 0]) / r[t]
        dy = (np.arange(y0, y1 + 1) - c[t, 1]) / r[t]
        dx, dy = np.meshgrid(dx, dy)
        d2 = dx * dx + dy * dy
        inside = d2 <= 1.0
        n_cam = np.stack([dx, dy, -np.sqrt(np.clip(1.0 - d2, 0.0, None))], -1)
        n_head = n_cam @ rot[t]  # row-vector form of R^T n
        rgb = np.clip(np.round((n_head + 1.0) * 127.5), 0, 255).astype(np.uint8)
        out[t, y0:y1 + 1, x0:x1 + 1][inside] = rgb[inside]
    return out


def retarget_head_radius(drive_radius, ref_radius: float, drive_valid=None) -> np.ndarray:
    """Driving head radii rescaled so their median equals the reference head's radius (zoom kept)."""
    r = _np(drive_radius)
    ok = np.isfinite(r) & (r > 0)
    if drive_valid is not None:
        ok &= _np(drive_valid, bool)
    if not ok.any():
        return np.full_like(r, float(ref_radius))
    return r * (float(ref_radius) / float(np.median(r[ok])))


# ----------------------------------------------------------------------------- bone-length adjustment


def bone_lengths(joints3d, valid, parents) -> np.ndarray:
    """Per-joint length of the bone to its parent, median over frames where both ends are valid; NaN if none."""
    p = _np(joints3d).reshape(-1, *np.shape(joints3d)[-2:])
    ok = _np(valid, bool).reshape(p.shape[:2])
    parents = np.asarray(parents)
    out = np.full(len(parents), np.nan)
    for j, par in enumerate(parents):
        if par < 0:
            continue
        both = ok[:, j] & ok[:, par]
        if both.any():
            out[j] = np.median(np.linalg.norm(p[both, j] - p[both, par], axis=-1))
    return out


def adjust_bone_lengths(joints3d, valid, parents, target_lengths, root_shift=None) -> np.ndarray:
    """Rescale every bone to ``target_lengths`` keeping its direction, walking from the roots outwards.

    A root moves by ``root_shift`` (T, 3) (default: stays). A joint whose bone cannot be measured
    (itself or its parent invalid, zero length) or has no target (NaN) moves rigidly with its parent.
    """
    old = _np(joints3d)
    ok = _np(valid, bool)
    parents = np.asarray(parents)
    target = _np(target_lengths)
    new = old.copy()
    shift0 = np.zeros(old.shape[:-2] + (3,)) if root_shift is None else _np(root_shift)
    for j in topological_order(parents):
        par = parents[j]
        if par < 0:
            new[..., j, :] = old[..., j, :] + shift0
            continue
        bone = old[..., j, :] - old[..., par, :]
        length = np.linalg.norm(bone, axis=-1, keepdims=True)
        ok_j = ok[..., j] & ok[..., par] & (length[..., 0] > 1e-12) & np.isfinite(target[j])
        scaled = (new[..., par, :]
                  + bone / np.where(length > 0, length, 1.0) * (target[j] if np.isfinite(target[j]) else 0.0))
        rigid = old[..., j, :] + (new[..., par, :] - old[..., par, :])
        new[..., j, :] = np.where(ok_j[..., None], scaled, rigid)
    return new


def bone_length_adjust(drive_joints3d, drive_conf, ref_joints3d, ref_conf, *, joint_names=None, min_confidence=0.0,
                       drive_hands3d=None, drive_hand_conf=None, ref_hands3d=None, ref_hand_conf=None):
    """Retarget a driving skeleton to the reference subject's proportions (paper 3.2, inference).

    Reference bone lengths are medians over the reference frames (one A-pose frame is enough). The pelvis
    stays where the driving video has it; hands are moved with the adjusted body wrists and their own
    bones rescaled. Returns ``(body (T, J, 3), hands (T, 2, 21, 3) or None)``.
    """
    layout = body_layout(None if joint_names is None else tuple(joint_names))
    d_ok = _np(drive_conf) > min_confidence
    target = bone_lengths(ref_joints3d, _np(ref_conf) > min_confidence, layout.parents)
    body = adjust_bone_lengths(drive_joints3d, d_ok, layout.parents, target)
    if drive_hands3d is None:
        return body, None
    old_body = _np(drive_joints3d)
    hands = _np(drive_hands3d).copy()
    h_ok = _np(drive_hand_conf) > min_confidence
    for side, wrist in enumerate(layout.wrists):
        shift = np.zeros(hands.shape[:-3] + (3,)) if wrist < 0 else body[..., wrist, :] - old_body[..., wrist, :]
        if ref_hands3d is None:
            h_target = np.full(len(HAND_PARENTS), np.nan)
        else:
            h_target = bone_lengths(_np(ref_hands3d)[..., side, :, :],
                                    _np(ref_hand_conf)[..., side, :] > min_confidence, HAND_PARENTS)
        hands[..., side, :, :] = adjust_bone_lengths(hands[..., side, :, :], h_ok[..., side, :], HAND_PARENTS,
                                                     h_target, root_shift=shift)
    return body, hands


# ----------------------------------------------------------------------------- both maps


def render_control_maps(size, cfg: RenderConfig, *, joints3d, joint_conf, K, head_center, head_rotation,
                        head_radius, head_valid=None, joint_names=None, hands3d=None, hand_conf=None,
                        transform=None) -> np.ndarray:
    """[skeleton ; head sphere] maps, (T, H, W, 6) uint8: the pose encoder's input (paper 3.2)."""
    skel = render_skeleton_map(joints3d, joint_conf, K, size, cfg, joint_names=joint_names, hands3d=hands3d,
                               hand_conf=hand_conf, transform=transform)
    sphere = render_head_sphere_map(head_center, head_rotation, head_radius, size, valid=head_valid,
                                    transform=transform)
    return np.concatenate([skel, sphere], axis=-1)


def maps_to_tensor(maps):
    """(T, H, W, C) uint8 maps -> (C, T, H, W) float32 torch tensor in [0, 1] (the model's ``pose_maps``)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(maps)).permute(3, 0, 1, 2).float().div_(255.0)
