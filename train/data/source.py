"""Where samples come from: the shard list, each shard's metadata, and a shard's samples as a stream.

Local paths and object-store URLs (``s3://``, ``gs://``, ...) go through fsspec. A shard's metadata
(clip key, frame count, fps, size, in tar order) comes from the stats file the preprocessing writer
commits next to it (``{part}.parquet``); a shard without one (shards from elsewhere) is scanned once
for its ``meta.json`` members.
"""
from __future__ import annotations

import io
import json
import logging
import time

import numpy as np

from preprocess import schema
from preprocess.shards import DATASET_FILE, INDEX_FILE, LATENTS_DIR, SHARD_DIR, TAR_ERRORS
from preprocess.shards import iter_samples as iter_tar_samples

from .config import ConfigError, SourceConfig
from .plan import ShardMeta

log = logging.getLogger(__name__)

META = schema.field("meta")


class ShardError(RuntimeError):
    """A shard that cannot be read; ``reason`` is the skip-count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _fs(url: str, storage_options: dict):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def expand_shards(patterns: list[str], storage_options: dict) -> list[str]:
    """Brace patterns and (local or object-store) globs -> sorted shard URLs."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for pat in patterns:
        for url in expand_urls(pat):
            if any(ch in url for ch in "*?["):
                fs, path = _fs(url, storage_options)
                proto = url.split("://", 1)[0] + "://" if "://" in url else ""
                out.extend(proto + p if proto and not p.startswith(proto) else p for p in sorted(fs.glob(path)))
            else:
                out.append(url)
    return sorted(dict.fromkeys(out))


def resolve_source(cfg: SourceConfig) -> tuple[list[str], list[str] | None]:
    """(shard URLs, field groups of the dataset or None when unknown)."""
    if cfg.shards:
        urls = expand_shards(list(cfg.shards), cfg.storage_options)
        if not urls:
            raise FileNotFoundError(f"data.source.shards={list(cfg.shards)} matches no shard")
        return urls, None
    root = cfg.dataset
    fs, path = _fs(root, cfg.storage_options)
    groups = None
    ds_file = _join(path, DATASET_FILE)
    if fs.exists(ds_file):
        info = json.loads(fs.cat_file(ds_file))
        schema.check_version(info, root)
        groups = list(info.get("groups", []))
    index_file = _join(path, INDEX_FILE)
    if fs.exists(index_file):
        import pyarrow.parquet as pq

        names = sorted(set(pq.read_table(io.BytesIO(fs.cat_file(index_file)), columns=["shard"])
                           .column("shard").to_pylist()))
        urls = [_join(root, SHARD_DIR, n) for n in names if n]
    else:
        log.warning("%s has no %s: using every shard in %s/", root, INDEX_FILE, SHARD_DIR)
        urls = expand_shards([_join(root, SHARD_DIR, "*.tar")], cfg.storage_options)
    if not urls:
        raise FileNotFoundError(f"data.source.dataset={root!r} holds no shards "
                                "(run preprocess/run.py output=... first)")
    return urls, groups


def dataset_audio(cfg: SourceConfig) -> tuple[int | None, str]:
    """(clips of the dataset that have audio, why it has none when 0); None for shard URLs (no dataset.json and
    index to say). A dataset made before audio was kept (schema < 3) has none."""
    if cfg.shards:
        return None, ""
    fs, path = _fs(cfg.dataset, cfg.storage_options)
    ds_file, index_file = _join(path, DATASET_FILE), _join(path, INDEX_FILE)
    if not fs.exists(ds_file):
        return None, ""
    version = json.loads(fs.cat_file(ds_file)).get("schema_version")
    if not isinstance(version, int) or version < schema.META_KEYS_SINCE["audio_status"]:
        return 0, f"it was written with schema_version {version}, before clips kept their audio (3)"
    if not fs.exists(index_file):
        return None, ""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(fs.cat_file(index_file)))
    status = table.column("audio_status").to_pylist() if "audio_status" in table.column_names else []
    n = sum(s == schema.AUDIO_OK for s in status)
    kinds = ", ".join(f"{k}: {status.count(k)}" for k in sorted(set(status)))
    return n, "" if n else f"none of its {len(status)} clips has audio (audio_status {kinds or 'absent'})"


def _retry(fn, retries: int, what: str):
    """Call ``fn``; transient errors are retried ``retries`` times, a missing file is not."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # network hiccups of object stores
            if attempt == retries:
                raise
            log.warning("%s failed (%s: %s); retry %d/%d", what, type(e).__name__, e, attempt + 1, retries)
            time.sleep(0.5 * 2 ** attempt)


def stats_url(shard_url: str) -> str:
    """The writer's stats file of a shard: ``{part}.parquet`` beside ``{part}.tar``."""
    return shard_url[:-len(".tar")] + ".parquet" if shard_url.endswith(".tar") else shard_url + ".parquet"


def load_shard_meta(url: str, cfg: SourceConfig) -> ShardMeta:
    """Metadata of a shard's samples in tar order; raises :class:`ShardError` when the shard is unusable."""
    import fsspec

    surl = stats_url(url)
    try:
        data = _retry(lambda: fsspec.open(surl, "rb", **cfg.storage_options).open().read(), cfg.read_retries, surl)
    except FileNotFoundError:
        data = None
    except Exception as e:
        raise ShardError("stats_unreadable", f"{surl}: {type(e).__name__}: {e}") from None
    if data is not None:
        import pyarrow.parquet as pq

        df = pq.read_table(io.BytesIO(data)).to_pandas()
        name = url.rsplit("/", 1)[-1]
        rows = df[(df["kind"] == "clip") & (df["status"] == "ok") & (df["shard"] == name)]
        return ShardMeta(url, tuple(rows["key"]), rows["n_frames"].to_numpy(np.int64), rows["fps"].to_numpy(np.float64),
                         rows["width"].to_numpy(np.int64), rows["height"].to_numpy(np.int64))
    log.warning("%s has no stats file %s: scanning the tar for its samples (the shard is read twice)", url, surl)
    keys, n, fps, w, h = [], [], [], [], []
    for key, members in iter_samples(url, cfg, select=lambda key, member: member == META.member):
        if META.member not in members:
            continue
        meta = schema.decode(META, members[META.member])
        keys.append(key)
        n.append(int(meta["n_frames"]))
        fps.append(float(meta["fps"]))
        w.append(int(meta["width"]))
        h.append(int(meta["height"]))
    return ShardMeta(url, tuple(keys), np.array(n, np.int64), np.array(fps), np.array(w, np.int64),
                     np.array(h, np.int64))


def latent_cache_url(cfg: SourceConfig) -> str:
    """Where ``data.latents=true`` reads: ``data.source.latents``, else the dataset's ``latents/``."""
    if cfg.latents:
        return cfg.latents
    if cfg.dataset:
        return _join(cfg.dataset, LATENTS_DIR)
    raise ConfigError("data.latents=true with data.source.shards: name the latent cache in data.source.latents")


def sidecar_url(cache: str, shard_url: str) -> str:
    """The latent cache's part of a dataset shard: the part of the same name in the cache's ``shards/``."""
    return _join(cache, SHARD_DIR, shard_url.rsplit("/", 1)[-1])


def with_sidecar(samples, sidecar):
    """``(key, members)`` of a shard with the members of its sidecar added. Both streams are in the shard's tar
    order and the sidecar holds a subset of its keys (a clip that failed to encode has none), so one look-ahead
    pairs them. A sidecar that cannot be read raises :class:`ShardError` ``latents_<reason>``."""
    pending = None
    ended = False
    for key, members in samples:
        if pending is None and not ended:
            try:
                pending = next(sidecar)
            except StopIteration:
                ended = True
            except ShardError as e:
                raise ShardError(f"latents_{e.reason}", str(e)) from None
        if pending is not None and pending[0] == key:
            members.update(pending[1])
            pending = None
        yield key, members


def iter_samples(url: str, cfg: SourceConfig, select=None):
    """Stream ``(key, {member: bytes})`` of a shard in tar order, reading it once, sequentially.

    ``select(key, member) -> bool`` keeps only some members (the rest are streamed past, not stored).
    Raises :class:`ShardError` (``shard_missing`` / ``shard_unreadable`` / ``shard_corrupt``) when the shard
    cannot be opened or breaks off; the samples before the break are still yielded (a sample is
    complete once a member of the next one has begun).
    """
    import fsspec

    try:
        f = _retry(lambda: fsspec.open(url, "rb", **cfg.storage_options).open(), cfg.read_retries, url)
    except FileNotFoundError:
        raise ShardError("shard_missing", f"{url}: no such shard") from None
    except Exception as e:
        raise ShardError("shard_unreadable", f"{url}: {type(e).__name__}: {e}") from None
    key = None
    with f:
        try:
            for key, members in iter_tar_samples(f, select):
                yield key, members
        except TAR_ERRORS as e:
            raise ShardError("shard_corrupt", f"{url}: {type(e).__name__}: {e} (after sample {key})") from None
