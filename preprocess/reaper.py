"""A local Ray dies with its driver: ``python preprocess/reaper.py DRIVER_PID``.

The driver starts this right after it starts a local Ray (``pipeline.init_ray``). The reaper notes the driver's
descendants (pid and start time) twice a second; once the driver is gone (kill -9, the OOM killer), it sends each of
them that still runs, and their children, SIGTERM, and SIGKILL 3 s later. Ray's own fate sharing stops the GCS and
the raylet with the driver, but not what the raylet starts: the dashboard and runtime-env agents outlived a killed
driver for good, and workers finished their current calls first. After a normal exit (Ray shut down) it finds
nothing and exits. Linux (/proc) only; elsewhere it exits at once. Standard library only: it runs as a script.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0], fields[19]
    except (OSError, IndexError, ValueError):
        return None


def descendants(roots: set[int]) -> dict[int, str]:
    """{pid: start time} of every process below ``roots`` (zombies left out)."""
    children: dict[int, list[tuple[int, str, str]]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                children.setdefault(st[0], []).append((int(name), st[1], st[2]))
    out, stack = {}, list(roots)
    while stack:
        for pid, state, start in children.get(stack.pop(), []):
            if pid not in out and state != "Z":
                out[pid] = start
                stack.append(pid)
    return out


def alive(procs: dict[int, str]) -> dict[int, str]:
    """Those of ``procs`` still running as the same process (a reused pid has another start time)."""
    out = {}
    for pid, start in procs.items():
        st = _stat(pid)
        if st and st[1] != "Z" and st[2] == start:
            out[pid] = start
    return out


def reap(driver: int) -> int:
    """Wait for ``driver`` to go, then end what it left behind; returns how many processes were signalled."""
    me = os.getpid()
    known: dict[int, str] = {}
    st = _stat(driver)
    its = alive({driver: st[2]}) if st else {}
    while alive(its) and os.getppid() == driver:
        known.update({p: s for p, s in descendants({driver}).items() if p != me})
        time.sleep(POLL_S)
    left = alive(known)
    left.update({p: s for p, s in descendants(set(left)).items() if p != me})
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + GRACE_S
    while alive(left) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


def start() -> subprocess.Popen | None:
    """Start the reaper of this process (its own session: a signal to the driver's group does not stop it)."""
    if not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    if os.path.isdir("/proc"):
        reap(int(sys.argv[1]))
