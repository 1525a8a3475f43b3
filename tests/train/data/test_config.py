"""Config values that cannot work are refused at build time, naming the key."""
from __future__ import annotations

import pytest

from train.data import DataConfigError


@pytest.mark.parametrize("overrides,match", [
    (["data.frames.min=6"], "data.frames.min"),  # 6 frames is not 1 + 4k for the VAE
    (["data.source.require_groups=[subject,gaze]"], "unknown groups"),
    (["data.dropout.ref=1.5"], "data.dropout.ref"),
    (["data.latents=true"], "no latent cache at"),
    (["data.latents=true", "data.sampling=window"], "data.sampling must be prefix"),
    (["data.refs.primary_candidates=0"], "data.refs.primary_candidates"),
    (["data.workers.decoder=opencv"], "data.workers.decoder"),
    (["data.source.dataset=null"], "exactly one of"),
])
def test_bad_values_are_refused(make_loader, overrides, match):
    with pytest.raises(DataConfigError, match=match):
        make_loader(*overrides)


def test_face_crops_need_face_fields(make_loader, dataset_dir):
    pattern = str(dataset_dir / "shards" / "*.tar")
    with pytest.raises(DataConfigError, match="face_crops"):
        make_loader("data.source.dataset=null", f"data.source.shards=[{pattern}]", "data.source.require_groups=[body]")
    loader = make_loader("data.source.dataset=null", f"data.source.shards=[{pattern}]",
                         "data.source.require_groups=[body,head]", "data.face_crops=false",
                         "data.workers.num_workers=0")
    b = next(iter(loader))
    assert b.face_crops is None and b.skeleton_maps.amax() > 0 and b.head_sphere_maps.amax() > 0
