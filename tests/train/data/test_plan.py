"""The epoch plan on synthetic shard metadata (thousands of clips, no decoding): every sample once per
epoch, lengths and frame rates, buckets and token budget, dropout frequencies, and the cursor's
redistribution of remaining work across consumer counts."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest

from models.config import load_preset
from tests.conftest import compose
from train.data.config import to_config
from train.data.loader import Assignment
from train.data.plan import Geometry, Planner, ShardMeta

ASPECTS = ((1280, 720), (720, 1280), (960, 960), (1024, 768), (640, 480))


def synthetic_metas(n_shards=24, per_shard=60, seed=0) -> list[ShardMeta]:
    """Shards of clips with random lengths (some too short), frame rates and sizes."""
    g = np.random.default_rng(seed)
    metas = []
    for s in range(n_shards):
        n = per_shard + int(g.integers(-10, 10))
        sizes = [ASPECTS[i] for i in g.integers(0, len(ASPECTS), n)]
        metas.append(ShardMeta(f"mem://shard{s:03d}.tar", tuple(f"{s:08x}{i:08x}_{i % 7:04d}" for i in range(n)),
                               g.integers(15, 130, n), g.choice([24.0, 25.0, 30.0, 50.0], n),
                               np.array([w for w, _ in sizes]), np.array([h for _, h in sizes])))
    return metas


def planner_for(metas, *overrides, seed=0) -> Planner:
    cfg = to_config(compose("data/prod", ["data.source.dataset=unused", *overrides]).data)
    return Planner(cfg, Geometry.of_model(load_preset("wan1_3b")), [m.url for m in metas], seed)


def epoch_plans(planner: Planner, metas, epoch: int):
    by_url = {m.url: m for m in metas}
    for w in range(planner.windows_per_epoch):
        g = epoch * planner.windows_per_epoch + w
        _, urls = planner.window_shard_urls(g)
        yield planner.plan_window(g, [by_url[u] for u in urls])


@pytest.fixture(scope="module")
def metas():
    return synthetic_metas()


def test_every_shard_and_sample_once_per_epoch(metas):
    planner = planner_for(metas, "data.frames.target_fps=25")
    every = {k for m in metas for k in m.keys}
    orders = []
    for epoch in range(3):
        plans = list(epoch_plans(planner, metas, epoch))
        shards = [u for p in plans for u in p.shard_urls]
        assert sorted(shards) == sorted(m.url for m in metas)  # each shard in exactly one window
        keys = [s.key for p in plans for b in p.batches for s in b.samples]
        short = sum(p.excluded.get("samples/too_short", 0) for p in plans)
        assert len(keys) == len(set(keys)) and len(keys) + short == len(every)
        assert short > 0 and set(keys) <= every
        assert all(s.epoch == epoch for p in plans for b in p.batches for s in b.samples)
        orders.append(keys)
    assert orders[0] != orders[1]  # reshuffled per epoch
    again = [s.key for p in epoch_plans(planner_for(metas, "data.frames.target_fps=25"), metas, 0)
             for b in p.batches for s in b.samples]
    assert again == orders[0]  # and deterministic


def test_lengths_frame_rates_buckets_and_token_budget(metas):
    planner = planner_for(metas, "data.frames.target_fps=25")
    cfg = planner.cfg
    by_key = {k: (m, i) for m in metas for i, k in enumerate(m.keys)}
    lengths, sizes = Counter(), Counter()
    for plan in epoch_plans(planner, metas, 0):
        for b in plan.batches:
            assert (b.height, b.width) in planner.buckets and cfg.refs.min <= b.refs <= cfg.refs.max
            tokens = planner.geometry.tokens(b.frames, b.height, b.width, cfg.refs.max)
            assert len(b.samples) == 1 or len(b.samples) * tokens <= cfg.buckets.token_budget
            assert len(b.samples) <= cfg.buckets.max_batch_size
            assert (b.frames - 1) % 4 == 0 and cfg.frames.min <= b.frames <= cfg.frames.max
            assert b.height * b.width == pytest.approx(cfg.buckets.area, rel=0.05)
            lengths[b.frames] += len(b.samples)
            sizes[len(b.samples)] += 1
            for s in b.samples:
                m, i = by_key[s.key]
                fps, n = float(m.fps[i]), int(m.n_frames[i])
                stride = max(1.0, fps / 25.0)
                assert s.fps == pytest.approx(fps / stride) and s.fps <= 25.0
                idx = np.array(s.frame_index)
                assert len(idx) == b.frames and idx[0] >= 0 and idx[-1] < n
                assert np.allclose(np.diff(idx), stride, atol=1.0)
                assert 0 <= s.primary_frame < n
                if idx[0] > 0 or idx[-1] < n - 1:  # a frame outside the window exists: it is the primary
                    assert not idx[0] <= s.primary_frame <= idx[-1]
                want = planner.bucket_of(int(m.width[i]), int(m.height[i]))
                assert planner.buckets[want] == (b.height, b.width)
                ratio = m.height[i] / m.width[i]
                assert all(abs(math.log(ratio / (h / w))) >= abs(math.log(ratio / (b.height / b.width))) - 1e-9
                           for h, w in planner.buckets)
    assert set(lengths) == set(planner.lengths.tolist())  # every length is drawn
    assert len(sizes) > 1  # short clips make bigger batches


@pytest.mark.parametrize("p_ref,p_motion", [(0.3, 0.1), (0.0, 1.0)])
def test_dropout_frequencies_match_the_configured_probabilities(metas, p_ref, p_motion):
    planner = planner_for(metas, f"data.dropout.ref={p_ref}", f"data.dropout.motion={p_motion}")
    flags = np.array([(s.drop_ref, s.drop_motion) for e in range(4) for p in epoch_plans(planner, metas, e)
                      for b in p.batches for s in b.samples], dtype=float)
    n = len(flags)
    assert n > 4000
    for freq, p in ((flags[:, 0].mean(), p_ref), (flags[:, 1].mean(), p_motion),
                    ((flags[:, 0] * flags[:, 1]).mean(), p_ref * p_motion)):  # independent draws
        sigma = math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(freq - p) <= 4 * sigma + 1e-12, (freq, p, n)


def _simulate(assignment: Assignment, sizes, steps, rng, done):
    """Consume ``steps[c]`` batches on each consumer (window w has ``sizes(w)`` batches); add the
    delivered (window, batch) pairs to ``done``; return the positions."""
    positions = []
    for c in range(assignment.consumers):
        p, b, left = 0, 0, steps[c]
        while True:
            w, start = assignment.item(c, p)
            b = max(b, start)
            if b >= sizes(w):
                p, b = p + 1, 0
                continue
            if left == 0:
                break
            done.append((w, b))
            b, left = b + 1, left - 1
        positions.append((p, b))
    return positions


@pytest.mark.parametrize("chain", [(1, 2), (2, 1), (4, 3, 7, 1), (3, 3, 5), (8, 2, 2)])
def test_remaining_work_is_shared_with_no_duplicate_and_no_gap(chain):
    """Consumers read some batches, the cursor is re-planned for another consumer count, again and
    again; at the end every (window, batch) below the frontier was delivered exactly once."""
    rng = np.random.default_rng(len(chain) * 100 + chain[0])
    size_of = rng.integers(0, 9, 1000)  # windows with 0..8 batches (0: every clip too short)

    def sizes(w):
        return int(size_of[w])

    done: list[tuple[int, int]] = []
    a = Assignment((), 0, chain[0])
    positions = None  # bound by the first iteration, read from the second on
    for i, c in enumerate(chain):
        if i:
            a = dataclasses.replace(a.remaining(positions), consumers=c)
        positions = _simulate(a, sizes, rng.integers(0, 25, c), rng, done)
    final = a.remaining(positions)
    assert len(done) == len(set(done)), "a batch was delivered twice"
    pending = {(w, b) for w, start in final.leftover for b in range(start, sizes(w))}
    assert not pending & set(done)
    everything = {(w, b) for w in range(final.base) for b in range(sizes(w))}
    assert set(done) | pending == everything, "a batch was lost"


def test_the_heldout_split_is_by_source_video_and_complementary():
    from types import SimpleNamespace

    from train.data.plan import heldout_fraction, in_split

    keys = [f"{v:016x}_{c:04d}" for v in range(400) for c in range(3)]
    train = SimpleNamespace(heldout_percent=10.0, role="train", salt="s")
    held = SimpleNamespace(heldout_percent=10.0, role="heldout", salt="s")
    t = {k for k in keys if in_split(k, train)}
    h = {k for k in keys if in_split(k, held)}
    assert t.isdisjoint(h) and t | h == set(keys)  # every clip on exactly one side
    videos = {k.rsplit("_", 1)[0] for k in h}
    assert all(f"{v}_{c:04d}" in h for v in videos for c in range(3))  # a video's clips stay together
    assert 20 <= len(videos) <= 60  # ~10% of 400 videos
    assert heldout_fraction("abc", "s") != heldout_fraction("abc", "t")  # the salt draws another split
    none = SimpleNamespace(heldout_percent=0.0, role="train", salt="s")
    assert all(in_split(k, none) for k in keys)


def test_primary_reference_outside_the_window_when_the_clip_allows_it(caplog):
    """``refs.primary_outside_window``: the primary reference is a frame outside the sampled window; a clip no longer
    than the window has none, so its reference is one of the frames to generate, and the planner says so (once)."""
    import train.data.plan as plan_module

    plan_module._warned_inside.clear()
    planner = planner_for(synthetic_metas(1, 10), "data.refs.primary_outside_window=true", "data.frames.min=17",
                          "data.frames.max=17", "data.frames.target_fps=null")
    for i in range(20):
        s = planner.plan_sample(f"k{i}", 0, 0, 33, 25.0)
        assert s.primary_frame not in range(s.frame_index[0], s.frame_index[-1] + 1), s
    assert not caplog.records
    with caplog.at_level("WARNING", logger="train.data.plan"):
        for i in range(3):
            s = planner.plan_sample(f"short{i}", 0, 0, 17, 25.0)
            assert s.frame_index == tuple(range(17)) and s.primary_frame in s.frame_index
    assert len(caplog.records) == 1 and "covers it" in caplog.text
