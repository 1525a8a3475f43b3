"""The latent cache (``preprocess/latents.py``) and the loader reading it (``data.latents=true``), on the dataset made
by the project's own preprocessing and the tiny preset's randomly initialised Wan VAE (the real class):

- the causal VAE: the latents of every 1 + 4k-frame prefix of a clip are the leading latent frames of the clip's;
- prefix sampling plans prefixes of the cached frames and primaries among the cached candidates;
- from latents the loader yields the batches the pixel path yields (keys, frames, buckets, references, control maps,
  face crops: equal), and the cached latents are the VAE's encoding of the very pixels the pixel path builds;
- a cache made by other weights, for other buckets or shorter clips is refused, naming both sides;
- a rerun redoes exactly the parts that are uncommitted or damaged (byte for byte the same), and the validator checks
  the sidecar samples;
- the trainer's step takes such a batch without a VAE, and its sample video decodes the clip from the latents.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.vae import VideoVAE, pixels_to_vae
from preprocess import demo_media, schema
from preprocess.shards import decode_stats, encode_stats
from preprocess.validate import validate
from tests.train.data.conftest import DATA
from tests.train.data.helpers import latent_pass, read_dataset, take, write_tar
from tests.train.data.test_plan import planner_for, synthetic_metas
from train.data import DataConfigError
from train.data.source import ShardError, with_sidecar
from train.step import vae_seed


@pytest.fixture(scope="module")
def vae(model_cfg):
    """The VAE the trainer builds for the tiny preset (train.step.build_vae's seed, train.seed=0)."""
    torch.manual_seed(vae_seed(0))
    return VideoVAE.from_config(model_cfg.vae, None)


@pytest.fixture(scope="module")
def latent_cache(dataset_dir, tmp_path_factory):
    """The latent cache of the loader-test dataset, made by the command at the tests' data settings."""
    cache = tmp_path_factory.mktemp("latents") / "cache"
    latent_pass(dataset_dir, cache, *DATA, check=True)
    return cache


def test_latents_of_a_prefix_are_the_leading_latents(vae):
    """Measured on this CPU: bitwise equal (max |diff| 0.0) for every prefix; asserted at float32 tolerance."""
    frames, _ = demo_media.render_motion(demo_media.load_photo("astronaut"), (64, 48), 17,
                                         demo_media.Motion(shift=(6.0, 2.0), scale=(1.0, 1.1)))
    clip = pixels_to_vae(torch.from_numpy(frames).permute(3, 0, 1, 2)[None])  # (1, 3, 17, 48, 64)
    full = vae.encode(clip)
    assert full.shape[2] == 5 and full.std() > 0.05
    for t in (1, 5, 9, 13):
        prefix = vae.encode(clip[:, :, :t])
        torch.testing.assert_close(prefix, full[:, :, :1 + (t - 1) // 4], rtol=1e-5, atol=1e-6)
    # not a property of any clip pair: a different 5th frame changes the second latent frame
    other = clip.clone()
    other[:, :, 4] = -other[:, :, 4]
    assert not torch.allclose(vae.encode(other[:, :, :5])[:, :, 1], full[:, :, 1], atol=1e-3)


def test_prefix_sampling_plans_prefixes_of_the_cached_frames():
    metas = synthetic_metas(n_shards=6, per_shard=40)
    planner = planner_for(metas, "data.sampling=prefix", "data.frames.target_fps=25")
    framing, by_url, n = planner.framing, {m.url: m for m in metas}, 0
    for g in range(planner.windows_per_epoch):
        _, urls = planner.window_shard_urls(g)
        for b in planner.plan_window(g, [by_url[u] for u in urls]).batches:
            for s in b.samples:
                m = by_url[urls[s.shard]]
                row = m.keys.index(s.key)
                frames, fps = int(m.n_frames[row]), float(m.fps[row])
                cached = framing.cached_frames(frames, fps, planner.cfg.frames.max)
                assert s.frame_index == cached[:len(s.frame_index)] and s.frame_index[0] == 0
                candidates = framing.candidates(frames)
                assert s.primary_frame in candidates and len(candidates) == min(8, frames)
                if any(c > s.frame_index[-1] for c in candidates):
                    assert s.primary_frame > s.frame_index[-1]  # outside the window whenever a candidate is
                n += 1
    assert n > 150
    window = planner_for(metas).settings()  # window sampling fingerprints as before prefix sampling existed
    assert "sampling" not in window and "primary_candidates" not in window["refs"]
    assert planner.settings()["sampling"] == "prefix"


def test_sidecar_members_join_their_samples_in_order():
    main = iter([(k, {"meta.json": k.encode()}) for k in ("a", "b", "c", "d")])
    side = iter([("b", {"video_latents.npy": b"B"}), ("d", {"video_latents.npy": b"D"})])
    got = {k: sorted(m) for k, m in with_sidecar(main, side)}
    assert got == {"a": ["meta.json"], "b": ["meta.json", "video_latents.npy"], "c": ["meta.json"],
                   "d": ["meta.json", "video_latents.npy"]}

    def broken():
        raise ShardError("shard_missing", "gone")
        yield

    with pytest.raises(ShardError) as e:
        list(with_sidecar(iter([("a", {})]), broken()))
    assert e.value.reason == "latents_shard_missing"


def test_loader_from_latents_matches_the_pixel_path(latent_cache, make_loader, vae):
    n = 4
    pixels = take(make_loader("data.sampling=prefix", "data.workers.num_workers=0"), n)
    cached = take(make_loader("data.latents=true", f"data.source.latents={latent_cache}",
                              "data.workers.num_workers=0"), n)
    for a, b in zip(pixels, cached):
        assert a.keys == b.keys and b.video is None and b.ref_images is None
        for name in ("epoch", "frame_index", "fps", "ref_valid", "drop_ref", "drop_motion", "crop_transform",
                     "skeleton_maps", "head_sphere_maps", "face_crops", "face_valid", "body_valid", "head_valid"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert a.resolution == b.resolution and a.num_frames == b.num_frames and a.num_refs == b.num_refs
        assert all(k.startswith(("samples/", "shards/", "batches/")) for k in b.skips)
        # the cached latents are the VAE's encoding of the very pixels the pixel path built (float16-rounded)
        (h, w), t = a.resolution, 1 + (a.num_frames - 1) // 4
        z, ref = vae.encode(a.video_pixels()), a.refs_to_latent_layout(vae.encode(a.ref_pixels()))
        assert b.video_latents.dtype == torch.float16 and b.video_latents.shape == (a.size, 16, t, h // 8, w // 8)
        assert b.ref_latents.shape == (a.size, 16, a.num_refs, h // 8, w // 8)
        torch.testing.assert_close(b.video_latents.float(), z, rtol=2 ** -11, atol=1e-5)
        torch.testing.assert_close(b.ref_latents.float(), ref, rtol=2 ** -11, atol=1e-5)
    assert len({(b.resolution, b.num_frames) for b in cached}) > 1  # several buckets and lengths


def test_a_cache_for_other_weights_or_framing_is_refused(latent_cache, make_loader, dataset_dir, tmp_path):
    uses = ("data.latents=true", f"data.source.latents={latent_cache}")
    with pytest.raises(DataConfigError, match=r"framing.area: cache 9216, wanted 4096"):
        make_loader(*uses, "data.buckets.area=4096")
    with pytest.raises(DataConfigError, match=r"max_frames: the cache holds at most 17 frames per clip, "
                                              r"data.frames.max is 21"):
        make_loader(*uses, "data.frames.max=21")
    with pytest.raises(DataConfigError, match="data.sampling must be prefix"):
        make_loader(*uses, "data.sampling=window")
    with pytest.raises(DataConfigError, match="no latent cache at"):
        make_loader("data.latents=true", f"data.source.latents={tmp_path / 'none'}")
    other = tmp_path / "other"  # the same cache, as if made by other weights
    shutil.copytree(latent_cache, other)
    manifest = json.loads((other / "latents.json").read_text())
    manifest["vae"] = {"weights_sha256": "0" * 64, "files": ["diffusion_pytorch_model.safetensors"]}
    (other / "latents.json").write_text(json.dumps(manifest))
    with pytest.raises(DataConfigError, match=r'vae: cache \{"files".*"weights_sha256": "0000.*, wanted '
                                              r'\{"random_init": .*"seed": 0'):
        make_loader("data.latents=true", f"data.source.latents={other}")
    # a rerun of the pass with another VAE (another seed of the random init) refuses the cache, before any work
    r = latent_pass(dataset_dir, latent_cache, *DATA, "seed=1")
    assert r.returncode == 2 and "was made for another VAE or rule" in r.stderr and '"seed": 1' in r.stderr, r.stderr


def test_rerun_redoes_uncommitted_and_damaged_parts_only(latent_cache, dataset_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(latent_cache, cache)
    parts = sorted(p.stem for p in (cache / "shards").glob("*.parquet"))
    before = {p: (cache / "shards" / f"{p}.tar").read_bytes() for p in parts}
    (cache / "shards" / f"{parts[0]}.parquet").unlink()  # killed before its commit: the tar is debris
    tar = cache / "shards" / f"{parts[1]}.tar"
    tar.write_bytes(tar.read_bytes()[:-3000])  # truncated after its commit: damaged
    (cache / "shards" / "stray.tar.tmp").write_bytes(b"half")
    assert validate(str(dataset_dir), latents=str(cache), log=lambda *_: None)  # the validator sees both
    latent_pass(dataset_dir, cache, *DATA, check=True)
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["parts_done_before"] == len(parts) - 2 and summary["parts_committed"] == 2
    assert (cache / "_retired" / f"{parts[1]}.json").is_file() and not (cache / "shards" / "stray.tar.tmp").exists()
    assert {p: (cache / "shards" / f"{p}.tar").read_bytes() for p in parts} == before  # deterministic, same order
    assert validate(str(dataset_dir), latents=str(cache), log=lambda *_: None) == []
    # every committed clip has latents, each sample of a sidecar part is a sample of the dataset part
    stored, latents = read_dataset(dataset_dir), read_dataset(cache)
    assert set(latents) == set(stored) and all(set(m) == {f.member for f in schema.LATENT_FIELDS}
                                               for m in latents.values())
    # the validator checks the latent fields: float32 latents in a part whose size and checksum were updated
    part = parts[2]
    samples = {k: dict(m) for k, m in read_dataset(cache).items() if k in _keys(cache, part)}
    key = sorted(samples)[0]
    f = schema.LATENT_FIELDS_BY_NAME["video_latents"]
    samples[key][f.member] = schema.encode(schema.field("frame_index"), np.zeros(3, np.int32))
    write_tar(cache / "shards" / f"{part}.tar", samples)
    stats, _ = decode_stats((cache / "shards" / f"{part}.parquet").read_bytes())
    data = (cache / "shards" / f"{part}.tar").read_bytes()
    import hashlib
    (cache / "shards" / f"{part}.parquet").write_bytes(encode_stats(stats, {
        "tar_bytes": len(data), "tar_sha256": hashlib.sha256(data).hexdigest()}))
    problems = validate(str(dataset_dir), latents=str(cache), log=lambda *_: None)
    assert problems == [f"{cache}: {part}: {key}: video_latents.npy: dtype int32, expected float16"], problems


def _keys(cache, part) -> set[str]:
    stats, _ = decode_stats((cache / "shards" / f"{part}.parquet").read_bytes())
    return set(stats.loc[stats["status"] == "ok", "key"])


def test_a_batch_from_latents_trains_and_samples_without_pixels(latent_cache, make_loader, model_cfg, vae):
    """What the trainer does with such a batch: the flow-matching step takes the cached latents (no VAE: it is None),
    the periodic sample video decodes the driving clip from them."""
    from types import SimpleNamespace

    from models.dreamactor import DreamActor
    from train.preview import sample_video
    from train.step import FlowMatchingStep

    batch = take(make_loader("data.latents=true", f"data.source.latents={latent_cache}", "data.workers.num_workers=0",
                             "data.face_crops=false"), 1)[0]
    model = DreamActor.from_config(model_cfg, load_weights=False)
    job = SimpleNamespace(launch=SimpleNamespace(precision="fp32"), stage=SimpleNamespace(use_face=False, id=1),
                          train=SimpleNamespace(seed=0, continuation_prob=0.0), model=model_cfg)
    step = FlowMatchingStep(job, None, torch.device("cpu"), 0)
    x0, ref = step.latents(batch)
    assert torch.equal(x0, batch.video_latents.float()) and torch.equal(ref, batch.ref_latents.float())
    out = step(_Engine(model), batch, 1, 0)
    assert torch.isfinite(out.loss) and out.samples == batch.size
    frames = sample_video(_Engine(model), vae, batch, 5, 1, False, 0, torch.float32)
    h, w = batch.resolution
    assert frames.shape == (5, h, 3 * w, 3) and frames.dtype == np.uint8


class _Engine(torch.nn.Module):
    """What FlowMatchingStep and sample_video need of a DeepSpeed engine: ``module`` and a forward."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
