"""python preprocess/latents.py dataset=DIR [model=wan1_3b model.weights.vae_dir=...] [data=prod] [+cluster=latents]:
the latent cache of a dataset, an optional pass after preprocessing.

Every committed clip is encoded once by the frozen VAE at its training bucket, as prefix sampling frames it (the
loader's own rule, ``train.data.plan.Framing``, and its own crop and resize steps, ``train.data.sample.cache_inputs``):
its first frames (the longest 1 + 4k prefix at the stride, up to ``data.frames.max``), the primary-reference
candidates and the stored references, each of those alone. The causal VAE makes the latents of every shorter
1 + 4k prefix the leading latent frames of these, so the loader (``data.latents=true``) draws any length from them.

    parts → read (actor pool, CPU: stream the part's tar once, decode + crop, group clips of one shape)
          → encode (actor pool, a GPU each in prod: the VAE loaded once per actor, one call per group)
          → the driver writes the sidecar part: ``<cache>/shards/{part}.tar`` (the dataset part's keys, in its order)
            then ``{part}.parquet`` (the commit), as the preprocessing writer does.

The cache (``cache=``, default ``<dataset>/latents``) is laid out like a dataset output (preprocess/shards.py);
``latents.json`` (written first) records the VAE's identity (``models.vae.vae_identity``), the framing rule, the
frame limit and the format version: a rerun with another VAE or rule is refused, and so is a loader. Rerun the same
command to resume: committed parts are skipped, damaged ones (size, ``verify=deep``: sha256) and parts in flight are
redone, parts of the dataset retired since are dropped. Exit 0 when every clip has its latents, 3 when some clip or
part failed (the stats files and the summary name them), 2 on a bad config or a cache in use by another run.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python preprocess/latents.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.typed_config import ConfigError, from_node
from preprocess import schema
from preprocess.config import LockConfig, RayConfig, Resources, Verify
from preprocess.shards import (
    DATASET_FILE,
    LATENTS_DIR,
    LATENTS_FILE,
    SHARD_DIR,
    TAR_ERRORS,
    digest,
    encode_stats,
    iter_samples,
    part_of,
    stats_path,
    tar_path,
)
from preprocess.stage import FAILED, OK, Stage, check_stages, fail, new_row

log = logging.getLogger("preprocess.latents")

EXIT_OK, EXIT_FAILURES = 0, 3
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- config
@dataclass
class LatentsJob:
    """The pass's own settings (``conf/latents.yaml``); the model and data groups are typed by their modules."""

    dataset: str  # a preprocess output
    cache: str | None  # None: <dataset>/latents
    seed: int  # train.seed of the runs that read the cache (seeds a randomly initialised VAE)
    device: str  # auto: cuda when an encode actor has a GPU, else cpu | cpu | cuda
    batch_clips: int  # clips of one shape per VAE call
    ray: RayConfig
    lock: LockConfig
    read: Resources  # the read stage (an actor pool on CPUs)
    encode: Resources  # the encode stage (an actor pool: num_gpus per actor)
    verify: Verify  # how committed sidecar parts are checked: size | deep (sha256)
    progress_interval_s: float
    model: Any = None  # models.config.ModelConfig
    data: Any = None  # train.data.DataConfig

    @property
    def cache_uri(self) -> str:
        return self.cache or f"{self.dataset.rstrip('/')}/{LATENTS_DIR}"


def to_config(cfg) -> LatentsJob:
    """The composed Hydra config as a checked :class:`LatentsJob`."""
    from omegaconf import OmegaConf

    from models.config import ModelConfig
    from train.data import to_config as data_config

    node = OmegaConf.to_container(cfg, resolve=True)
    model, data = node.pop("model"), node.pop("data")
    job: LatentsJob = from_node(LatentsJob, node, "")
    try:
        job.model = ModelConfig.from_dict(model)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"bad model config: {e}") from None
    job.data = data_config(data)
    if job.batch_clips < 1:
        raise ConfigError(f"batch_clips={job.batch_clips} must be >= 1")
    if job.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={job.device!r}: use auto, cpu or cuda")
    for name in ("read", "encode"):
        r = getattr(job, name)
        if r.num_cpus < 0 or r.num_gpus < 0 or r.batch_size < 1:
            raise ConfigError(f"{name}: num_cpus/num_gpus >= 0 and batch_size >= 1")
    return job


# ---------------------------------------------------------------- manifest
def manifest(framing, model_cfg, seed: int, max_frames: int) -> dict:
    """What a cache is made for (its ``latents.json``, less the creation time): compared key by key."""
    from models.vae import vae_identity

    return {"version": schema.LATENTS_VERSION, "vae": vae_identity(model_cfg.vae, model_cfg.weights.vae_dir, seed),
            "latent_channels": model_cfg.vae.latent_channels, "framing": framing.rule(), "max_frames": max_frames}


def mismatches(have: dict, want: dict, reader: bool) -> list[str]:
    """Why a cache made for ``have`` cannot serve ``want``, one line per key naming both values. A reader (the
    loader) accepts a cache holding longer prefixes than it draws; a rerun of the pass needs every key equal."""
    out = []
    for k, v in want.items():
        got = have.get(k)
        if k == "max_frames" and reader:
            if not isinstance(got, int) or got < v:
                out.append(f"max_frames: the cache holds at most {got} frames per clip, data.frames.max is {v}")
        elif k == "framing" and isinstance(got, dict):
            out += [f"framing.{f}: cache {got.get(f)!r}, wanted {v[f]!r}" for f in v if got.get(f) != v[f]]
        elif got != v:
            out.append(f"{k}: cache {json.dumps(got, sort_keys=True)}, wanted {json.dumps(v, sort_keys=True)}")
    return out


def check_cache(cache: str, storage_options: dict, want: dict, shard_urls: list[str]) -> None:
    """The loader's check (any fsspec URL): refuse a cache that is missing, was made for another VAE or framing than
    ``want`` (:func:`manifest`), holds shorter clips, or lacks a committed part for one of the shards."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(cache, **storage_options)
    path = path.rstrip("/")
    if not fs.exists(f"{path}/{LATENTS_FILE}"):
        raise ConfigError(f"data.latents=true: no latent cache at {cache} (no {LATENTS_FILE}); make it with "
                          "python preprocess/latents.py dataset=<the dataset> (same model and data settings), or set "
                          "data.source.latents")
    why = mismatches(json.loads(fs.cat_file(f"{path}/{LATENTS_FILE}")), want, reader=True)
    if why:
        raise ConfigError(f"the latent cache {cache} was made for another VAE or framing than this run's: "
                          f"{'; '.join(why)}. Make a cache for this model and data config (python "
                          "preprocess/latents.py ... cache=<new dir>) or train with data.latents=false")
    names = fs.ls(f"{path}/{SHARD_DIR}", detail=False) if fs.exists(f"{path}/{SHARD_DIR}") else []
    committed = {n.rsplit("/", 1)[-1] for n in names}
    missing = [u for u in shard_urls if stats_path(part_of(u)).rsplit("/", 1)[-1] not in committed]
    if missing:
        raise ConfigError(f"the latent cache {cache} has no committed latents for {len(missing)} of {len(shard_urls)} "
                          f"shards (e.g. {missing[0]}): rerun python preprocess/latents.py on the dataset to finish it")


# ---------------------------------------------------------------- stages
class ReadStage(Stage):
    """One dataset part → groups of its clips of one shape (frames, bucket), decoded and cropped as prefix sampling
    does (``train.data.sample.cache_inputs``). The tar is streamed once; a clip waits as its compressed members until
    its group is full. A part that cannot be read is one failed row (the part is retried by the next run). An actor
    pool of its own, so that Ray Data does not fuse it into the encode actors (the GPU would wait for decoding)."""

    name = "latent_read"
    reads = ("part_keys",)
    writes = ("latent_group",)

    @dataclass
    class Params:
        dataset: str
        framing: Any  # train.data.plan.Framing
        max_frames: int
        groups: list  # the dataset's groups the crop and the references need (subject, refs)
        decoder: str
        batch_clips: int

    def process_batch(self, rows: list[dict]):
        for row in rows:
            yield from self.part(row)

    def part(self, row: dict):
        from preprocess.storage import Storage

        p, part = self.params, row["key"]
        keys = list(row["part_keys"])
        order = {k: i for i, k in enumerate(keys)}
        pending: dict[tuple, list] = {}
        wanted = {f.member for f in schema.fields_of(["clip", *p.groups])}  # what cache_inputs reads
        try:
            storage = Storage(p.dataset, create=False)
            with storage.fs.open_input_stream(storage.path(tar_path(part))) as f:
                for key, members in iter_samples(f, select=lambda k, m: k in order and m in wanted):
                    if key not in order:
                        continue
                    shape = self.shape(members)
                    pending.setdefault(shape, []).append((order.pop(key), key, members))
                    if len(pending[shape]) >= p.batch_clips:
                        yield [self.group(part, pending.pop(shape))]
        except (*TAR_ERRORS, FileNotFoundError) as e:
            yield [fail(new_row(key=part, kind="part", latent_group=None), self.name, e)]
            return
        for clips in pending.values():
            yield [self.group(part, clips)]
        if order:  # committed keys the tar lacks: a damaged part (preprocess retires it on its next run)
            yield [self.group(part, [(i, k, None) for k, i in order.items()])]

    def shape(self, members: dict) -> tuple:
        """(frames, bucket) of a clip from its meta.json: clips of one shape are encoded in one call."""
        try:
            meta = schema.decode(schema.field("meta"), members[schema.field("meta").member])
            f = self.params.framing
            frames = f.cached_frames(int(meta["n_frames"]), float(meta["fps"]), self.params.max_frames)
            return len(frames), f.bucket_of(int(meta["width"]), int(meta["height"]))
        except Exception:  # noqa: BLE001 - the clip fails in group(), with the reason
            return (-1, -1)

    def group(self, part: str, clips: list) -> dict:
        """The row of one group: per clip its position in the tar, key and CacheInputs (or the error)."""
        from train.data.sample import cache_inputs

        p = self.params
        t0 = time.perf_counter()
        out = []
        for i, key, members in clips:
            clip = {"order": i, "key": key}
            try:
                if members is None:
                    raise FileNotFoundError(f"{key} is committed in {part} but not in its tar")
                clip["inputs"] = cache_inputs(members, p.framing, p.max_frames, p.groups, decoder=p.decoder)
            except Exception as e:  # noqa: BLE001 - one bad clip never stops the part
                clip["error"] = (type(e).__name__, str(e)[:500])
            out.append(clip)
        return new_row(key=part, kind="part", latent_group=out, timings={self.name: time.perf_counter() - t0})


class EncodeStage(Stage):
    """A group of clips → the members of their sidecar samples: the VAE (loaded once per actor) encodes the group's
    videos in one call and every candidate and reference image, each a one-frame clip, in another."""

    name = "latent_encode"
    reads = ("latent_group",)
    writes = ("latent_group",)

    @dataclass
    class Params:
        model: Any  # models.config.ModelConfig
        seed: int
        device: str
        num_threads: int

    def setup(self) -> None:
        import torch

        from models.vae import VideoVAE
        from train.step import vae_seed

        p = self.params
        torch.set_num_threads(max(1, p.num_threads))
        self.device = torch.device("cuda" if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
        torch.manual_seed(vae_seed(p.seed))  # what train.step.build_vae seeds a random init with
        self.vae = VideoVAE.from_config(p.model.vae, p.model.weights.vae_dir).to(self.device)

    def process_batch(self, rows: list[dict]) -> list[dict]:
        for row in rows:
            if row["status"] == OK:
                ok = [c for c in row["latent_group"] if "inputs" in c]
                if ok:
                    t0 = time.perf_counter()
                    self.encode(ok)
                    row["timings"][self.name] = time.perf_counter() - t0
        return rows

    def encode(self, clips: list[dict]) -> None:
        """Replace each clip's ``inputs`` by its sidecar ``members`` ({member: bytes})."""
        import torch

        from models.vae import pixels_to_vae

        def latents(images: np.ndarray) -> np.ndarray:  # (N, T, H, W, 3) uint8 -> (N, C, t, h, w) float16
            x = pixels_to_vae(torch.from_numpy(images).to(self.device).permute(0, 4, 1, 2, 3))
            return self.vae.encode(x).cpu().numpy().astype(np.float16)

        video = latents(np.stack([c["inputs"].video for c in clips]))
        images = np.concatenate([np.concatenate([c["inputs"].primaries, c["inputs"].refs]) for c in clips])
        single = latents(images[:, None])[:, :, 0]  # (N, C, h, w)
        at = 0
        for i, c in enumerate(clips):
            x = c.pop("inputs")
            k, r = len(x.primary_frames), len(x.ref_roles)
            values = {
                "latent_meta": {"bucket": list(x.bucket), "crop_box": [int(v) for v in x.box],
                                "frames": list(x.frames), "primary_frames": list(x.primary_frames),
                                "ref_roles": list(x.ref_roles)},
                "video_latents": video[i],
                "primary_latents": single[at:at + k].transpose(1, 0, 2, 3),
                "ref_latents": single[at + k:at + k + r].transpose(1, 0, 2, 3),
            }
            at += k + r
            if not all(np.isfinite(v).all() for n, v in values.items() if n != "latent_meta"):
                c["error"] = ("NonFiniteLatents", "the latents overflow float16 or are not finite")
                continue
            c["frames"], c["span"], c["latent_frames"] = len(x.frames), x.frames[-1] + 1, int(video.shape[2])
            c["members"] = [(f"{c['key']}.{f.member}", schema.encode(f, values[f.name])) for f in schema.LATENT_FIELDS]


# ---------------------------------------------------------------- the sidecar writer (driver side)
def _tar_members(members: list[tuple[str, bytes]]) -> bytes:
    """Tar headers and data of some members, as they stand inside a tar (concatenated fragments + the end blocks
    make a tar)."""
    out = bytearray()
    for name, data in members:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "", ""
        out += ti.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


class SidecarWriter:
    """Collects encoded groups (any order, any part) and commits a part once every committed clip of its dataset
    part has arrived: each clip's members wait in a staging file, the tar is assembled in the dataset part's order,
    published, and its stats file written last (the commit)."""

    def __init__(self, storage, parts: dict[str, list[str]], lock, fps: dict[str, float]):
        self.storage, self.lock, self.fps = storage, lock, fps
        self.expected = {p: set(k) for p, k in parts.items()}
        self.rows: dict[str, list[dict]] = {p: [] for p in parts}
        self.failed: dict[str, str] = {}  # part -> why (not committed: the next run retries it)
        self.staging = storage.staging_dir()
        self.seconds = 0.0  # video seconds the committed latents cover
        self.clips_ok = 0
        self.stage_seconds: dict[str, float] = {}  # busy seconds of each stage, summed over its workers

    def add(self, row: dict) -> dict | None:
        """Take one output row; returns the commit event of the part it completed, if any."""
        part = row["key"]
        if part in self.failed or part not in self.rows:
            return None
        if row["status"] != OK:
            self.failed[part] = f"{row['error_class']}: {row['error_message']}"
            shutil.rmtree(os.path.join(self.staging, part), ignore_errors=True)
            return None
        for stage, sec in row["timings"].items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + sec
        for c in row["latent_group"]:
            rec = {"kind": "clip", "key": c["key"], "order": c["order"], "status": OK, "error_class": "",
                   "error_message": "", "shard": "", "frames": c.get("frames", 0),
                   "latent_frames": c.get("latent_frames", 0), "seconds": 0.0, "bytes": 0}
            if "members" in c:
                data = _tar_members(c["members"])
                d = os.path.join(self.staging, part)
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"{c['order']:06d}"), "wb") as f:
                    f.write(data)
                rec.update(shard=part + ".tar", bytes=sum(len(b) for _, b in c["members"]),
                           seconds=c["span"] / self.fps[c["key"]])
                self.seconds += rec["seconds"]
                self.clips_ok += 1
            else:
                rec.update(status=FAILED, error_class=c["error"][0], error_message=c["error"][1])
            self.rows[part].append(rec)
            self.expected[part].discard(c["key"])
        return self.commit(part) if not self.expected[part] else None

    def commit(self, part: str) -> dict:
        """Assemble, publish and commit ``part``."""
        import pandas as pd

        rows = sorted(self.rows.pop(part), key=lambda r: r["order"])
        d = os.path.join(self.staging, part)
        tmp = os.path.join(self.staging, part + ".tar.tmp")
        info = {"tar_bytes": 0, "tar_sha256": None}
        if any(r["status"] == OK for r in rows):
            with open(tmp, "wb") as out:
                for r in rows:
                    if r["status"] == OK:
                        with open(os.path.join(d, f"{r['order']:06d}"), "rb") as f:
                            shutil.copyfileobj(f, out)
                out.write(bytes(2 * tarfile.BLOCKSIZE))
                out.write(bytes(-out.tell() % tarfile.RECORDSIZE))
            with open(tmp, "rb") as f:
                info = {"tar_bytes": os.path.getsize(tmp), "tar_sha256": digest(f)}
            self.lock.check()
            self.storage.put_file(tmp, tar_path(part))
        self.lock.check()
        self.storage.write_bytes(stats_path(part), encode_stats(pd.DataFrame(rows), info))
        shutil.rmtree(d, ignore_errors=True)
        n_ok = sum(r["status"] == OK for r in rows)
        return {"part": part, "clips": n_ok, "failed": len(rows) - n_ok, "bytes": info["tar_bytes"]}


# ---------------------------------------------------------------- the driver
def committed_parts(dataset_storage) -> tuple[dict[str, list[str]], dict[str, float], dict]:
    """({part: committed clip keys in tar order}, {key: fps}, dataset.json) of a dataset."""
    from preprocess.state import load_committed, read_json

    if not dataset_storage.exists(DATASET_FILE):
        raise ConfigError(f"dataset={dataset_storage.uri}: no {DATASET_FILE}; give the output= of a preprocess/run.py "
                          "run")
    info = read_json(dataset_storage, DATASET_FILE)
    try:
        schema.check_version(info, f"dataset={dataset_storage.uri}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    st = load_committed(dataset_storage, cleanup=False).stats
    if st.empty:
        return {}, {}, info
    ok = st[(st["kind"] == "clip") & (st["status"] == "ok")]
    parts = {p: list(rows["key"]) for p, rows in ok.groupby("part", sort=True)}
    return parts, dict(zip(ok["key"], ok["fps"].astype(float))), info


def prepare_cache(storage, want: dict, deep: bool, dataset_parts, run_id: str) -> set[str]:
    """The cache's committed parts after this run's checks: the manifest written or matched, debris deleted, damaged
    parts retired (redone), parts of parts the dataset no longer has dropped."""
    from preprocess.state import damaged_parts, load_committed, read_json, retire_parts, write_json

    if storage.exists(LATENTS_FILE):
        have = read_json(storage, LATENTS_FILE)
        why = mismatches(have, want, reader=False)
        if why:
            raise ConfigError(f"cache={storage.uri} was made for another VAE or rule ({'; '.join(why)}): use another "
                              "cache= or delete it")
    else:
        write_json(storage, LATENTS_FILE, {**want, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if storage.local:
        shutil.rmtree(storage.path("_staging"), ignore_errors=True)
    committed = load_committed(storage, cleanup=True)
    damaged = damaged_parts(storage, committed, deep)
    for part, why in damaged.items():
        log.warning("%s: the cache's part %s is damaged: it is redone", why, part)
    retire_parts(storage, damaged, run_id)
    for part in set(committed.parts) - set(damaged) - set(dataset_parts):
        log.info("the dataset no longer has part %s: its latents are deleted", part)
        storage.delete(stats_path(part))
        storage.delete(tar_path(part))
    return (set(committed.parts) - set(damaged)) & set(dataset_parts)


def run(job: LatentsJob) -> int:
    """Encode every committed clip of the dataset that has no committed latents; returns the exit code."""
    from preprocess.lock import OutputLock
    from preprocess.state import write_json
    from preprocess.storage import Storage
    from train.data.plan import Framing, Geometry

    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + secrets.token_hex(2)
    dataset = Storage(job.dataset, create=False)
    if not dataset.root_exists():
        raise ConfigError(f"dataset={job.dataset}: no such directory (give the output= of a preprocess/run.py run)")
    parts, fps, info = committed_parts(dataset)
    framing = Framing.of(job.data, Geometry.of_model(job.model))
    want = manifest(framing, job.model, job.seed, job.data.frames.max)
    storage = Storage(job.cache_uri)
    with OutputLock(storage, run_id, job.lock) as lock:
        done = prepare_cache(storage, want, job.verify == "deep", parts, run_id)
        todo = {p: k for p, k in parts.items() if p not in done}
        log.info("%d parts with clips in %s; %d have latents in %s; %d to encode", len(parts), job.dataset, len(done),
                 storage.uri, len(todo))
        writer = SidecarWriter(storage, todo, lock, fps)
        try:
            events = encode_parts(job, framing, todo, info.get("groups", ["clip"]), writer, lock) if todo else []
        finally:
            shutil.rmtree(writer.staging, ignore_errors=True)  # what is left belongs to no committed part
        summary = {"run_id": run_id, "cache": storage.uri, "wall_seconds": round(time.time() - t0, 3),
                   "parts": len(parts), "parts_done_before": len(done), "parts_committed": len(events),
                   "parts_failed": writer.failed, "clips_encoded": writer.clips_ok,
                   "clips_failed": sum(e["failed"] for e in events), "video_seconds_encoded": round(writer.seconds, 3),
                   "stage_seconds": {k: round(v, 3) for k, v in writer.stage_seconds.items()},
                   "encode_actors": job.encode.pool[1], "encode_gpus_per_actor": job.encode.num_gpus}
        write_json(storage, SUMMARY_FILE, summary)
    print(f"[latents] {storage.url(SHARD_DIR)}: {len(events)} parts committed, {writer.clips_ok} clips encoded "
          f"({summary['clips_failed']} failed), {len(writer.failed)} parts failed; summary {storage.url(SUMMARY_FILE)}",
          flush=True)
    return EXIT_FAILURES if writer.failed or summary["clips_failed"] else EXIT_OK


def build_stages(job: LatentsJob, framing, groups) -> tuple[ReadStage, EncodeStage]:
    """The read and encode stages of the pass (not set up), checked: each reads what the one before writes."""
    read = ReadStage({"dataset": job.dataset, "framing": framing, "max_frames": job.data.frames.max,
                      "groups": [g for g in groups if g in ("subject", "refs")],
                      "decoder": str(job.data.workers.decoder), "batch_clips": job.batch_clips}).using(job.read)
    encode = EncodeStage({"model": job.model, "seed": job.seed, "device": job.device,
                          "num_threads": max(1, int(job.encode.num_cpus))}).using(job.encode)
    check_stages([read, encode], given=("part_keys",))
    return read, encode


def encode_parts(job: LatentsJob, framing, todo: dict[str, list[str]], groups, writer: SidecarWriter, lock) -> list:
    """Stream the parts through the read and encode stages on Ray Data; the writer commits each part as it
    completes. Returns the commit events."""
    import ray

    from preprocess.adapter import from_rows, map_stage, set_data_context, unpack
    from preprocess.pipeline import init_ray

    read, encode = build_stages(job, framing, groups)
    init_ray(job)
    set_data_context(job.ray.progress_bars, job.ray.block_bytes)  # a group of clips per block, not 128 MiB
    rows = [new_row(key=p, kind="part", part_keys=keys) for p, keys in sorted(todo.items())]
    ds = map_stage(map_stage(from_rows(rows, num_blocks=max(1, min(len(rows), 200))), read), encode)
    events, last, t0 = [], time.time(), time.time()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            lock.check()
            for row in unpack(batch):
                ev = writer.add(row)
                if ev is not None:
                    events.append(ev)
            if time.time() - last >= job.progress_interval_s:
                last = time.time()
                el = last - t0
                print(f"[latents] parts {len(events)}/{len(todo)} · clips {writer.clips_ok} "
                      f"({writer.clips_ok / el:.2f}/s) · video hours {writer.seconds / 3600:.4f} · elapsed {el:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    for part in set(todo) - {e["part"] for e in events} - set(writer.failed):
        writer.failed[part] = "incomplete: not every clip came back (a worker was lost); rerun to redo it"
    return events


def main() -> None:
    import hydra

    @hydra.main(config_path="../conf", config_name="latents", version_base="1.3")
    def _main(dcfg) -> None:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the cache's lock is released
        try:
            code = run(to_config(dcfg))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        sys.exit(code)

    _main()


if __name__ == "__main__":
    from models.command_line import exit_on_bad_command_line

    exit_on_bad_command_line("latents", to_config)
    main()
