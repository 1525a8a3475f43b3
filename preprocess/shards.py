"""The layout of a preprocess output and the one reader of its shards (the field definitions are in
``schema.py``). Writer, state, validator, preview and the training loader all take these names and readers
from here, so no layout name is spelled twice and every tool reads a tar the same way.

Layout of an output::

    dataset.json            schema version and field groups (written first; a rerun with another format is refused)
    shards/{part}.tar       WebDataset tar: members ``{key}.{field}.{ext}``, the members of a clip contiguous
    shards/{part}.parquet   the part's stats rows (one per clip and one per video, failures included), written
                            after the tar: its existence is the part's commit; its parquet metadata holds the tar's
                            size and sha256 (``PART_INFO_KEY``; parts written before have none)
    index.parquet           one row per committed clip (rebuilt from the stats files)
    failures.parquet        one row per failed video or clip
    summary.json            counts, hours, throughput of the last run
    _lock.json              the lease of the run writing the output now (``lock.py``), deleted when it ends
    _lock.guard             empty: local runs flock it to update the lease atomically
    _retired/{part}.*       the stats file of a part retired as damaged (its videos were redone), and why
    latents/                the default latent cache (``preprocess/latents.py``), laid out like an output: its
                            manifest ``latents.json`` (written first), ``shards/{part}.tar`` with the same keys as
                            the dataset's part of that name and ``shards/{part}.parquet`` (its commit), ``_lock.json``
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    import pandas as pd

DATASET_FILE = "dataset.json"
INDEX_FILE = "index.parquet"
FAILURES_FILE = "failures.parquet"
SUMMARY_FILE = "summary.json"
SHARD_DIR = "shards"
LOCK_FILE, LOCK_GUARD = "_lock.json", "_lock.guard"
RETIRED_DIR = "_retired"
LATENTS_DIR = "latents"  # a dataset's default latent cache
LATENTS_FILE = "latents.json"  # a latent cache's manifest
TAR_SUFFIX, STATS_SUFFIX = ".tar", ".parquet"

# what a broken or truncated tar stream raises while it is read
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


PART_INFO_KEY = b"dreamactor.part"  # key of a stats file's parquet metadata: {"tar_bytes", "tar_sha256"}


def part_name(run_id: str, writer_id: int, seq: int) -> str:
    """The name of a writer's ``seq``-th part in run ``run_id`` (run ids start with the UTC time: names sort by
    run, then writer, then sequence)."""
    return f"{run_id}-w{writer_id:02d}-{seq:05d}"


def run_of(part: str) -> str:
    """The run id of a part name (:func:`part_name`)."""
    return part.rsplit("-w", 1)[0]


def part_of(shard_url: str) -> str:
    """The part name of a shard's URL or path (``.../shards/{part}.tar``)."""
    name = shard_url.rsplit("/", 1)[-1]
    return name[:-len(TAR_SUFFIX)] if name.endswith(TAR_SUFFIX) else name


def tar_path(part: str) -> str:
    """A part's tar, relative to the output."""
    return f"{SHARD_DIR}/{part}{TAR_SUFFIX}"


def stats_path(part: str) -> str:
    """A part's stats file (its commit), relative to the output."""
    return f"{SHARD_DIR}/{part}{STATS_SUFFIX}"


def digest(fileobj: BinaryIO) -> str:
    """sha256 (hex) of a stream read to its end, 1 MiB at a time: a part's checksum."""
    h = hashlib.sha256()
    while chunk := fileobj.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def encode_stats(stats: pd.DataFrame, info: dict) -> bytes:
    """A part's stats file: its rows, and ``info`` (the tar's size and checksum) in the parquet metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(stats, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), PART_INFO_KEY: json.dumps(info)})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def decode_stats(data: bytes) -> tuple[pd.DataFrame, dict]:
    """(rows, part info) of a stats file; the info is {} for a part written before parts recorded it."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    info = (table.schema.metadata or {}).get(PART_INFO_KEY)
    return table.to_pandas(), (json.loads(info) if info else {})


@dataclass
class Member:
    """One tar member in stream order: ``{key}.{member}`` (member = ``field.ext``); ``data`` is None for a member
    that was not selected (streamed past, not stored) and for anything but a regular file."""

    name: str
    key: str | None  # None: no dot in the name
    member: str
    is_file: bool
    data: bytes | None


def _entries(fileobj: BinaryIO):
    """``(TarInfo, key, member, stream)`` of a tar read as a stream, once, front to back (object stores need no
    seeks); a member's bytes are read from ``stream`` by the caller before the next entry."""
    with tarfile.open(fileobj=fileobj, mode="r|*") as stream:
        for info in stream:
            key, dot, member = info.name.partition(".")
            yield info, (key if dot else None), member, stream
            stream.members = []  # stream mode: do not keep every header of the shard


def iter_members(fileobj: BinaryIO, select: Callable[[str, str], bool] | None = None) -> Iterator[Member]:
    """Every member of a tar in stream order (the validator's view: names, types and bytes as stored).

    ``select(key, member) -> bool`` keeps the bytes of some members only. Raises one of ``TAR_ERRORS`` where
    the stream breaks off; the members before the break have been yielded."""
    for info, key, member, stream in _entries(fileobj):
        data = None
        if info.isreg() and key is not None and (select is None or select(key, member)):
            data = stream.extractfile(info).read()
        yield Member(info.name, key, member, info.isreg(), data)


def iter_samples(fileobj: BinaryIO, select: Callable[[str, str], bool] | None = None) -> Iterator[tuple[str, dict]]:
    """``(key, {member: bytes})`` of a tar in stream order: contiguous members of one key are one sample
    (webdataset's ``group_by_keys``). A sample is yielded as soon as the header of the next one is read, so
    every sample before a break in the stream is delivered before the error is raised."""
    key, members = None, {}
    for info, k, member, stream in _entries(fileobj):
        if not info.isreg() or k is None:
            continue
        if k != key:
            if key is not None:
                yield key, members
            key, members = k, {}
        if select is None or select(k, member):
            members[member] = stream.extractfile(info).read()
    if key is not None:
        yield key, members
