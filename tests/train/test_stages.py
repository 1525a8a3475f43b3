"""The progressive stages (paper 3.4): trainable sets, starting weights, and stage 1 -> 2 -> 3 end to end
through the real command, with frozen parameters proven bit-identical after stage-2 steps."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.dreamactor import STAGE_GROUPS, DreamActor, param_group_of
from tests.conftest import compose
from tests.train.conftest import metrics, run
from train.config import to_job
from train.stages import build_model, frozen_signature


def _job(tmp_path, *overrides):
    return to_job(compose("train", [f"train.out_dir={tmp_path}", "data.source.dataset=outputs/preprocess", *overrides]))


@pytest.mark.parametrize("stage,name", [(1, "pose"), (2, "face"), (3, "full")])
def test_trainable_set_of_each_stage(tmp_path, stage, name):
    if stage > 1:  # stage 2/3 start from the previous stage's export
        prev = tmp_path / f"stage{stage - 1}" / "export"
        prev.mkdir(parents=True)
        save_file(DreamActor(_job(tmp_path).model).state_dict(), str(prev / "model.safetensors"))
    job = _job(tmp_path, f"stage={name}")
    assert job.stage.id == stage and job.data.face_crops == (stage > 1)
    model = build_model(job)
    for n, p in model.named_parameters():
        assert p.requires_grad == (param_group_of(n) in STAGE_GROUPS[stage]), n
    assert any(p.requires_grad for p in model.parameters())
    assert any(not p.requires_grad for p in model.parameters()) == (stage < 3)


def test_next_stage_starts_from_the_previous_export(tmp_path):
    torch.manual_seed(123)
    src = DreamActor(_job(tmp_path).model)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    export = tmp_path / "stage1" / "export"
    export.mkdir(parents=True)
    save_file(src.state_dict(), str(export / "model.safetensors"))
    model = build_model(_job(tmp_path, "stage=face"))
    for (n, a), b in zip(src.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    sig = frozen_signature(model)
    trainable = next(p for p in model.parameters() if p.requires_grad)
    frozen = next(p for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        trainable.add_(1.0)
    assert frozen_signature(model) == sig  # a trainable change is not a frozen change
    with torch.no_grad():
        frozen.view(-1)[0] += 1.0
    assert frozen_signature(model) != sig


def test_missing_previous_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 1 to its end first"):
        build_model(_job(tmp_path, "stage=face"))


def test_stage_1_2_3_end_to_end(tmp_path, base_overrides, reference_zero2):
    """Stage 1 is the reference run (local default, ZeRO-2); stage 2 and 3 continue it through the CLI."""
    out = tmp_path / "run"
    shutil.copytree(reference_zero2, out)
    s1 = load_file(str(out / "stage1" / "export" / "model.safetensors"))
    run(out, [*base_overrides, "stage=face", "stage.steps=3"], log_name="stage2.log")
    s2 = load_file(str(out / "stage2" / "export" / "model.safetensors"))
    s2_ema = load_file(str(out / "stage2" / "export" / "ema.safetensors"))
    params = {n for n, _ in DreamActor(_job(tmp_path).model).named_parameters()}
    frozen = [n for n in params if param_group_of(n) not in STAGE_GROUPS[2]]
    trained = [n for n in params if param_group_of(n) in STAGE_GROUPS[2]]
    assert frozen and trained
    changed_frozen = [n for n in frozen if not torch.equal(s1[n], s2[n])]
    assert not changed_frozen, f"stage 2 changed frozen parameters: {changed_frozen[:5]}"
    assert all(torch.equal(s2_ema[n], s2[n]) for n in frozen)
    changed = [n for n in trained if not torch.equal(s1[n], s2[n])]
    assert len(changed) > 0.8 * len(trained), f"only {len(changed)}/{len(trained)} stage-2 parameters moved"
    assert all(not torch.equal(s2_ema[n], s2[n]) for n in changed)  # the EMA lags the weights
    assert all(math.isfinite(r["loss"]) for r in metrics(out, 2).values())

    run(out, [*base_overrides, "stage=full", "stage.steps=2", "zero=zero3"], log_name="stage3.log")
    s3 = load_file(str(out / "stage3" / "export" / "model.safetensors"))
    moved = {param_group_of(n) for n in params if not torch.equal(s2[n], s3[n])}
    assert moved == set(STAGE_GROUPS[3]), f"stage 3 trained only {moved}"
    model = DreamActor(_job(tmp_path).model)
    model.load_state_dict(load_file(str(out / "stage3" / "export" / "ema.safetensors")), strict=True)
