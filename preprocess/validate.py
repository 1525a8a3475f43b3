"""python preprocess/validate.py output=DIR_OR_URI [latents=CACHE] [--deep]: check every shard of a dataset.

Checks: each tar reads to its end; member names are ``{key}.{field}`` with well-formed keys; each
sample's members are contiguous and keys are unique across shards; every required field of the
dataset's groups is present with the schema's dtype and shape; the index and the shards' stats files
agree with the tars; each tar has the size its stats file committed; no uncommitted tar is lying around.
``--deep`` also decodes every clip video and compares its frame count with ``meta.n_frames`` (and every clip's audio
with its span), and each tar's sha256 with the committed one. A latent cache (``preprocess/latents.py``;
``<output>/latents`` unless ``latents=`` names another) is checked too: its manifest, each committed part whole, every
part of the dataset covered, each sample a key of the dataset part of the same name (in its order) with the latent
fields' dtypes and shapes. Exits 1 and names every problem found.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from preprocess import schema
from preprocess.shards import (
    DATASET_FILE,
    INDEX_FILE,
    LATENTS_DIR,
    LATENTS_FILE,
    SHARD_DIR,
    STATS_SUFFIX,
    TAR_ERRORS,
    TAR_SUFFIX,
    decode_stats,
    iter_members,
    iter_samples,
    stats_path,
    tar_path,
)
from preprocess.state import check_part, read_json, read_table
from preprocess.storage import Storage


def check_sample(key: str, members: dict[str, bytes], fields: list[schema.Field], deep: bool,
                 dims: dict[str, int] | None = None) -> list[str]:
    """Problems of one sample (members: field member name → bytes; ``dims``: the dataset's named sizes)."""
    problems = []
    if "meta.json" not in members:
        return [f"{key}: no meta.json"]
    try:
        meta = schema.decode(schema.field("meta"), members["meta.json"])
    except Exception as e:
        return [f"{key}: meta.json does not parse ({e})"]
    n = meta.get("n_frames")
    if meta.get("key") != key:
        problems.append(f"{key}: meta.key is {meta.get('key')!r}")
    dims = {**schema.DEFAULT_DIMS, **(dims or {}), **_audio_dims(members, meta)}
    audio, status = schema.field("audio"), meta.get("audio_status")
    if status is not None and (status == schema.AUDIO_OK) != (audio.member in members):
        problems.append(f"{key}: meta.audio_status is {status!r} but the sample "
                        f"{'has no' if status == schema.AUDIO_OK else 'has an'} audio member")
    for f in fields:
        data = members.get(f.member)
        if data is None:
            if not f.optional:
                problems.append(f"{key}: missing field {f.member}")
            continue
        try:
            value = schema.decode(f, data)
        except Exception as e:
            problems.append(f"{key}: {f.member} does not decode ({type(e).__name__}: {e})")
            continue
        if "S" in f.shape and "S" not in dims:
            continue  # no length to check it against: timestamps.npy or meta.fps is unusable (reported as such)
        why = schema.check_value(f, value, n, dims)
        if why:
            problems.append(f"{key}: {why}")
    known = {f.member for f in schema.FIELDS}
    for m in members:
        if m not in known:
            problems.append(f"{key}: unknown member {m}")
    if deep and audio.member in members and "S" in dims:
        from preprocess.audio import decode_flac
        from preprocess.video import ffmpeg_words
        try:
            got = len(decode_flac(members[audio.member]))
            if got != dims["S"]:
                problems.append(f"{key}: {audio.member} decodes to {got} samples, its span has {dims['S']}")
        except Exception as e:
            problems.append(f"{key}: {audio.member} does not decode ({ffmpeg_words(e)})")
    if deep and "video.mp4" in members and isinstance(n, int):
        from preprocess.video import decode_mp4
        try:
            got = len(decode_mp4(members["video.mp4"]))
            if got != n:
                problems.append(f"{key}: video.mp4 has {got} frames, meta.n_frames={n}")
        except Exception as e:
            problems.append(f"{key}: video.mp4 does not decode ({e})")
    return problems


def _audio_dims(members: dict[str, bytes], meta: dict) -> dict[str, int]:
    """``{"S": samples}`` the sample's ``audio`` must have (``schema.audio_length`` of its timestamps and fps), or
    {} when those cannot be read."""
    try:
        f = schema.field("timestamps")
        ts = schema.decode(f, members[f.member])
        return {"S": schema.audio_length(ts, float(meta["fps"]))}
    except Exception:  # noqa: BLE001 - a broken timestamps.npy or meta.fps is a problem of its own
        return {}


def check_tar(storage: Storage, name: str, fields, seen: dict[str, str], deep: bool,
              dims: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
    """(problems, keys in order) of one shard, read as a stream to its end."""
    problems, keys = [], []
    closed: set[str] = set()
    cur, members = None, {}

    def flush():
        if cur is not None:
            problems.extend(check_sample(cur, members, fields, deep, dims))

    try:
        with storage.fs.open_input_stream(storage.path(f"{SHARD_DIR}/{name}")) as raw:
            for m in iter_members(raw):
                if not m.is_file:
                    problems.append(f"{name}: {m.name} is not a regular file")
                    continue
                key, member, data = m.key, m.member, m.data
                if key is None or not schema.KEY_RE.match(key):
                    problems.append(f"{name}: bad member name {m.name!r} (want {{video_key}}_{{clip:04d}}.field.ext)")
                    continue
                if key != cur:
                    flush()
                    if key in closed:
                        problems.append(f"{name}: members of {key} are not contiguous")
                    if key in seen and key not in closed:
                        problems.append(f"{name}: key {key} also in {seen[key]}")
                    if cur is not None:
                        closed.add(cur)
                    cur, members = key, {}
                    seen.setdefault(key, name)
                    keys.append(key)
                if member in members:
                    problems.append(f"{name}: {key}.{member} appears twice")
                members[member] = data
            flush()
    except TAR_ERRORS as e:
        problems.append(f"{name}: unreadable or truncated tar ({type(e).__name__}: {e})")
    return problems, keys


def check_latent_sample(key: str, members: dict[str, bytes], manifest: dict) -> list[str]:
    """Problems of one sample of a latent cache."""
    want = {f.member for f in schema.LATENT_FIELDS}
    problems = [f"{key}: unknown member {m}" for m in sorted(set(members) - want)]
    problems += [f"{key}: missing field {m}" for m in sorted(want - set(members))]
    if problems:
        return problems
    try:
        meta = schema.decode(schema.LATENT_FIELDS_BY_NAME["latent_meta"], members["latent_meta.json"])
        fr = manifest["framing"]
        h, w = meta["bucket"]
        if [h, w] not in fr["buckets"]:
            return [f"{key}: bucket {meta['bucket']} is not one of the cache's {fr['buckets']}"]
        dims = {"C": manifest["latent_channels"], "t": 1 + (len(meta["frames"]) - 1) // fr["temporal_compression"],
                "K": len(meta["primary_frames"]), "R": len(meta["ref_roles"]), "h": h // fr["spatial_compression"],
                "w": w // fr["spatial_compression"]}
    except Exception as e:
        return [f"{key}: latent_meta.json is unreadable ({type(e).__name__}: {e})"]
    for f in schema.LATENT_FIELDS[1:]:
        try:
            why = schema.check_value(f, schema.decode(f, members[f.member]), len(meta["frames"]), dims)
        except Exception as e:
            why = f"{f.member} does not decode ({type(e).__name__}: {e})"
        if why:
            problems.append(f"{key}: {why}")
    return problems


def validate_latents(cache: Storage, tar_keys: dict[str, list[str]], deep: bool, log=print) -> list[str]:
    """All problems of the latent cache ``cache`` of a dataset whose tars hold ``tar_keys`` (tar name -> keys)."""
    where = cache.uri
    if not cache.exists(LATENTS_FILE):
        return [f"{where}: no {LATENTS_FILE}; not a latent cache written by preprocess/latents.py"]
    manifest = read_json(cache, LATENTS_FILE)
    if manifest.get("version") != schema.LATENTS_VERSION:
        return [f"{where}/{LATENTS_FILE}: version {manifest.get('version')}, this code reads {schema.LATENTS_VERSION}"]
    problems: list[str] = []
    sizes = cache.sizes(SHARD_DIR)
    committed = sorted(n[:-len(STATS_SUFFIX)] for n in sizes if n.endswith(STATS_SUFFIX))
    problems += [f"{where}: {SHARD_DIR}/{n} is debris of an interrupted run (rerun preprocess/latents.py)"
                 for n in sorted(sizes) if n.endswith(".tmp") or (n.endswith(TAR_SUFFIX)
                                                                   and n[:-len(TAR_SUFFIX)] not in committed)]
    uncovered = sorted(t for t, keys in tar_keys.items() if keys and t[:-len(TAR_SUFFIX)] not in committed)
    if uncovered:
        problems.append(f"{where}: no committed latents for {len(uncovered)} dataset parts (e.g. {uncovered[0]}): "
                        "rerun preprocess/latents.py to finish the cache")
    for i, part in enumerate(committed):
        st, info = decode_stats(cache.read_bytes(stats_path(part)))
        main = tar_keys.get(part + TAR_SUFFIX)
        if main is None:
            problems.append(f"{where}: part {part} is not a part of the dataset (rerun preprocess/latents.py to drop "
                            "it)")
            continue
        why = check_part(cache, part, info, sizes.get(part + TAR_SUFFIX), set(), deep) if info else None
        if why:
            problems.append(f"{where}: {why}; rerun preprocess/latents.py to redo it")
            continue
        ok = list(st.loc[st["status"] == "ok", "key"]) if len(st) else []
        position = {k: j for j, k in enumerate(main)}
        keys, last = [], -1
        if info.get("tar_bytes"):
            try:
                with cache.fs.open_input_stream(cache.path(tar_path(part))) as f:
                    for key, members in iter_samples(f):
                        keys.append(key)
                        if position.get(key, -1) <= last:
                            problems.append(f"{where}: {part}: {key} is not in the dataset part, or out of its order")
                        last = max(last, position.get(key, -1))
                        problems += [f"{where}: {part}: {p}" for p in check_latent_sample(key, members, manifest)]
            except TAR_ERRORS as e:
                problems.append(f"{where}: {part}.tar is unreadable or truncated ({type(e).__name__}: {e})")
        if sorted(keys) != sorted(ok):
            problems.append(f"{where}: {part}: the tar and its stats file disagree on {len(set(keys) ^ set(ok))} keys")
        log(f"[validate] latents {i + 1}/{len(committed)} {part}: {len(keys)} samples")
    return problems


def validate(output: str, deep: bool = False, log=print, latents: str | None = None) -> list[str]:
    """All problems of the dataset at ``output`` and of its latent cache (``latents``, else ``<output>/latents`` when
    there is one); empty when both are valid."""
    storage = Storage(output, create=False)
    if not storage.root_exists():
        raise FileNotFoundError(f"output={output}: no such directory (give the output= of a preprocess/run.py run)")
    if not storage.exists(DATASET_FILE):
        return [f"{output}: no {DATASET_FILE}; not a dataset written by preprocess/run.py"]
    ds = read_json(storage, DATASET_FILE)
    try:
        schema.check_version(ds, DATASET_FILE)
    except ValueError as e:
        return [str(e)]
    fields = schema.fields_of(ds.get("groups", ["clip"]))
    dims = schema.dataset_dims(ds)
    problems: list[str] = []
    sizes = storage.sizes(SHARD_DIR)
    names = sorted(sizes)
    tars = [n for n in names if n.endswith(TAR_SUFFIX)]
    committed = {n[:-len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
    for n in names:
        if n.endswith(".tmp"):
            problems.append(f"{SHARD_DIR}/{n}: temporary file left by an interrupted run")
    seen: dict[str, str] = {}
    tar_keys: dict[str, list[str]] = {}
    for i, t in enumerate(tars):
        if t[:-len(TAR_SUFFIX)] not in committed:
            problems.append(f"{SHARD_DIR}/{t}: no stats file, so it was never committed (rerun preprocess to clean up)")
        p, keys = check_tar(storage, t, fields, seen, deep, dims)
        problems.extend(p)
        tar_keys[t] = keys
        log(f"[validate] {i + 1}/{len(tars)} {t}: {len(keys)} samples, {len(p)} problems")
    # the index and the stats files against the tars
    want: dict[str, set[str]] = defaultdict(set)
    for part in sorted(committed):
        st, info = decode_stats(storage.read_bytes(stats_path(part)))
        why = check_part(storage, part, info, sizes.get(f"{part}{TAR_SUFFIX}"), set(), deep) if info else None
        if why:
            problems.append(f"{why}; rerun preprocess to redo its videos")
        ok = st[(st["kind"] == "clip") & (st["status"] == "ok")] if len(st) else st
        for k, sh in zip(ok.get("key", []), ok.get("shard", [])):
            want[sh].add(k)
        if len(ok) and f"{part}{TAR_SUFFIX}" not in tar_keys:
            problems.append(f"{SHARD_DIR}/{part}.parquet lists {len(ok)} clips but {part}.tar is missing")
    for t, keys in tar_keys.items():
        if t[:-4] in committed and set(keys) != want.get(t, set()):
            diff = set(keys) ^ want.get(t, set())
            problems.append(f"{t}: samples and stats file disagree on {len(diff)} keys, e.g. {sorted(diff)[:3]}")
    if not storage.exists(INDEX_FILE):
        problems.append(f"no {INDEX_FILE}")
    else:
        idx = read_table(storage, INDEX_FILE)
        if idx["key"].duplicated().any():
            problems.append(f"{INDEX_FILE}: duplicate keys {idx.loc[idx['key'].duplicated(), 'key'].tolist()[:3]}")
        in_index = set(zip(idx["key"], idx["shard"]))
        in_tars = {(k, t) for t, keys in tar_keys.items() for k in keys}
        if in_index != in_tars:
            only_i, only_t = in_index - in_tars, in_tars - in_index
            problems.append(f"{INDEX_FILE} and the tars disagree: {len(only_i)} clips only in the index "
                            f"(e.g. {sorted(only_i)[:2]}), {len(only_t)} only in tars (e.g. {sorted(only_t)[:2]})")
    cache = Storage(latents or f"{output.rstrip('/')}/{LATENTS_DIR}", create=False)
    if latents or cache.root_exists():
        problems += validate_latents(cache, tar_keys, deep, log)
    return problems


def main(argv: list[str]) -> int:
    output, deep, latents = None, False, None
    for a in argv:
        if a.startswith("output="):
            output = a.split("=", 1)[1]
        elif a.startswith("latents="):
            latents = a.split("=", 1)[1]
        elif a == "--deep":
            deep = True
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        else:
            print(f"error: unknown argument {a!r}\n{__doc__}", file=sys.stderr)
            return 2
    if not output:
        print(f"error: output= is required\n{__doc__}", file=sys.stderr)
        return 2
    try:
        problems = validate(output, deep=deep, latents=latents)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems[:200]:
        print(f"PROBLEM {p}")
    if len(problems) > 200:
        print(f"... and {len(problems) - 200} more")
    print(f"[validate] {output}: {'OK' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
