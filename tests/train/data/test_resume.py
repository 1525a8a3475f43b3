"""The cursor, torchtitan style: consume K batches, save, rebuild, and the next M batches are those of an
uninterrupted run; on another number of ranks (separate processes, gloo) or workers, the epoch goes
on with no sample twice and none left out."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.train.data.helpers import assert_epochs_covered, read_dataset, records, summary, take
from train.data import DataConfigError


@pytest.mark.parametrize("workers,k,m", [(0, 3, 5), (2, 3, 5)])
def test_resume_yields_exactly_the_uninterrupted_batches(make_loader, workers, k, m):
    overrides = [f"data.workers.num_workers={workers}"]
    reference = [summary(b) for b in take(make_loader(*overrides), k + m)]
    first = make_loader(*overrides)
    it = iter(first)
    got = [summary(next(it)) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON: it goes into any checkpoint
    del it
    resumed = make_loader(*overrides)
    resumed.load_state_dict(state)
    got += [summary(b) for b in take(resumed, m)]
    assert got == reference
    assert resumed.state_dict()["steps"] == {"0": k + m}


def test_a_cursor_for_other_data_or_settings_is_refused(make_loader):
    loader = make_loader("data.workers.num_workers=0")
    take(loader, 1)
    state = loader.state_dict()
    with pytest.raises(DataConfigError, match="seed"):
        make_loader("data.workers.num_workers=0", seed=1).load_state_dict(state)
    with pytest.raises(DataConfigError, match="plan"):
        make_loader("data.workers.num_workers=0", "data.dropout.ref=0.5").load_state_dict(state)
    other = make_loader("data.workers.num_workers=0", "data.dropout.ref=0.5")
    other.load_state_dict(state, strict=False)  # allowed on request
    assert next(iter(other)).size >= 1


def test_other_worker_count_continues_the_epoch(make_loader, dataset_dir):
    every = set(read_dataset(dataset_dir))
    first = make_loader("data.workers.num_workers=2")
    it = iter(first)
    recs = records([next(it) for _ in range(5)])
    state = first.state_dict()
    del it
    second = make_loader("data.workers.num_workers=3")
    second.load_state_dict(state)
    recs += records(take(second, 24))
    assert_epochs_covered(recs, 2, every)


def _rank_main(rank, world, port, out_dir, phase, steps, state_path, make_args):
    """One training process: build the rank's loader (optionally from a saved cursor), consume, save."""
    import torch.distributed as dist

    from models.config import load_preset
    from tests.conftest import compose
    from train.data import build_loader, to_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = to_config(compose("data/local", make_args).data)
        loader = build_loader(cfg, load_preset("tiny"), rank=rank, world_size=world, seed=0)
        if os.path.exists(state_path):
            with open(state_path) as f:
                loader.load_state_dict(json.load(f))
        it = iter(loader)
        batches = [next(it) for _ in range(steps)]
        state = loader.state_dict()  # collective
        if rank == 0:
            with open(state_path + ".new", "w") as f:
                json.dump(state, f)
        with open(os.path.join(out_dir, f"{phase}-rank{rank}.json"), "w") as f:
            json.dump(records(batches), f)
    finally:
        dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def forkserver():
    """Preload the loader's imports into the forkserver once for every rank process of this module."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "train.data", "models.config", "tests.conftest",
                                            "tests.train.data.test_resume"])


@pytest.mark.parametrize("worlds,steps", [((2, 1), (3, 16)), ((1, 2), (5, 10))])
def test_other_rank_count_continues_the_epoch(dataset_dir, tmp_path, forkserver, worlds, steps):
    """Ranks in separate processes with a gloo process group; the cursor saved by rank 0 after a
    collective state_dict() restores every rank of the next job."""
    from tests.train.data.conftest import DATA

    every = set(read_dataset(dataset_dir))
    args = [f"data.source.dataset={dataset_dir}", *DATA, "data.workers.num_workers=1"]
    state_path = str(tmp_path / "cursor.json")
    recs = []
    for phase, (world, n) in enumerate(zip(worlds, steps)):
        # forkserver: clean processes (a plain fork of this threaded test process can deadlock) that still
        # start from one preloaded interpreter instead of importing torch each (2 cores here)
        torch.multiprocessing.start_processes(
            _rank_main, args=(world, _free_port(), str(tmp_path), phase, n, state_path, args), nprocs=world,
            join=True, start_method="forkserver")
        os.replace(state_path + ".new", state_path)
        for r in range(world):
            recs += [tuple(x) for x in json.loads((tmp_path / f"{phase}-rank{r}.json").read_text())]
    assert_epochs_covered(recs, 2, every)
    state = json.loads(open(state_path).read())
    assert state["world_size"] == worlds[-1] and state["steps"] == {str(r): sum(steps) for r in range(worlds[-1])}
