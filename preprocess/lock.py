"""One run at a time on an output: a lease (``_lock.json``) naming the run that holds it (host, pid, run id),
refreshed by a heartbeat thread while the run lives and deleted when it ends, on errors too.

A second run is refused (``OutputBusy``, exit 2) with a line naming the holder. A stale lease is taken over with
a warning: its heartbeat is older than ``lock.stale_s``, or its holder ran on this machine and its process is gone
(kill -9, OOM killer: taken over at once). The shard writers ask :func:`driver_gone` before every commit, so a
writer whose driver died, or whose run lost the output to another, commits nothing more.

Acquiring is atomic on local disks: every read-modify-write of the lease happens under ``flock`` of
``_lock.guard`` (NFS emulates it with POSIX locks). pyarrow's object stores have no conditional write, so there the
lease is written, read back after ``lock.settle_s`` and held only if it is still this run's: of two runs that write
it within the settle time, both read the same winner. Each heartbeat re-reads the lease before rewriting it; a run
that finds another's lease has lost the output and stops (``LockLost``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from models.redact import redact_url

from .config import ConfigError, LockConfig
from .shards import LOCK_FILE, LOCK_GUARD
from .storage import Storage

log = logging.getLogger("preprocess")


class OutputBusy(ConfigError):
    """Another live run holds the output (exit 2, like a configuration error: run elsewhere or later)."""


class LockLost(OutputBusy):
    """This run's lease was taken over or deleted while it ran: it stops before writing anything more."""


# ---------------------------------------------------------------- processes
def machine_id() -> str:
    """Where a pid means the same process: host name, boot and pid namespace (containers on one host differ)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        boot = pidns = ""
    return f"{socket.gethostname()}/{boot}/{pidns}"


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot ("" where /proc is not there): a pid reused by a
    later process has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int, start: str = "") -> bool:
    """Whether process ``pid`` (started at ``start``, when known) still runs on this machine; a zombie does not."""
    if not isinstance(pid, int) or pid <= 0:  # os.kill(0 or -1, 0) would ask about a whole group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] != "Z" and (not start or fields[19] == start)
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------- the lease
@dataclass(frozen=True)
class Holder:
    """The run holding an output, as its lease names it (the writers get a copy to check against)."""

    run_id: str
    token: str  # random: tells this run's lease from any other's
    host: str
    machine: str  # see machine_id(): a pid is only checked where it means the same process
    pid: int
    pid_start: str

    @staticmethod
    def this_process(run_id: str) -> Holder:
        pid = os.getpid()
        return Holder(run_id, secrets.token_hex(8), socket.gethostname(), machine_id(), pid, process_start(pid))


LEASE_BYTES = 1024  # every lease is padded to this size: see read_lease


def read_lease(storage: Storage, attempts: int = 3) -> dict | None:
    """The lease at ``output/_lock.json``: None when there is none, {} when it does not parse (``attempts`` reads
    0.1 s apart). pyarrow reads an object as HEAD (its size) then GET: a lease rewritten in between with another
    length would be cut, hence leases of one fixed size, and a second look at what does not parse."""
    for attempt in range(attempts):
        try:
            data = storage.read_bytes(LOCK_FILE)
        except FileNotFoundError:
            return None
        try:
            lease = json.loads(data)
            if isinstance(lease, dict) and "token" in lease:
                return lease
        except ValueError:
            pass
        if attempt + 1 < attempts:
            time.sleep(0.1)
    return {}


def heartbeat_age(lease: dict, now: float | None = None) -> float:
    """Seconds since the lease's last heartbeat (infinite when it records none)."""
    try:
        return (now or time.time()) - float(lease["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def describe(lease: dict | None, now: float | None = None) -> str:
    """``run R (host H, pid P, heartbeat N s ago)``."""
    if not lease:
        return "an unreadable lock"
    age = heartbeat_age(lease, now)
    return (f"run {lease.get('run_id', '?')} (host {lease.get('host', '?')}, pid {lease.get('pid', '?')}, "
            f"heartbeat {age:.0f} s ago)")


def why_stale(lease: dict, stale_s: float, now: float | None = None) -> str | None:
    """Why a lease no longer holds its output (None while it does)."""
    if not lease:
        return "the lock file does not parse"
    age = heartbeat_age(lease, now)
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (lock.stale_s={stale_s:g})"
    if lease.get("machine") == machine_id() and not pid_alive(lease.get("pid"), lease.get("pid_start", "")):
        return f"its process {lease.get('pid')} on this host is gone"
    return None


def driver_gone(storage: Storage, holder: Holder, stale_s: float) -> str | None:
    """Why the run ``holder`` started no longer owns the output (None while it does): what a shard writer asks
    before a commit. Stricter than a second run's test: the heartbeat may be half as old, so writers stop before
    another run could take the output over."""
    if holder.machine == machine_id() and not pid_alive(holder.pid, holder.pid_start):
        return f"its driver (pid {holder.pid}) is gone"
    try:
        lease = read_lease(storage)
    except OSError as e:  # a store hiccup says nothing about the driver: the next check asks again
        log.warning("output=%s: could not read the lock (%s: %s)", storage.uri, type(e).__name__, e)
        return None
    if lease is None:
        return "the output's lock was released"
    if lease.get("token") != holder.token:
        return f"the output was taken over by {describe(lease)}"
    age = heartbeat_age(lease)
    if age > stale_s / 2:
        return f"the driver's heartbeat is {age:.0f} s old (half of lock.stale_s={stale_s:g})"
    return None


@dataclass(frozen=True)
class DriverCheck:
    """What a shard writer gets to ask whether its run still owns the output."""

    holder: Holder
    stale_s: float

    def gone(self, storage: Storage) -> str | None:
        return driver_gone(storage, self.holder, self.stale_s)


class OutputLock:
    """The lease of one run on its output; ``with OutputLock(...) as lock:`` holds it for the block."""

    def __init__(self, storage: Storage, run_id: str, cfg: LockConfig):
        self.storage, self.cfg = storage, cfg
        self.holder = Holder.this_process(run_id)
        self.lost: str | None = None  # why the lease was lost, once it has been
        self.took_over: str | None = None  # the stale holder this run replaced
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @contextlib.contextmanager
    def _guard(self):
        """Serialises lease updates of every run on a local output (a no-op on object stores)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: the lease alone
            fcntl = None
        if not self.storage.local or fcntl is None:
            yield
            return
        with open(self.storage.path(LOCK_GUARD), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError as e:  # a file system without locks (some FUSE mounts): the lease alone
                log.warning("output=%s: no file locks here (%s); two runs starting in the same instant could both "
                            "start", self.storage.uri, e)
                yield
                return
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self) -> None:
        lease = {**asdict(self.holder), "output": redact_url(self.storage.uri), "started": self._started,
                 "heartbeat": time.time()}
        data = json.dumps(lease, indent=1).encode()
        self.storage.write_bytes(LOCK_FILE, data + b" " * (LEASE_BYTES - len(data)))

    def _busy(self, lease: dict | None, why: str = "") -> OutputBusy:
        return OutputBusy(f"output={self.storage.uri} is in use by {describe(lease)}{why}: "
                          "wait for that run to finish, or, if it is dead, rerun once its heartbeat is older than "
                          f"lock.stale_s={self.cfg.stale_s:g} s (at once on its own host) "
                          f"or delete {self.storage.url(LOCK_FILE)}")

    def acquire(self) -> None:
        """Take the lease, or raise ``OutputBusy`` naming the live run that holds it."""
        with self._guard():
            lease = read_lease(self.storage)
            if lease is not None:
                why = why_stale(lease, self.cfg.stale_s)
                if why is None:
                    raise self._busy(lease)
                self.took_over = f"{describe(lease)}: {why}"
                log.warning("output=%s: taking over the lock of %s", self.storage.uri, self.took_over)
            self._write()
        if not self.storage.local:  # no conditional write: the last of two racing writers wins, both see it
            time.sleep(self.cfg.settle_s)
            lease = read_lease(self.storage)
            if not lease or lease.get("token") != self.holder.token:
                raise self._busy(lease, ", which took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat_s):
            try:
                with self._guard():
                    lease = read_lease(self.storage)
                    if lease is None or (lease and lease.get("token") != self.holder.token):
                        self.lost = ("its lock file was deleted" if lease is None
                                     else f"it was taken over by {describe(lease)}")
                        log.error("output=%s: this run lost its lock (%s); it stops", self.storage.uri, self.lost)
                        return
                    self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next beat retries (stale only after stale_s)
                log.warning("output=%s: lock heartbeat failed (%s: %s); retrying", self.storage.uri,
                            type(e).__name__, e)

    def driver_check(self) -> DriverCheck:
        return DriverCheck(self.holder, self.cfg.stale_s)

    def check(self) -> None:
        """Raise ``LockLost`` once another run has taken the output over."""
        if self.lost:
            raise LockLost(f"output={self.storage.uri}: this run lost its lock ({self.lost}) and stopped; "
                           "its committed parts stay valid, rerun to finish")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            with self._guard():
                lease = read_lease(self.storage)
                if lease and lease.get("token") == self.holder.token:
                    self.storage.delete(LOCK_FILE)
        except Exception as e:  # noqa: BLE001 - the lease then goes stale; the next run takes it over
            log.warning("output=%s: could not release the lock (%s: %s)", self.storage.uri, type(e).__name__, e)
