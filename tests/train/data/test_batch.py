"""Batches on shards made by the project's own preprocessing: every field's dtype and shape, buckets,
frames and control maps checked against the stored data with independent readers."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.dreamactor import DreamActor
from models.skeleton import HAND_LIMBS, body_layout, bridged_limbs
from models.vae import VideoVAE
from preprocess import schema
from tests.train.data.helpers import frames, meta, npy, read_dataset, take


@pytest.fixture(scope="module")
def stored(dataset_dir):
    return read_dataset(dataset_dir)


@pytest.fixture(scope="module")
def batches(make_loader):
    """Two epochs' worth of batches from one in-process consumer, with the loader that made them."""
    loader = make_loader("data.workers.num_workers=0")
    return loader, take(loader, 14)


def test_every_field_has_its_dtype_and_shape(batches, model_cfg):
    loader, bs = batches
    s = model_cfg.face_encoder.crop_size
    seen_refs = set()
    for b in bs:
        n, t, (h, w), r = b.size, b.num_frames, b.resolution, b.num_refs
        seen_refs.add(r)
        assert n >= 1 and len(set(b.keys)) == n
        want = {
            "epoch": ((n,), torch.int64), "video": ((n, 3, t, h, w), torch.uint8),
            "ref_images": ((n, r, 3, h, w), torch.uint8), "ref_valid": ((n, r), torch.bool),
            "skeleton_maps": ((n, 3, t, h, w), torch.uint8), "head_sphere_maps": ((n, 3, t, h, w), torch.uint8),
            "face_crops": ((n, t, 3, s, s), torch.uint8),
            "face_valid": ((n, t), torch.bool), "body_valid": ((n, t), torch.bool), "head_valid": ((n, t), torch.bool),
            "drop_ref": ((n,), torch.bool), "drop_motion": ((n,), torch.bool), "frame_index": ((n, t), torch.int64),
            "fps": ((n,), torch.float32), "crop_transform": ((n, 3, 3), torch.float32),
        }
        for name, (shape, dtype) in want.items():
            v = getattr(b, name)
            assert tuple(v.shape) == shape and v.dtype == dtype, (name, tuple(v.shape), v.dtype, shape, dtype)
        assert b.video_latents is None and b.ref_latents is None
        assert (t - 1) % model_cfg.vae.temporal_compression == 0
        assert h % 16 == 0 and w % 16 == 0
        assert b.ref_valid[:, 0].all()  # the primary reference is always real
        assert torch.all(b.frame_index[:, 1:] > b.frame_index[:, :-1])
        assert torch.allclose(b.fps, torch.full((n,), 25.0))
        assert b.skeleton_maps.amax() > 0 and b.head_sphere_maps.amax() > 0 and b.video.float().std() > 10
        assert b.pose_maps is None and torch.equal(b.pose_map_tensor(),
                                                   torch.cat([b.skeleton_maps, b.head_sphere_maps], 1))
        assert b.pose_map_tensor().shape == (n, 6, t, h, w)
        assert b.video.is_contiguous(memory_format=torch.channels_last_3d)
        cond = b.conditions(torch.zeros(n, 16, r, h // 8, w // 8))
        assert cond.pose_maps.dtype == torch.float32 and 0 <= cond.pose_maps.min() <= cond.pose_maps.max() <= 1
        assert -1 <= cond.face_crops.min() and cond.face_crops.max() <= 1
        assert b.video_pixels().shape == (n, 3, t, h, w) and b.ref_pixels().shape == (n * r, 3, 1, h, w)
    assert len(seen_refs) > 1  # the reference count is drawn per batch


def test_a_batch_runs_through_the_vae_and_the_model(batches, model_cfg):
    """The batch carries exactly what DreamActor.forward consumes (tiny preset, random weights)."""
    _, bs = batches
    b = min(bs, key=lambda x: (x.size * (x.num_frames + x.num_refs), -x.size))
    torch.manual_seed(0)
    vae = VideoVAE.from_config(model_cfg.vae, None)
    model = DreamActor.from_config(model_cfg).eval()
    z = vae.encode(b.video_pixels())
    ref = b.refs_to_latent_layout(vae.encode(b.ref_pixels()))
    assert ref.shape == (b.size, z.shape[1], b.num_refs, *z.shape[-2:])
    with torch.no_grad():
        v = model(torch.randn_like(z), torch.rand(b.size), b.conditions(ref), drop_ref=b.drop_ref,
                  drop_motion=b.drop_motion)
    assert v.shape == z.shape and torch.isfinite(v).all()


def test_batches_respect_buckets_lengths_and_the_token_budget(batches, stored):
    loader, bs = batches
    planner = loader.planner
    lengths = set(planner.lengths.tolist())
    for b in bs:
        h, w = b.resolution
        assert (h, w) in planner.buckets
        bucket = planner.buckets.index((h, w))
        assert b.num_frames in lengths
        assert b.size <= planner.batch_size(bucket, b.num_frames)
        for k, idx in zip(b.keys, b.frame_index):
            m = meta(stored[k])
            assert planner.bucket_of(m["width"], m["height"]) == bucket  # nearest aspect ratio
            assert int(idx[-1]) < m["n_frames"]
    per_clip = {(b.resolution, b.num_frames) for b in bs}
    assert len({r for r, _ in per_clip}) >= 2 and len({t for _, t in per_clip}) >= 2


def _warp(img, transform, size):
    h, w = size
    return cv2.warpAffine(img, np.asarray(transform, np.float64)[:2], (w, h), flags=cv2.INTER_LINEAR)


def test_frames_and_face_crops_are_the_stored_ones(batches, stored):
    _, bs = batches
    for b in bs[:6]:
        for i, k in enumerate(b.keys):
            idx = b.frame_index[i].numpy()
            clip = frames(stored[k][schema.field("video").member])
            want = np.stack([_warp(clip[j], b.crop_transform[i], b.resolution) for j in idx])
            got = b.video[i].permute(1, 2, 3, 0).numpy()
            m = 4  # borders differ between area resize and the affine warp
            err = np.abs(got[:, m:-m, m:-m].astype(float) - want[:, m:-m, m:-m]).mean()
            assert err < 6.0, (k, err)
            # stored face crops, resized to the model's crop size (the tiny preset's differs from the stored 224)
            s = b.face_crops.shape[-1]
            stored_faces = np.stack([cv2.resize(x, (s, s), interpolation=cv2.INTER_AREA if x.shape[0] > s else
                                                cv2.INTER_LINEAR)
                                     for x in frames(stored[k][schema.field("face").member])])
            faces = stored_faces[idx].astype(float)
            got_f = b.face_crops[i].permute(0, 2, 3, 1).numpy().astype(float)
            assert np.abs(got_f - faces).mean() < 2.0
            # the neighbouring frames are further away: the indices are exact, not merely close
            other = stored_faces[np.clip(idx + 2, 0, len(stored_faces) - 1)]
            assert np.abs(got_f - faces).mean() < np.abs(got_f - other).mean() or (idx + 2 >= len(stored_faces)).all()
            assert (b.face_valid[i].numpy() == npy(stored[k], "face_valid")[idx].astype(bool)).all()
            assert (b.head_valid[i].numpy() == npy(stored[k], "head_valid")[idx].astype(bool)).all()


def _segment_distance(p, a, b):
    """Distance of points (N, 2) to segments (L, 2) - (L, 2): (N, L)."""
    ab = b - a
    t = np.clip(((p[:, None] - a[None]) * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9)[None], 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(p[:, None] - closest, axis=-1)


def test_rendered_maps_align_with_the_stored_projected_joints(batches, stored, model_cfg):
    _, bs = batches
    layout = body_layout(schema.BODY_JOINT_NAMES)
    rc = model_cfg.render
    checked = 0
    for b in bs[:6]:
        h, w = b.resolution
        for i, k in enumerate(b.keys):
            idx = b.frame_index[i].numpy()
            a = b.crop_transform[i].numpy().astype(np.float64)
            j2d = npy(stored[k], "body_joints2d")[idx]
            conf = npy(stored[k], "body_conf")[idx]
            # stored 3D joints + K project onto the stored 2D joints (what the renderer draws from)
            j3d, K = npy(stored[k], "body_joints3d")[idx], npy(stored[k], "camera_K")[idx]
            proj = np.einsum("tij,tnj->tni", K, j3d)
            proj = proj[..., :2] / np.where(np.abs(proj[..., 2:]) > 1e-9, proj[..., 2:], 1.0)
            ok = conf > rc.min_confidence
            assert np.abs(proj - j2d)[ok].max() < 0.5
            pts = j2d @ a[:2, :2].T + a[:2, 2]
            skel = b.skeleton_maps[i].permute(1, 2, 3, 0).numpy()
            reach = max(1, round(rc.limb_width * min(h, w))) + max(1, round(rc.joint_radius * min(h, w))) + 1.5
            for f in range(len(idx)):
                drawn = [j for j in layout.drawn_joints if ok[f, j]]
                inside = [j for j in drawn if 1 <= pts[f, j, 0] < w - 1 and 1 <= pts[f, j, 1] < h - 1]
                for j in inside:  # every drawn joint lies on a coloured pixel
                    x, y = np.round(pts[f, j]).astype(int)
                    assert skel[f, y, x].any(), (k, f, layout.names[j])
                # the limbs the renderer draws for this frame (missing joints bridged, models/skeleton.py)
                segs = [(pts[f, p], pts[f, q]) for p, q in bridged_limbs(layout, ok[f]) if p >= 0]
                segs += [(pts[f, j], pts[f, j]) for j in drawn]
                ys, xs = np.nonzero(skel[f].any(-1))
                if len(xs) and segs:  # and every coloured pixel lies on a limb or joint
                    d = _segment_distance(np.stack([xs, ys], 1).astype(float), np.array([s[0] for s in segs]),
                                          np.array([s[1] for s in segs])).min(1)
                    hands = npy(stored[k], "hand_conf")[idx][f] > rc.min_confidence
                    if not hands.any():
                        assert d.max() <= reach, (k, f, d.max())
                checked += len(inside)
            # head sphere: centred on the stored head centre, coloured by the head's rotation
            center = npy(stored[k], "head_center")[idx] @ a[:2, :2].T + a[:2, 2]
            rot = npy(stored[k], "head_rotation")[idx]
            sphere = b.head_sphere_maps[i].permute(1, 2, 3, 0).numpy().astype(float)
            for f in np.nonzero(b.head_valid[i].numpy())[0]:
                x, y = np.round(center[f]).astype(int)
                if 0 <= x < w and 0 <= y < h:
                    want = (1.0 - rot[f][2]) * 127.5  # facing normal (0, 0, -1) in the head frame
                    assert np.abs(sphere[f, y, x] - want).max() < 20, (k, f, sphere[f, y, x], want)
    assert checked > 50
    assert HAND_LIMBS  # the hand skeleton exists for clips that have hands


def test_references(batches, stored):
    _, bs = batches
    for b in bs:
        for i, k in enumerate(b.keys):
            extra = [r for r in schema.REF_ROLES if stored[k].get(schema.field(f"ref_{r}").member)]
            assert int(b.ref_valid[i].sum()) == min(b.num_refs, 1 + len(extra))
            for j in range(b.num_refs):
                if not b.ref_valid[i, j]:  # padding repeats the primary
                    assert torch.equal(b.ref_images[i, j], b.ref_images[i, 0])


def test_pyav_decoder_gives_the_same_batches(make_loader, batches):
    """data.workers.decoder=pyav (cheaper here) reads the same frames as decord."""
    _, ref = batches
    got = take(make_loader("data.workers.num_workers=0", "data.workers.decoder=pyav"), 4)
    for a, b in zip(ref, got):
        assert a.keys == b.keys and torch.equal(a.frame_index, b.frame_index)
        assert (a.video.float() - b.video.float()).abs().mean() < 2.0
        assert (a.face_crops.float() - b.face_crops.float()).abs().mean() < 2.0
