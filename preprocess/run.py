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

from models.command_line import exit_on_bad_command_line, finish
from models.redact import install_log_redaction
from preprocess.config import ConfigError, to_config

log = logging.getLogger("preprocess")


@hydra.main(config_path="../conf", config_name="preprocess", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from preprocess import demo_media, pipeline
    from preprocess.storage import check_output, list_inputs

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the output's lock is released, Ray shut down
    install_log_redaction()  # a URI's credentials (s3://KEY:SECRET@bucket, ?X-Amz-Signature=) reach no log line
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
    finish(code)


if __name__ == "__main__":
    exit_on_bad_command_line("preprocess", to_config)
    main()
