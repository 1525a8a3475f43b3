"""Run native decoders in a child process, so a crash or a hang costs one video, not the job.

Every input is first opened and fully decoded (probe + shot detection) here; a file that survives
that pass is known to decode, and the clip decoder then reads it in-process.

The child is a plain ``python`` subprocess serving calls over a private pipe pair (length-prefixed
pickles), not a ``multiprocessing`` pool: a pool's semaphores live in multiprocessing's resource
tracker, which does not survive inside Ray workers (it was relaunched mid-run and printed a KeyError
traceback per semaphore at exit). The child's stdout and stderr stay the worker's (FFmpeg's messages land
in the worker log), and nothing it prints can corrupt the protocol.
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time

_HEADER = struct.Struct("<Q")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DecoderCrashed(RuntimeError):
    """The isolated decoder process died (a native crash, e.g. SIGSEGV/abort in FFmpeg/decord)."""


class DecoderTimeout(RuntimeError):
    """The isolated decoder did not finish within the configured time."""


def _write_frame(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None at EOF; TimeoutError past ``deadline`` (monotonic)."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None):
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        raise EOFError
    body = _read_exact(fd, _HEADER.unpack(head)[0], deadline)
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _serve(read_fd: int, write_fd: int) -> None:
    """The child's loop: ``(fn, args, kwargs)`` in, ``(ok, result or exception)`` out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the child ends
    while True:
        try:
            fn, args, kwargs = _read_frame(read_fd)
        except EOFError:
            return
        try:
            out = (True, fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - every error goes back to the caller
            try:
                pickle.dumps(e)
                out = (False, e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle travels as its text
                out = (False, RuntimeError(f"{type(e).__name__}: {e}"))
        _write_frame(write_fd, out)


class Isolated:
    """One reusable child process; it is replaced after a crash or a timeout."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._to_child: int | None = None
        self._from_child: int | None = None

    def _start(self) -> None:
        c_read, p_write = os.pipe()  # parent -> child
        p_read, c_write = os.pipe()  # child -> parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        code = f"from preprocess.isolate import _serve; _serve({c_read}, {c_write})"
        self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(c_read, c_write), env=env,
                                      stdin=subprocess.DEVNULL, close_fds=True)
        os.close(c_read)
        os.close(c_write)
        self._to_child, self._from_child = p_write, p_read

    def _kill(self) -> None:
        if self._proc is None:
            return
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._proc.kill()
        except OSError:
            pass
        self._proc.wait()
        self._proc = self._to_child = self._from_child = None

    def call(self, fn, *args, timeout: float, **kwargs):
        """``fn(*args, **kwargs)`` in the child (``fn`` importable by name); its exceptions are re-raised here."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            self._start()
        try:
            _write_frame(self._to_child, (fn, args, kwargs))
            ok, value = _read_frame(self._from_child, time.monotonic() + timeout)
        except TimeoutError:
            self._kill()
            raise DecoderTimeout(f"decoding did not finish within {timeout:g} s (probe.timeout_s)") from None
        except (EOFError, BrokenPipeError, OSError):
            code = self._proc.wait() if self._proc is not None else None
            self._kill()
            how = f" (signal {signal.Signals(-code).name})" if code is not None and code < 0 else ""
            raise DecoderCrashed(f"the decoder process died while reading this input (native crash{how})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass


def crash_for_test(sig: int = signal.SIGSEGV) -> None:
    """Kill the calling process with ``sig`` (used by tests to prove isolation)."""
    os.kill(os.getpid(), sig)
