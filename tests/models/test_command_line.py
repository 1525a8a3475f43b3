"""``models.command_line.finish``: a job's end without the interpreter's teardown still does what an exit does."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_finish_joins_threads_runs_atexit_and_keeps_the_exit_code(tmp_path):
    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from models.command_line import finish

        out = open({str(tmp_path / "log.txt")!r}, "w")
        def late():
            time.sleep(0.5)
            out.write("thread\\n")
        threading.Thread(target=late).start()
        atexit.register(lambda: (out.write("atexit\\n"), out.close()))
        print("last line", end="")  # unflushed: finish flushes it
        finish(3)
        out.write("after finish\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "last line"
    assert (tmp_path / "log.txt").read_text() == "thread\natexit\n"


def test_finish_ends_a_job_that_left_an_executor_idle(tmp_path):
    """An idle ThreadPoolExecutor (inductor's compile workers after torch.compile) is told to stop, as at a normal
    exit, instead of joined while it waits for work forever."""
    script = textwrap.dedent(f"""
        import sys
        from concurrent.futures import ThreadPoolExecutor
        sys.path.insert(0, {str(ROOT)!r})
        from models.command_line import finish

        pool = ThreadPoolExecutor(2)
        assert pool.submit(lambda: 41 + 1).result() == 42  # its workers now idle, never shut down
        finish(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
