"""preprocess/reaper.py: what a killed driver started (a child, and that child's child, which outlive it in their own
session like Ray's agents do) is ended within seconds; after a normal exit the reaper leaves by itself."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from preprocess.reaper import alive, descendants
from tests.conftest import ROOT

DRIVER = """
import subprocess, sys, time
sys.path.insert(0, {root!r})
from preprocess import reaper
reaper.start()
# a child in its own session that starts a grandchild: neither gets the driver's signals
subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                  "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"],
                 start_new_session=True)
print("ready", flush=True)
time.sleep({life})
"""

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the reaper reads /proc")


def _start(life: float) -> tuple[subprocess.Popen, dict[int, str]]:
    p = subprocess.Popen([sys.executable, "-c", DRIVER.format(root=str(ROOT), life=life)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "ready"
    deadline = time.time() + 20
    while len(descendants({p.pid})) < 3 and time.time() < deadline:  # reaper, child, grandchild
        time.sleep(0.05)
    time.sleep(1.0)  # the reaper has looked at least once
    return p, descendants({p.pid})


def _left_after(procs, seconds: float) -> list[int]:
    """The processes still alive after waiting up to ``seconds`` for them to end (then killed, not to leak)."""
    deadline = time.time() + seconds
    while alive(procs) and time.time() < deadline:
        time.sleep(0.1)
    left = alive(procs)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


def test_what_a_killed_driver_started_is_ended():
    driver, procs = _start(life=120)
    assert len(procs) == 3
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    left = _left_after(procs, 15)
    assert not left


def test_after_a_normal_exit_the_reaper_leaves():
    driver, procs = _start(life=3)
    assert len(procs) == 3
    driver.wait()
    left = _left_after(procs, 15)
    assert not left  # here the driver left its child behind: the reaper ends it too
