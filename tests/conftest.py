"""Shared fixtures: a local Ray for the whole session and small videos made from shipped photos."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def compose(config_name: str = "preprocess", overrides: list[str] | None = None):
    """The Hydra config a command line would produce."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name=config_name, overrides=overrides or [])


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) shared by every test that runs a pipeline in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="dreamactor", log_to_driver=False)
    yield ray
    ray.shutdown()
