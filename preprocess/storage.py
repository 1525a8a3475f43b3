"""Local paths and object-store URIs through one interface (pyarrow.fs; fsspec for the rest)."""
from __future__ import annotations

import csv
import fnmatch
import io
import os
import posixpath
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from .config import ConfigError


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI (s3://, gs://, hdfs://, or any fsspec)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("s3://") and "?" not in uri:
        return _s3(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError):  # pyarrow.lib.ArrowInvalid is a ValueError: a scheme pyarrow lacks
        import fsspec
        from pyarrow.fs import FSSpecHandler, PyFileSystem
        fs, path = fsspec.core.url_to_fs(uri)
        return PyFileSystem(FSSpecHandler(fs)), path


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    """S3 with delayed open: objects smaller than one part go up in a single PutObject (fewer requests,
    and S3-compatible stores that mishandle multipart work for index/stats files). The endpoint comes
    from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set (MinIO, Ceph, a test server)."""
    fs, path = pafs.FileSystem.from_uri(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(region=fs.region, endpoint_override=endpoint, allow_delayed_open=True), path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


class Storage:
    """A directory (local or object store) with atomic writes: readers never see a partial file."""

    def __init__(self, uri: str, create: bool = True):
        """``create=False`` for readers: a missing directory stays missing (see :meth:`root_exists`)."""
        self.uri = uri
        self.fs, self.root = filesystem(uri)
        self.local = is_local(self.fs)
        if create:
            self.fs.create_dir(self.root, recursive=True)

    def root_exists(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if not self.local else os.path.join(self.root, rel)

    def url(self, rel: str) -> str:
        """Where a member lives, as a user would type it."""
        if self.local:
            return self.path(rel)
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{self.path(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def list(self, rel: str, suffix: str = "") -> list[str]:
        """Names (relative to ``rel``) of the files directly in ``rel`` ending with ``suffix``."""
        return sorted(n for n in self.sizes(rel) if n.endswith(suffix))

    def sizes(self, rel: str) -> dict[str, int]:
        """{name: bytes} of the files directly in ``rel`` (one listing; no request per file)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return {posixpath.basename(i.path): int(i.size) for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: a temporary name then a rename (object stores publish on close)."""
        if self.local:
            dst = self.path(rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        else:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)

    def put_file(self, local_path: str, rel: str) -> None:
        """Publish a finished local file at ``rel`` atomically (rename locally, one upload remotely)."""
        if self.local:
            dst = self.path(rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(local_path, dst)
        else:
            pafs.copy_files(local_path, self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            os.unlink(local_path)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def staging_dir(self) -> str:
        """Where shards are built before they are published: beside them when local (rename is atomic; a rerun
        deletes what a killed writer left there), else a directory of this process in the temp directory, named by
        its pid (:func:`remove_dead_staging` deletes those of dead processes)."""
        if self.local:
            d = self.path("_staging")
            os.makedirs(d, exist_ok=True)
            return d
        return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-")


STAGING_PREFIX = "dreamactor-staging-"


def remove_dead_staging(alive, root: str | None = None) -> list[str]:
    """Delete the staging directories in the temp directory (``root``) whose process is gone (``alive(pid)`` False):
    the half-built tar and spill files of a writer killed while writing to an object store. Returns them."""
    gone = []
    root = root or tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
        if name.startswith(STAGING_PREFIX) and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            gone.append(name)
    return gone


VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp")
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")


def check_output(uri: str, min_free_bytes: int = 256 << 20) -> None:
    """Refuse an output that cannot work, before anything runs: a local path that is a file, a directory
    that cannot be created or written, or a disk with less than ``min_free_bytes`` free (ConfigError, one
    line naming the path and the fix). Object stores are checked by their first write."""
    import errno

    fs, path = filesystem(uri)
    if not is_local(fs):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output={uri} is a file, not a directory: give a directory (it is created) or an "
                          "object-store prefix")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left"}.get(e.errno, e.strerror or str(e))
        raise ConfigError(f"output={uri} cannot be written ({why}): choose a writable directory") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise ConfigError(f"output={uri}: only {free >> 20} MiB free on its disk (at least {min_free_bytes >> 20} "
                          "MiB needed to start): free space or choose another disk")


@dataclass
class InputFile:
    uri: str  # as given (local path or URI)
    size: int  # -1 when the file does not exist
    mtime: float
    problem: tuple[str, str] | None = None  # (reason, message) when the entry cannot be listed: a recorded failure


def _info(fs, path: str, uri: str) -> InputFile:
    i = fs.get_file_info(path)
    if i.type != pafs.FileType.File:
        return InputFile(uri, -1, 0.0)
    return InputFile(uri, int(i.size or 0), i.mtime.timestamp() if i.mtime else 0.0)


def _join_uri(base_uri: str, fs_path: str) -> str:
    if "://" in base_uri:
        return f"{base_uri.split('://', 1)[0]}://{fs_path}"
    return fs_path


def read_manifest(uri: str) -> list[str]:
    """Paths listed in a .txt (one per line, # comments), .csv (``path`` column or the first) or
    .parquet (``path`` column) manifest; relative paths are relative to the manifest."""
    fs, path = filesystem(uri)
    base = posixpath.dirname(path) if "://" in uri else os.path.dirname(path)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq
        table = pq.read_table(path, filesystem=fs)
        col = "path" if "path" in table.column_names else table.column_names[0]
        entries = [str(p) for p in table.column(col).to_pylist() if p]
    else:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8-sig")
        if uri.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(text)))
            col = rows[0].index("path") if rows and "path" in rows[0] else 0
            start = 1 if rows and ("path" in rows[0] or not os.path.splitext(rows[0][col])[1]) else 0
            entries = [r[col].strip() for r in rows[start:] if r and r[col].strip()]
        else:
            entries = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = []
    for e in entries:
        if "://" in e or os.path.isabs(e):
            out.append(e)
        else:
            out.append(_join_uri(uri, posixpath.join(base, e)) if "://" in uri else os.path.join(base, e))
    return out


def list_inputs(spec: str, timeout_s: float = 30.0) -> list[InputFile]:
    """Expand ``input=`` (a directory, a glob, a manifest, a single file; local or URI) to files.

    Directories are walked recursively, local ones following symbolic links into each real directory
    once (a link back into the tree is a cycle: logged and skipped, see :func:`walk_local`); every
    non-hidden file is an input (files that are not videos become recorded failures, never silent drops).
    A missing manifest entry is kept with size -1 and fails as ``missing_file``; an entry whose scheme is not
    supported or whose store does not answer within ``timeout_s`` is kept with a ``problem`` (a recorded
    failure of that line; the run goes on).
    """
    fs, path = filesystem(spec)
    if any(ch in path for ch in "*?["):
        root = path
        while any(ch in root for ch in "*?["):
            root = posixpath.dirname(root) if "://" in spec else os.path.dirname(root)
        sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
        files = [i for i in fs.get_file_info(sel) if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        if not files:
            raise ConfigError(f"input={spec!r}: the glob matches no file")
        return [InputFile(_join_uri(spec, i.path), int(i.size), i.mtime.timestamp() if i.mtime else 0.0)
                for i in sorted(files, key=lambda i: i.path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input={spec!r} does not exist (give a directory, a glob, a manifest "
                          f"{'/'.join(MANIFEST_EXTENSIONS)} or a video file)")
    if info.type == pafs.FileType.Directory:
        if is_local(fs):
            return walk_local(path).files
        sel = pafs.FileSelector(path, recursive=True)
        files = [i for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
                 and not any(part.startswith(".") for part in i.path[len(path):].split("/"))]
        return [InputFile(_join_uri(spec, i.path), int(i.size), i.mtime.timestamp() if i.mtime else 0.0)
                for i in sorted(files, key=lambda i: i.path)]
    if spec.lower().endswith(MANIFEST_EXTENSIONS):
        out = stat_entries(read_manifest(spec), timeout_s)
        if not out:
            raise ConfigError(f"input={spec!r}: the manifest lists no file")
        return out
    return [_info(fs, path, spec)]


@dataclass
class Walk:
    files: list[InputFile]
    cycles: list[tuple[str, str]] = field(default_factory=list)  # (link, the real directory it leads back to)


def walk_local(root: str) -> Walk:
    """Every non-hidden file under a local directory, sorted by path. Symbolic links to directories are
    followed, but each real directory is entered once: a link to a directory already entered (a cycle, or a
    second way into the same tree) is logged and skipped, so a link loop neither multiplies the inputs nor
    makes the listing endless."""
    import logging

    seen: set[tuple[int, int]] = set()
    files: list[InputFile] = []
    cycles: list[tuple[str, str]] = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue  # a dangling link to a directory: nothing to list
        if (st.st_dev, st.st_ino) in seen:
            cycles.append((d, os.path.realpath(d)))
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=True):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=True):
                    fst = e.stat(follow_symlinks=True)
                    files.append(InputFile(e.path, int(fst.st_size), fst.st_mtime))
                elif e.is_symlink():  # a dangling link: listed, fails as missing_file
                    files.append(InputFile(e.path, -1, 0.0))
            except OSError:
                files.append(InputFile(e.path, -1, 0.0))
    for link, real in cycles:
        logging.getLogger("preprocess").warning("input: %s leads back to %s, already listed: skipped (a symbolic "
                                                "link cycle or a second link to the same directory)", link, real)
    return Walk(sorted(files, key=lambda f: f.uri), cycles)


def _stat_entry(uri: str) -> InputFile:
    """One manifest entry: its size and mtime, or a problem saying why it cannot be read."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    try:
        fs, path = filesystem(uri)
    except ImportError as e:
        msg = f"{uri}: reading {scheme}:// needs a package that is not installed ({e})"
        return InputFile(uri, -1, 0.0, ("unsupported_uri", msg))
    except ValueError as e:
        msg = f"{uri}: {scheme}:// is not a storage scheme this machine can read ({e})"
        return InputFile(uri, -1, 0.0, ("unsupported_uri", msg))
    except Exception as e:  # noqa: BLE001 - DNS, credentials, ...: this line fails, the run goes on
        return InputFile(uri, -1, 0.0, ("unreachable", f"{uri}: {type(e).__name__}: {e}"))
    try:
        return _info(fs, path, uri)
    except Exception as e:  # noqa: BLE001
        return InputFile(uri, -1, 0.0, ("unreachable", f"{uri}: {type(e).__name__}: {e}"))


def stat_entries(uris: list[str], timeout_s: float, workers: int = 16) -> list[InputFile]:
    """:func:`_stat_entry` of every URI, in order, ``workers`` at a time; an entry without an answer
    within ``timeout_s`` is ``unreachable`` (its thread is abandoned: a store that never answers costs
    its lines, not the run)."""
    if all("://" not in u for u in uris):  # local files: no network to wait for
        return [_stat_entry(u) for u in uris]
    results: list[InputFile | None] = [None] * len(uris)
    started: list[float | None] = [None] * len(uris)
    todo: queue.Queue = queue.Queue()
    for i in range(len(uris)):
        todo.put(i)
    lock = threading.Lock()

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            started[i] = time.monotonic()
            got = _stat_entry(uris[i])
            with lock:
                if results[i] is None:
                    results[i] = got

    def spawn() -> threading.Thread:
        t = threading.Thread(target=work, daemon=True, name="list-inputs")
        t.start()
        return t

    threads = [spawn() for _ in range(min(workers, len(uris)))]
    while any(r is None for r in results):
        time.sleep(0.05)
        now = time.monotonic()
        with lock:
            late = [i for i, r in enumerate(results) if r is None and started[i] is not None
                    and now - started[i] > timeout_s]
            for i in late:
                msg = f"{uris[i]}: no answer within {timeout_s:g} s (probe.list_timeout_s)"
                results[i] = InputFile(uris[i], -1, 0.0, ("unreachable", msg))
        threads = [t for t in threads if t.is_alive()] + [spawn() for _ in late]  # replace the stuck ones
        if not threads and any(r is None for r in results):
            threads = [spawn()]
    return results  # type: ignore[return-value]


def open_input(uri: str):
    """A seekable binary file object for a local path or URI (for PyAV / decord)."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return open(path, "rb")
    return io.BufferedReader(fs.open_input_file(path), buffer_size=8 << 20)


def read_ends(uri: str, nbytes: int) -> tuple[int, bytes, bytes]:
    """(size, first nbytes, last nbytes) of a file, for the content key."""
    with open_input(uri) as f:
        head = f.read(nbytes)
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - nbytes))
        tail = f.read(nbytes)
    return size, head, tail
