"""Run native decoders in a child process, so a crash or a hang costs one video, not the job.

Every input is first opened and fully decoded (probe + shot detection) here; a file that survives
that pass is known to decode, and the clip decoder then reads it in-process.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool


class DecoderCrashed(RuntimeError):
    """The isolated decoder process died (a native crash, e.g. SIGSEGV/abort in FFmpeg/decord)."""


class DecoderTimeout(RuntimeError):
    """The isolated decoder did not finish within the configured time."""


class Isolated:
    """One reusable child process; it is replaced after a crash or a timeout."""

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    def _kill(self) -> None:
        if self._pool is None:
            return
        for p in list(getattr(self._pool, "_processes", {}).values()):
            try:
                p.kill()
            except Exception:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def call(self, fn, *args, timeout: float, **kwargs):
        """``fn(*args, **kwargs)`` in the child; its exceptions are re-raised here."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        fut = self._pool.submit(fn, *args, **kwargs)
        try:
            return fut.result(timeout=timeout)
        except BrokenProcessPool:
            self._kill()
            raise DecoderCrashed("the decoder process died while reading this input (native crash)") from None
        except FutureTimeout:
            self._kill()
            raise DecoderTimeout(f"decoding did not finish within {timeout:g} s (probe.timeout_s)") from None

    def close(self) -> None:
        self._kill()


def crash_for_test(sig: int = signal.SIGSEGV) -> None:
    """Kill the calling process with ``sig`` (used by tests to prove isolation)."""
    import os
    os.kill(os.getpid(), sig)
