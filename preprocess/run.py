"""python preprocess/run.py [+cluster=prod] [input=...] [output=...]: raw videos → WebDataset shards.

With no argument: local Ray, embedded annotators, built-in sample inputs. Exit code 0 when every
input has its clips, 3 when some input has a failure row instead (this run's or an unretried earlier one's;
see failures.parquet), 2 on a configuration error or when another
run holds the output (its lock names it).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

if __package__ in (None, ""):  # `python preprocess/run.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hydra
from omegaconf import DictConfig

from preprocess.config import ConfigError, to_config

log = logging.getLogger("preprocess")


@hydra.main(config_path="../conf", config_name="preprocess", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from preprocess import demo_media, pipeline
    from preprocess.storage import check_output, list_inputs

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the output's lock is released, Ray shut down
    try:
        cfg = to_config(dcfg)
        check_output(cfg.output)
        if cfg.input is None:
            s = cfg.samples
            paths = demo_media.ensure_samples(s.dir, size=s.size, n_frames=s.n_frames, fps=s.fps, megamind=s.megamind)
            log.info("no input= given: %d built-in sample videos", len(paths))
            inputs = [f for p in paths for f in list_inputs(p)]
        else:
            inputs = list_inputs(cfg.input, timeout_s=cfg.probe.list_timeout_s)
        if cfg.max_videos is not None:
            inputs = inputs[: cfg.max_videos]
        code = pipeline.run(cfg, inputs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        try:
            import ray
            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    sys.exit(code)


def check_overrides(argv: list[str]) -> str | None:
    """Compose the config from the command line the way Hydra will; a bad override (unknown key, bad value
    syntax, missing group option) as one line naming it, with the full trace in a log file; None when fine."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if any(a.startswith("-") for a in argv):  # --cfg job, --help, --multirun ...: Hydra's own options
        return None
    try:
        from hydra import compose, initialize_config_dir

        conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            compose("preprocess", overrides)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types; each becomes one line
        import tempfile
        import traceback

        with tempfile.NamedTemporaryFile("w", prefix="preprocess-config-", suffix=".log", delete=False) as f:
            traceback.print_exc(file=f)
        return f"{_override_message(e, overrides)} (full trace: {f.name})"
    return None


def _override_message(e: Exception, overrides: list[str]) -> str:
    """One line for a composition error: the override it names, and what to do."""
    import re

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
        return (f"unknown config key {key!r} in {culprit!r}: the keys are those of conf/preprocess.yaml "
                f"(`python preprocess/run.py --cfg job` prints them); +{key.lstrip('+')}=... adds a new one")
    m = re.search(r"Could not find '([^']+)/([^']+)'.*?Available options in '[^']+':(.*?)Config search path", raw,
                  re.DOTALL)
    if m:
        options = ", ".join(m.group(3).split())
        return (f"{culprit or m.group(1) + '=' + m.group(2)}: {m.group(1)} has no option {m.group(2)!r} "
                f"(available: {options})")
    return f"bad override {culprit + ': ' if culprit else ''}{text.split(' See https://')[0]}"


if __name__ == "__main__":
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
