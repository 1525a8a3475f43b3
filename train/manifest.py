"""What a checkpoint holds and who wrote it: the file manifest in ``COMPLETE``, its signature, its verification
(train/checkpoint.py moves a checkpoint that fails it to quarantine).

At save every rank records the size and sha256 of the files it wrote (rank ``r`` owns the names that carry its
rank: DeepSpeed's ``zero_pp_rank_r_*`` shards, our ``trainer/rank_0000r.pt``; rank 0 everything else), rank 0
gathers them into ``COMPLETE`` (``files``) and signs the record with HMAC-SHA256 under the run's checkpoint key.
Before a resume (or an export) loads anything, the checkpoint is checked against it: every listed file present
with its recorded size (always) and checksum (``train.checkpoint.verify=sha256``), no file that the save did not
write, and the signature.

Why a signature and not only checksums: DeepSpeed's ``*optim_states.pt`` (and what its universal conversion and
``zero_to_fp32`` read) are pickles, and unpickling runs whatever code the file holds. Checksums prove that the
files are the ones ``COMPLETE`` lists; the signature proves that ``COMPLETE`` was written by a run holding the
key, which a directory others can write, or a checkpoint downloaded from somewhere, does not. Our own states
(RNG, EMA, guard counters, data cursor) are tensors and plain data loaded with ``torch.load(weights_only=True)``
(train/checkpoint.py) and need no trust.

The key: the file ``train.checkpoint.key_file`` when set, else ``$DREAMACTOR_CHECKPOINT_KEY`` (e.g. a Kubernetes
secret), else ``~/.config/dreamactor/checkpoint.key`` (made by the first run, mode 600). Only rank 0 signs and
checks signatures, so only rank 0's node needs it; a restart whose rank 0 lands on another node needs the same
key there (shared home, or the environment variable).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 2  # COMPLETE records that list their files (format 1: written before, no manifest)
COMPLETE = "COMPLETE"
KEY_ENV = "DREAMACTOR_CHECKPOINT_KEY"
DEFAULT_KEY_FILE = "~/.config/dreamactor/checkpoint.key"
LEVELS = ("size", "sha256")
# Made after COMPLETE from a verified checkpoint (the universal conversion, with its own manifest), or in flight.
NOT_IN_MANIFEST = re.compile(r"^(universal|universal\.tmp)(/|$)|^latest_universal$|\.tmp$")
_OWNER = re.compile(r"(?:^|/)(?:[a-z0-9]+_)?zero_pp_rank_(\d+)_|(?:^|/)rank_(\d+)\.pt$")
_CHUNK = 4 << 20


class KeyFileError(RuntimeError):
    """The checkpoint key cannot be used (unreadable, too short, or open to other users)."""


@dataclass(frozen=True, order=True)
class Problem:
    """Why a checkpoint cannot be resumed: ``damaged`` (a file missing, truncated or changed: the checkpoint is
    quarantined and resume falls back) or not trusted (``damaged=False``: nothing is loaded, the run stops)."""

    damaged: bool
    path: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def owner(rel: str, world: int | None = None) -> int:
    """The rank that writes file ``rel`` of a checkpoint (the rank in its name; rank 0 for the rest), modulo
    ``world`` when given (a resume on fewer ranks spreads the old ranks' files over its own)."""
    m = _OWNER.search(rel)
    rank = int(m.group(1) or m.group(2)) if m else 0
    return rank % world if world else rank


def listed(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint directory, relative (posix), the ones never in a manifest left out."""
    tag_dir = Path(tag_dir)
    out = []
    for p in tag_dir.rglob("*"):
        rel = p.relative_to(tag_dir).as_posix()
        if p.is_file() and rel != COMPLETE and not NOT_IN_MANIFEST.search(rel):
            out.append(rel)
    return sorted(out)


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file, read in 4 MiB chunks (hashlib releases the GIL: files hash in parallel)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _parallel(fn, items: list, threads: int = 8) -> list:
    """``[fn(x) for x in items]`` on up to ``threads`` threads (file reads and sha256 release the GIL)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def describe(tag_dir: Path, rels: list[str]) -> dict[str, dict]:
    """``{rel: {"bytes", "sha256"}}`` of files of ``tag_dir`` (what a save records)."""
    tag_dir = Path(tag_dir)
    sums = _parallel(lambda r: sha256_file(tag_dir / r), rels)
    return {r: {"bytes": (tag_dir / r).stat().st_size, "sha256": s} for r, s in zip(rels, sums)}


def owned(tag_dir: Path, rank: int, world: int) -> list[str]:
    """The files of ``tag_dir`` that ``rank`` of ``world`` records at a save (by :func:`owner`: the ones it wrote;
    a name that carries no rank of this world goes to rank ``owner % world``, so that every file is recorded)."""
    return [r for r in listed(tag_dir) if owner(r, world) == rank]


# ---------------------------------------------------------------------- signature


def load_key(key_file: str | None = None, create: bool = False) -> tuple[bytes | None, str]:
    """(the checkpoint key, where it came from): the file ``key_file`` when given, else
    ``$DREAMACTOR_CHECKPOINT_KEY``, else the file :data:`DEFAULT_KEY_FILE`; a missing file is made (32 random
    bytes, mode 600) when ``create``, else the key is None. A key file that other users can read or write is
    refused: they could sign checkpoints."""
    env = os.environ.get(KEY_ENV)
    if env and not key_file:
        return env.encode(), f"${KEY_ENV}"
    path = Path(key_file or DEFAULT_KEY_FILE).expanduser()
    if not path.exists():
        if not create:
            return None, str(path)
        _create_key(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"the checkpoint key {path} is open to other users (mode {mode:o}): anyone who can read it "
                           f"can sign a checkpoint this run will unpickle; run `chmod 600 {path}`")
    key = path.read_bytes().strip()
    if len(key) < 16:
        raise KeyFileError(f"the checkpoint key {path} holds {len(key)} bytes: use at least 16 random bytes "
                           f"(`openssl rand -hex 32 > {path}`; checkpoints signed with the old key then need "
                           "train.checkpoint.trust_unsigned=true)")
    return key, str(path)


def _create_key(path: Path) -> None:
    """A new random key at ``path``, atomically (a concurrent creator's key wins; nobody sees a partial one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    try:
        os.link(tmp, path)  # fails if another process made one first: keep theirs
        log.info("made a new checkpoint key %s (it signs this run's checkpoints; keep it)", path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def signature(record: dict, key: bytes) -> str:
    """HMAC-SHA256 of a COMPLETE record (its canonical JSON without the signature itself)."""
    body = json.dumps({k: v for k, v in record.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return "hmac-sha256:" + hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def sign(record: dict, key: bytes | None) -> dict:
    """``record`` with its ``signature`` (unsigned without a key)."""
    return dict(record, signature=signature(record, key)) if key else dict(record)


def sealed(directory: Path, record: dict, key: bytes | None) -> dict:
    """``record`` with every file of ``directory`` described in it (``files``) and signed: the COMPLETE of a
    directory one process wrote alone (the universal conversion)."""
    return sign(dict(record, format=FORMAT, files=describe(directory, listed(directory))), key)


# ---------------------------------------------------------------------- verification


def trust_problems(tag_dir: Path, record: dict, key: bytes | None, key_from: str,
                   trust_unsigned: bool) -> list[Problem]:
    """Whether ``record`` (the COMPLETE of ``tag_dir``) was written by a run holding ``key``."""
    where = str(Path(tag_dir) / COMPLETE)
    if "files" not in record:
        if trust_unsigned:
            log.warning("%s lists no files (written before checkpoints carried checksums): its files are not "
                        "verified (train.checkpoint.trust_unsigned=true)", where)
            return []
        return [Problem(False, where, "lists no files and carries no signature: the checkpoint was written before "
                                      "checkpoints were signed, or not by this code")]
    if trust_unsigned:
        return []
    sig = record.get("signature")
    if not sig:
        return [Problem(False, where, "carries no signature (saved without a checkpoint key)")]
    if key is None:
        return [Problem(False, where, f"is signed, but this run has no checkpoint key to check it with ({key_from} "
                                      f"does not exist)")]
    if not hmac.compare_digest(str(sig), signature(record, key)):
        return [Problem(False, where, f"its signature does not match the checkpoint key {key_from}: it was written "
                                      f"by a run with another key, or changed since")]
    return []


def file_problems(tag_dir: Path, files: dict[str, dict], level: str) -> list[Problem]:
    """The listed ``files`` of ``tag_dir`` that are missing, of another size or (``level=sha256``) changed."""
    tag_dir = Path(tag_dir)

    def check(item) -> Problem | None:
        rel, want = item
        p = tag_dir / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return Problem(True, str(p), f"is missing (COMPLETE lists it, {want['bytes']} bytes)")
        if size != want["bytes"]:
            return Problem(True, str(p), f"is {size} bytes, COMPLETE recorded {want['bytes']} (truncated or replaced)")
        if level == "sha256" and sha256_file(p) != want["sha256"]:
            return Problem(True, str(p), f"its sha256 differs from the one COMPLETE recorded ({want['sha256'][:12]}…): "
                                         "the file changed since the save")
        return None

    return [p for p in _parallel(check, sorted(files.items())) if p is not None]


def extra_problems(tag_dir: Path, files: dict[str, dict]) -> list[Problem]:
    """Files in ``tag_dir`` that its save did not write (a planted or leftover file would be loaded)."""
    return [Problem(True, str(Path(tag_dir) / r), "is not one of the files the save recorded in COMPLETE")
            for r in listed(tag_dir) if r not in files]


def verify(tag_dir: Path, record: dict, key: bytes | None, key_from: str, level: str = "sha256",
           trust_unsigned: bool = False) -> list[Problem]:
    """Every problem of checkpoint ``tag_dir`` whose COMPLETE is ``record`` (one process checks all files)."""
    problems = trust_problems(tag_dir, record, key, key_from, trust_unsigned)
    files = record.get("files")
    if files is not None:
        problems += extra_problems(tag_dir, files) + file_problems(tag_dir, files, level)
    return sorted(problems)


def total_bytes(record: dict) -> int:
    """The bytes of the files a COMPLETE record lists."""
    return sum(int(f["bytes"]) for f in (record.get("files") or {}).values())
