"""``data.augment.shift``: the driving frames and their control maps move together against the references."""
from __future__ import annotations

import numpy as np
import pytest

from models.typed_config import ConfigError
from train.data.sample import shift_frames


def test_shift_moves_frames_and_transform_alike():
    video = np.zeros((2, 16, 20, 3), np.uint8)
    video[:, 5, 7] = 255
    t0 = np.eye(3, dtype=np.float32)
    t1, moved = shift_frames(video, t0, (0.1, -0.25))  # 2 px right, 4 px up
    assert moved.shape == video.shape and moved.dtype == np.uint8 and t1.dtype == t0.dtype
    assert np.argwhere(moved[0, ..., 0]).tolist() == [[1, 9]]
    np.testing.assert_allclose(t1 @ np.array([7.0, 5.0, 1.0]), [9.0, 1.0, 1.0])
    assert np.all(moved[:, -4:] == 0)  # what came in from outside the frame is black


def test_shifted_batches_keep_every_other_choice_and_move_the_controls(make_loader):
    base = next(iter(make_loader("data.dropout.ref=0.3", "data.dropout.motion=0.3")))
    moved = next(iter(make_loader("data.dropout.ref=0.3", "data.dropout.motion=0.3", "data.augment.shift=0.2")))
    assert moved.keys == base.keys
    for name in ("frame_index", "drop_ref", "drop_motion", "ref_valid"):
        assert getattr(moved, name).tolist() == getattr(base, name).tolist(), name
    assert np.array_equal(moved.ref_images.numpy(), base.ref_images.numpy())  # the references keep their framing
    assert not np.array_equal(moved.video.numpy(), base.video.numpy())
    for b in range(base.size):
        d = (moved.crop_transform[b] - base.crop_transform[b]).numpy()
        dx, dy = int(round(d[0, 2])), int(round(d[1, 2]))
        assert np.allclose(d[:2, :2], 0) and max(abs(dx), abs(dy)) <= round(0.2 * base.video.shape[-1]) + 1
        for field in ("video", "skeleton_maps"):  # the frames and the skeleton moved by the same pixels
            a, m = getattr(base, field)[b].numpy(), getattr(moved, field)[b].numpy()  # (3, T, H, W)
            h, w = a.shape[-2:]
            src = a[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)].astype(int)
            dst = m[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)].astype(int)
            assert np.abs(src - dst).mean() < (1.0 if field == "video" else 2.0), (field, dx, dy)


def test_bad_shift_is_refused_with_its_key(make_cfg):
    with pytest.raises(ConfigError, match="data.augment.shift"):
        make_cfg("data.augment.shift=0.7")
    with pytest.raises(ConfigError, match="data.latents"):
        make_cfg("data.augment.shift=0.1", "data.latents=true")
