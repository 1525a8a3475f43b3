"""The command line of a Hydra job, checked before Hydra runs it: one line per problem, exit status 2.

Hydra reports a bad override (unknown key, bad value syntax, a group option that does not exist) as a long
trace, and ``--cfg job`` prints a config without building it, so a typo in a value (``plan.min_frames=-3``)
shows up only when the job starts. :func:`check_command_line` composes the config the way Hydra will, and with
``--cfg``/``-c`` also builds it into the job's typed config (:mod:`models.typed_config`): a config that
prints is a config that runs. Used by ``preprocess/run.py`` and ``train/run.py``.
"""
from __future__ import annotations

import os
import re
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from .typed_config import ConfigError

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
PRINT_OPTIONS = ("--cfg", "-c")  # Hydra prints the config: build it first
OTHER_OPTIONS = ("--help", "-h", "--hydra-help", "--info", "-i", "--multirun", "-m", "--shell-completion", "-sc",
                 "--run", "-r", "--version")


def compose(config_name: str, overrides: list[str] | None = None):
    """The config ``conf/<config_name>.yaml`` with ``overrides``, as the job's command line would compose it (for
    benchmarks, tests and tools that build a job's config without running Hydra's main)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def check_command_line(argv: list[str], config_name: str, build: Callable[[Any], Any] | None = None) -> str | None:
    """None when ``argv`` composes (and, with ``--cfg``, builds with ``build``); else one line saying what is wrong,
    with the full trace in a log file."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    options = [a.split("=")[0] for a in argv if a.startswith("-")]
    if any(o in OTHER_OPTIONS for o in options) or any(o not in PRINT_OPTIONS for o in options):
        return None  # Hydra's own options (help, multirun, a config dir, ...): Hydra handles the command line
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types; each becomes one line
        return f"{override_message(e, overrides, config_name)} (full trace: {_trace_file(config_name)})"
    if options and build is not None:
        return _build_for_print(cfg, build)
    return None


def print_job_config(argv: list[str], config_name: str) -> bool:
    """``--cfg job`` (alone among Hydra's options): print the composed config with every secret redacted
    (``models.redact``; Hydra would print storage credentials as they are); True when printed."""
    options = [a for a in argv if a.startswith("-")]
    i = next((k for k, a in enumerate(argv) if a in PRINT_OPTIONS), None)
    if i is None or len(options) != 1 or i + 1 >= len(argv) or argv[i + 1] != "job":
        return False
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .redact import redacted

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides)
    print(OmegaConf.to_yaml(OmegaConf.create(redacted(OmegaConf.to_container(cfg, resolve=False)))), end="")
    return True


def _build_for_print(cfg, build: Callable[[Any], Any]) -> str | None:
    """Build the config that ``--cfg`` prints. An environment variable it reads that is not set here (the prod
    profile's ``${oc.env:DREAMACTOR_INPUT}``, set on the cluster) stands in as ``<NAME>``: the print checks every
    other value, the job itself checks the real one."""
    missing: list[str] = []
    try:
        for _ in range(32):
            try:
                build(cfg)
                return None
            except Exception as e:  # noqa: BLE001 - a ConfigError, or OmegaConf's interpolation errors
                m = re.search(r"Environment variable '([^']+)' not found", str(e))
                if not m or m.group(1) in missing:
                    return str(e) if isinstance(e, ConfigError) else f"the config does not resolve: {e}"
                missing.append(m.group(1))
                os.environ[m.group(1)] = f"<{m.group(1)}>"
        return None
    finally:
        for name in missing:
            os.environ.pop(name, None)


def exit_on_bad_command_line(config_name: str, build: Callable[[Any], Any] | None = None) -> None:
    """Check ``sys.argv`` (:func:`check_command_line`); on a problem print it as one line and exit 2."""
    import sys

    problem = check_command_line(sys.argv[1:], config_name, build)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if print_job_config(sys.argv[1:], config_name):
        sys.exit(0)


def _trace_file(config_name: str) -> str:
    with tempfile.NamedTemporaryFile("w", prefix=f"{config_name}-config-", suffix=".log", delete=False) as f:
        traceback.print_exc(file=f)
    return f.name


def override_message(e: Exception, overrides: list[str], config_name: str) -> str:
    """One line for a composition error: the override it names, and what to do."""
    raw = str(e)
    text = " ".join(raw.split())

    def by_value(o: str) -> bool:
        value = o.partition("=")[2]
        return bool(value) and (f"'{value}'" in raw or f"input '{value}" in raw or f"/{value}'" in raw)

    def by_key(o: str) -> bool:
        key = o.partition("=")[0].lstrip("+~")
        return f"'{key}'" in raw or f"full_key: {key}" in raw

    culprit = next((o for o in reversed(overrides) if by_value(o)), None) or next(
        (o for o in reversed(overrides) if by_key(o)), None)
    if "not in struct" in text or "Could not override" in text or "Could not append" in text:
        key = culprit.split("=", 1)[0] if culprit else "?"
        return (f"unknown config key {key!r} in {culprit!r}: the keys are those of conf/{config_name}.yaml and its "
                f"groups (`--cfg job` prints them); +{key.lstrip('+')}=... adds a new one")
    m = re.search(r"Could not find '([^']+)/([^']+)'.*?Available options in '[^']+':(.*?)Config search path", raw,
                  re.DOTALL)
    if m:
        options = ", ".join(m.group(3).split())
        return (f"{culprit or m.group(1) + '=' + m.group(2)}: {m.group(1)} has no option {m.group(2)!r} "
                f"(available: {options})")
    return f"bad override {culprit + ': ' if culprit else ''}{text.split(' See https://')[0]}"


def finish(code: int) -> None:
    """End the job with ``code`` once its work is done, without the interpreter's teardown.

    What a normal exit runs still runs: other threads are joined (as at interpreter exit) and the ``atexit``
    handlers (logging's flush, multiprocessing's reaping of children, Ray's and TensorBoard's) are called.
    What is skipped is the final garbage collection and module teardown over every object torch, dynamo and the
    job made: 4-5 s per process of ``train/run.py`` (a 2-rank CPU launch: 4.3 s from its last line to its exit,
    then 1.1 s), and seconds of a preprocessing driver. Files the job wrote are closed by then (the trainer's
    logger and checkpoints, the pipeline's tables)."""
    import atexit
    import sys
    import threading

    # The interpreter's exit, in its order: threading's exit hooks (they tell idle pools such as inductor's compile
    # workers, concurrent.futures executors, to stop), the join of every non-daemon thread, then atexit. Joining
    # before the hooks waited forever on an idle executor (train/run.py with compiled blocks).
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:  # an interpreter without the private hook: wake the executors ourselves, then join
        from concurrent.futures import thread as futures_thread

        futures_thread._python_exit()
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say there
            pass
    os._exit(code)
