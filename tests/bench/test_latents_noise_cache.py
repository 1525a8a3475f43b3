"""``bench/latents.py --noise-cache``: the loader bench's cache (noise latents through the pass's own read stage and
writer) of an existing dataset at other buckets, for a trainer run where the pass cannot run."""
from __future__ import annotations

import json

from bench.latents import main


def test_noise_cache_follows_the_given_buckets(train_dataset, tmp_path):
    cache = tmp_path / "cache"
    r = main(["--dataset", str(train_dataset), "--frames", "13", "--noise-cache", str(cache), "--override",
              "data.buckets.area=16384", "data.buckets.aspect_ratios=[1.0]"])
    manifest = json.loads((cache / "latents.json").read_text())
    assert manifest["framing"]["buckets"] == [[128, 128]] and manifest["max_frames"] == 13
    assert r["bytes"] > 0 and list((cache / "shards").glob("*.tar"))
