"""Resume that survives a damaged checkpoint, through the real command (torchrun, 2 CPU processes, gloo, ZeRO-2).

A copy of the uninterrupted reference run keeps its checkpoints of steps 6, 9 and 10. For each kind of file
(a ZeRO optimizer shard of rank 1, DeepSpeed's model states, a trainer rank file of ours: files that different ranks
verify) the newest checkpoint loses the file and the one before has it truncated, all three kinds in one copy.
``train.resume=auto`` must verify both against their ``COMPLETE``, name every bad file in the log, move both to
``_quarantine/`` (still on disk, with every reason), resume from step 6 and compute steps 7-10 bitwise as the
reference did. An explicit ``train.resume=<damaged checkpoint>`` stops with a
message naming the file, and loads nothing.

The resumed runs also carry object-store credentials in ``data.source.storage_options``: neither the checkpoints'
``config.yaml`` nor the export's nor the log may hold them.
"""
from __future__ import annotations

import json
import re

from tests.train.conftest import REF_STEPS, copy_run, kill_job, metrics, run, same_training, start

SECRET, ACCESS_KEY = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "AKIAIOSFODNN7EXAMPLE"
CREDENTIALS = [f"+data.source.storage_options.secret={SECRET}", f"+data.source.storage_options.key={ACCESS_KEY}"]
# (name, the file of a checkpoint to damage): DeepSpeed's ZeRO shard of rank 1, its model states, our rank 0 file
FILES = {"optimizer_shard": "zero_pp_rank_1_mp_rank_00_optim_states.pt",
         "model_states": "mp_rank_00_model_states.pt",
         "trainer_rank_file": "trainer/rank_00000.pt"}


def _damage(ckdir, files: str):
    """Delete ``files`` of step 10, truncate them in step 9; returns the two damaged paths."""
    gone, cut = ckdir / "step_00000010" / files, ckdir / "step_00000009" / files
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return gone, cut


def test_auto_resume_falls_back_past_damaged_checkpoints(tmp_path, base_overrides, reference_zero2):
    out = copy_run(reference_zero2, tmp_path / "run", REF_STEPS)
    ckdir = out / "stage1" / "checkpoints"
    assert sorted(d.name for d in ckdir.glob("step_*")) == ["step_00000006", "step_00000009", "step_00000010"]
    damaged = {kind: _damage(ckdir, FILES[kind]) for kind in sorted(FILES)}  # kind: (gone, cut)
    log = run(out, [*base_overrides, f"stage.steps={REF_STEPS}", "train.resume=auto", *CREDENTIALS],
              log_name="resume.log")

    assert "checkpoint step_00000010 is damaged: " in log and "checkpoint step_00000009 is damaged: " in log, \
        log[-4000:]
    for kind, (gone, cut) in damaged.items():  # every bad file named, with what is wrong with it
        assert f"{gone}: is missing" in log, (kind, log[-4000:])
        assert re.search(re.escape(f"{cut}: is ") + r"\d+ bytes, COMPLETE recorded \d+ \(truncated or replaced\)",
                         log), (kind, log[-4000:])
    assert "resuming from step_00000006: the newest checkpoint that verifies" in log
    assert f"rank 0 resumed from {ckdir / 'step_00000006'} at step 6" in log
    for tag, i in (("step_00000010", 0), ("step_00000009", 1)):  # moved aside with the reasons, kept
        q = ckdir / "_quarantine" / tag
        assert (q / "COMPLETE").is_file() and len(list(q.rglob("*.pt"))) == 6 - (len(FILES) if i == 0 else 0)
        reason = json.loads(q.with_name(f"{tag}.reason.json").read_text())
        assert sorted(p["file"] for p in reason["problems"]) == sorted(str(d[i]) for d in damaged.values())
    bad = same_training(metrics(out), metrics(reference_zero2), range(7, REF_STEPS + 1))
    assert not bad, "resumed from step 6 after the fallback:\n" + "\n".join(bad)
    assert (ckdir / "latest").read_text() == f"step_{REF_STEPS:08d}"

    written = [ckdir / "step_00000009" / "config.yaml", ckdir / "step_00000010" / "config.yaml",
               out / "stage1" / "export" / "config.yaml"]
    for path in written:  # the run's credentials reached no config we wrote, nor the log
        text = path.read_text()
        assert "storage_options" in text and SECRET not in text and ACCESS_KEY not in text, path
    assert SECRET not in log and ACCESS_KEY not in log


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(tmp_path, base_overrides, reference_zero2):
    out = copy_run(reference_zero2, tmp_path / "run", REF_STEPS)
    tag_dir = out / "stage1" / "checkpoints" / "step_00000010"
    bad = tag_dir / FILES["optimizer_shard"]
    bad.write_bytes(bad.read_bytes()[:-1])
    p = start(out, [*base_overrides, f"stage.steps={REF_STEPS}", f"train.resume={tag_dir}"], log_name="resume.log")
    try:
        rc = p.wait(timeout=300)
    finally:
        kill_job(p)
    log = (out / "resume.log").read_text(errors="replace")
    assert rc != 0 and "(exitcode: 3)" in log, log[-4000:]  # torchrun exits 1; the rank that failed, 3
    assert f"{tag_dir} fails verification: {bad}: is " in log and "Nothing was loaded" in log, log[-4000:]
    assert tag_dir.is_dir() and not (tag_dir.parent / "_quarantine").exists()  # an explicit choice is not moved
