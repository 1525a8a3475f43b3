"""Stage 4 (``stage=audio``): the audio encoder learns the face motion encoder's tokens from the voice.

The config and the starting weights; a learning check on held-out made-up talking clips (train/synthetic.py: the
mouth opens with the voice's loudness), where the trained encoder must beat the silence and shuffled-audio
baselines; and the stage through the real trainer on 2 DeepSpeed ranks: only the audio encoder changes, a resumed
run computes the losses of an uninterrupted one bitwise, the export holds the audio encoder."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.config import load_preset
from models.dreamactor import AUDIO_STAGE, STAGE_GROUPS, DreamActor, param_group_of
from tests.conftest import compose
from tests.train.conftest import env, free_port, metrics
from train.audio_step import AudioEval, AudioTokenStep, speech_clip, token_errors, token_loss
from train.config import TrainConfigError, to_job
from train.stages import build_model
from train.synthetic import talking_batch

ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path, *overrides):
    return to_job(compose("train", [f"train.out_dir={tmp_path}", "data.source.dataset=outputs/preprocess", *overrides]))


def test_the_audio_stage_config(tmp_path):
    job = _job(tmp_path, "stage=audio", "launch=gpu")
    assert (job.stage.id, job.stage.name, job.stage.use_audio, job.stage.use_face) == (AUDIO_STAGE, "audio", True, True)
    assert job.data.face_crops is True and job.stage.init == "auto"
    assert job.train.compile_blocks is False  # no DiT runs in this stage
    assert job.train.optimizer.lr * job.train.optimizer.lr_scale["audio_encoder"] == pytest.approx(2e-4)
    assert not _job(tmp_path, "stage=full").stage.use_audio
    for bad, needle in ((["stage=face", "stage.use_audio=true"], "stage.use_audio=True"),
                        (["stage=audio", "stage.use_face=false", "data.face_crops=false"], "stage.use_face must be"),
                        (["stage=audio", "train.sequence_parallel=2"], "sequence_parallel must be 1")):
        with pytest.raises(TrainConfigError, match=needle):
            _job(tmp_path, *bad)


def test_stage_4_starts_from_stage_3_with_a_new_audio_encoder(tmp_path):
    cfg = _job(tmp_path).model
    torch.manual_seed(3)
    stage3 = DreamActor(cfg)  # the paper's model: no audio encoder in its export
    (tmp_path / "stage3" / "export").mkdir(parents=True)
    save_file(stage3.state_dict(), str(tmp_path / "stage3" / "export" / "model.safetensors"))
    model = build_model(_job(tmp_path, "stage=audio"))
    assert model.audio_encoder is not None
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in stage3.state_dict().items())
    for n, p in model.named_parameters():
        assert p.requires_grad == (param_group_of(n) in STAGE_GROUPS[AUDIO_STAGE]) == n.startswith("audio_encoder."), n
    # a later stage started from a stage-4 export ignores its audio encoder
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "s4.safetensors"))
    back = build_model(_job(tmp_path, "stage=full", f"stage.init={tmp_path / 's4.safetensors'}"))
    assert back.audio_encoder is None and all(torch.equal(back.state_dict()[k], sd[k]) for k in back.state_dict())


@pytest.fixture()
def one_thread():
    """One intra-op thread: these small ops run 10x slower when two threads contend with another process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_the_audio_stage_learns_face_tokens_from_the_voice(one_thread):
    """Learning check (tiny preset, CPU, 40 steps): on held-out clips the trained audio encoder's token error is far
    below the silence baseline and below the shuffled-audio one (another clip's speech), as the periodic evaluation
    logs them; clips without audio and frames without a face do not count."""
    torch.manual_seed(0)
    model = DreamActor(load_preset("tiny"), audio=True)
    model.set_stage(AUDIO_STAGE)
    step = AudioTokenStep(types.SimpleNamespace(launch=types.SimpleNamespace(precision="fp32")), torch.device("cpu"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    crop = model.cfg.face_encoder.crop_size
    held_out = [speech_clip(talking_batch(crop, batch=4, frames=17, fps=(25.0, 30.0), seed=10_000 + i))
                for i in range(2)]
    before = token_errors(model, held_out)
    losses = []
    for i in range(40):
        out = step(model, talking_batch(crop, batch=4, frames=17, fps=(25.0, 30.0), seed=i, face_dropout=0.1,
                                        no_audio_rows=i % 2), i, 0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    after = token_errors(model, held_out)
    print(json.dumps({"before": before, "after": after}, indent=1))  # the figures of docs/training.md
    logged = []
    logger = types.SimpleNamespace(scalars=lambda step, rec: logged.append((step, rec)))
    dist = types.SimpleNamespace(device=torch.device("cpu"), is_main=True)
    held_batches = [talking_batch(crop, batch=4, frames=17, fps=(25.0, 30.0), seed=10_000 + i) for i in range(2)]
    rec = AudioEval(None, dist, torch.float32, batches=held_batches).run(model, logger, 40)
    assert logged == [(40, rec)] and rec["mse_model"] == pytest.approx(after["mse_model"])
    assert after["frames"] == before["frames"] == 2 * 4 * 17
    assert losses[-1] < 0.1 * losses[0]
    assert after["mse_model"] < 0.1 * after["mse_silence"]
    assert after["mse_model"] < 0.5 * after["mse_shuffled"]
    assert after["cos_model"] > max(after["cos_silence"], after["cos_shuffled"])
    # masking: a row without audio and frames without a face contribute nothing to the loss
    b = talking_batch(crop, batch=2, frames=9, seed=5, no_audio_rows=1)
    out = model(speech=speech_clip(b))
    assert not out.mask[1].any() and out.mask[0].all()
    b.face_valid[0, :4] = False
    out2 = model(speech=speech_clip(b))
    assert out2.mask[0].tolist() == [False] * 4 + [True] * 5
    err = (out.pred - out.target).square().mean(-1)[0]
    assert torch.isclose(token_loss(out2), err[4:].mean())


def test_the_audio_stage_under_deepspeed_resumes_exactly_and_exports(tmp_path):
    """Two CPU ranks (gloo, ZeRO-2), the real trainer on made-up talking clips: an uninterrupted 6-step run, and one
    stopped after step 4 and resumed to 6 (each rank's clips and the last row of each batch without audio). The
    losses agree bitwise, only the audio encoder moved, and the export carries it (with its EMA)."""
    torch.manual_seed(1)
    init = tmp_path / "stage3.safetensors"
    save_file(DreamActor(load_preset("tiny")).state_dict(), str(init))
    a, b = tmp_path / "a", tmp_path / "b"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(ROOT / "tests" / "train" / "audio_worker.py"), f"{a}:6", f"{b}:4,6", f"stage.init={init}",
           "train.checkpoint.every=2", "train.log.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ma, mb = metrics(a, AUDIO_STAGE), metrics(b, AUDIO_STAGE)
    assert sorted(ma) == sorted(mb) == [1, 2, 3, 4, 5, 6]
    assert [ma[s]["loss"] for s in ma] == [mb[s]["loss"] for s in ma]  # bitwise, across the resume
    assert ma[6]["loss"] < 0.5 * ma[1]["loss"] and all(r["update_applied"] for r in ma.values())
    assert ma[6]["tflops"] > 0 and ma[6]["samples"] == 2 * 3  # both ranks' clips, counted by the trainer
    start = load_file(str(init))
    for name in ("model", "ema"):
        out = load_file(str(b / f"stage{AUDIO_STAGE}" / "export" / f"{name}.safetensors"))
        assert all(torch.equal(out[k], v) for k, v in start.items()), f"{name}: a frozen parameter changed"
        audio = [k for k in out if k.startswith("audio_encoder.")]
        assert audio and set(out) == set(start) | set(audio)
    model = DreamActor(load_preset("tiny"), audio=True)
    model.load_state_dict(load_file(str(b / f"stage{AUDIO_STAGE}" / "export" / "ema.safetensors")), strict=True)


def test_stage_audio_trains_on_preprocessed_talking_videos(tmp_path):
    """The whole data path of stage 4: talking videos (espeak-ng speech, the mouth keyed to it) through
    ``preprocess/run.py`` (embedded annotators: face crops; the clips' audio) and ``train/run.py stage=audio`` reading
    the shards' audio (1 CPU process, from a random stage-3 export): every step applied, the loss finite and falling."""
    from preprocess import demo_media
    from tests.preprocess.helpers import run_cli
    from tests.train.conftest import DATA, QUIET, run

    media = tmp_path / "in"
    try:
        for i, photo in enumerate(("grace_hopper", "astronaut")):
            demo_media.talking_video(media / f"talk{i}.mp4", photo, demo_media.SENTENCES[i], size=(128, 128))
    except demo_media.SpeechUnavailable as e:
        pytest.skip(f"no speech synthesiser: {e}")
    data = tmp_path / "data"
    r = run_cli([f"input={media}", f"output={data}", "annotators=embedded", "plan.min_frames=9", "plan.max_frames=33",
                 "ray.progress_bars=false"], env=dict(env(), RAY_AUTH_MODE="disabled"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    torch.manual_seed(0)
    init = tmp_path / "stage3.safetensors"
    save_file(DreamActor(load_preset("tiny")).state_dict(), str(init))
    out = tmp_path / "run"
    run(out, ["model=tiny", "launch=local", "stage=audio", f"stage.init={init}", f"data.source.dataset={data}", *DATA,
              "data.audio=true", "data.workers.num_workers=0", "stage.steps=6", *QUIET], nproc=1)
    m = metrics(out, AUDIO_STAGE)
    assert sorted(m) == [1, 2, 3, 4, 5, 6] and all(r["update_applied"] for r in m.values())
    losses = [m[s]["loss"] for s in sorted(m)]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[3:]) < losses[0], losses
