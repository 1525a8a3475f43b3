"""The audio learning test (issue 19): does the audio stage learn the face motion tokens from the voice, on speech it
never heard?

1. **Data**, made by the project's own preprocessing (``preprocess/run.py``, embedded annotators) from talking videos
   (``preprocess.demo_media.talking_video``: espeak-ng speech muxed as the sound track, the mouth of every frame
   opened by the speech's loudness and spread by its brightness) of every shipped photo with a known mouth
   (``demo_media.MOUTHS``: grace_hopper, astronaut), ``--videos-per-person`` each. Every video says its own sentence
   (6-9 words drawn from the vocabulary of ``demo_media.SENTENCES``) at its own speed, in one of its person's voices
   (``VOICES``: a voice names its speaker, as in real footage, since the teacher's tokens also say who is on screen
   and only the voice can tell the audio encoder). One dataset, split by source video with ``data.split`` (the
   trainer's own held-out split; the salt is chosen so that every person has the same share held out): held-out
   clips are sentences never heard in training, in known voices. ``--data-only`` builds it (this needs Ray,
   mediapipe and espeak-ng) and stops; a finished dataset (``<out>/data`` with ``split.json``) is reused, e.g.
   made on a CPU box and carried to a GPU one, where training needs none of the three.
2. **The teacher**: there is no trained stage-3 model, so the stage starts from a random one of the preset
   (``DreamActor(cfg)``, seeded): its frozen face motion encoder is a *random teacher*. A random FAN with
   BatchNorm's initial statistics (mean 0, variance 1) maps every face crop to nearly the same token (tiny preset,
   measured on these clips: token variance 7e-9 against a mean square of 0.015, below bf16's resolution), so its
   BatchNorm statistics are measured on training face crops first (``calibrate_teacher``, as a pretrained PD-FGC
   ships them): the tokens then vary with the face, two thirds of it within a clip (the mouth, and the crop box that
   follows the jaw; results.json ``teacher``). The teacher's tokens also differ between the two people, which the
   audio tells only through the voice: hence one voice set per person, and short silences around each sentence
   (``LEAD_S``).
3. **Training**, with the real trainer (``train/run.py stage=audio`` under torchrun: DeepSpeed ZeRO-2, the launch
   group's defaults) for a wall-clock budget (``train.time_limit_min``) or a step count. Only the audio encoder
   trains. Every ``--eval-every`` steps the trainer's own evaluation (``train/audio_step.py`` ``AudioEval``,
   ``eval.jsonl``) scores the held-out clips: token MSE and cosine of the model and of two baselines, ``silence``
   (the audio zeroed) and ``shuffled`` (every clip given the next clip's audio: mostly the next clip of the same
   video, so the same voice saying other words).

Writes ``results.json``, ``results.md`` and ``audio_learning.png`` (training loss; held-out token MSE of the model and
the baselines against the step) under ``--out``. Exit status 1 when the model's final held-out token MSE is not below
``--margin`` x both baselines', or an update was not applied.

    python bench/audio_learning.py --out outputs/audio_learning --data-only          # CPU: the dataset, 31 MB, 4 min
    python bench/audio_learning.py --out outputs/audio_learning --launch gpu --preset small --batch 32 --workers 12 \
        --minutes 2                                                                 # one GPU, the data carried
    python bench/audio_learning.py --out outputs/audio_learning --launch local --preset tiny --steps 600 --lr 3e-3 \
        --workers 1 --eval-every 50 --margin 1                                       # CPU, 6 min
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.learning import add_run_arguments, preprocess, update_counters  # noqa: E402

# Each person's voices (espeak-ng voice + variant); no voice is shared, so the voice says who speaks.
VOICES = {"grace_hopper": ("en-us+f1", "en-us+f4"), "astronaut": ("en-us+f2", "en-us+f3")}
WORDS_PER_MINUTE = (130, 190)  # each video's speed, drawn uniformly
# Silence before and after the sentence (talking_video's lead_s; its default is 0.2 s): in silence the voice cannot
# say who is on screen, and the random teacher's tokens differ more between the two people than with the mouth
LEAD_S = 0.04
SPLIT_FILE = "split.json"  # in the dataset: the data.split that holds out the chosen videos
INIT_DIR = "init"


def vocabulary() -> list[str]:
    """The words of ``demo_media.SENTENCES`` (lower case, no punctuation, each once, in order)."""
    from preprocess.demo_media import SENTENCES

    words = [w.strip(".,!?").lower() for s in SENTENCES for w in s.split()]
    return list(dict.fromkeys(w for w in words if w))


def scripts(seed: int, person: str, n: int) -> list[dict]:
    """What each of a person's ``n`` videos says: ``talking_video`` kwargs (text, voice, words_per_minute)."""
    import numpy as np

    words = vocabulary()
    rng = np.random.default_rng([seed, sorted(VOICES).index(person)])
    out = []
    for k in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(6, 10)), replace=False))
        out.append(dict(text=text[0].upper() + text[1:] + ".", voice=VOICES[person][k % len(VOICES[person])],
                        words_per_minute=int(rng.integers(WORDS_PER_MINUTE[0], WORDS_PER_MINUTE[1] + 1))))
    return out


def build_videos(root: Path, size: int, per_person: int, seed: int) -> Path:
    """Write ``root/videos/<person>_<k>.mp4`` (kept when present); returns the folder."""
    from preprocess import demo_media

    videos = root / "videos"
    for person in sorted(VOICES):
        for k, kw in enumerate(scripts(seed, person, per_person)):
            path = videos / f"{person}_{k:02d}.mp4"
            if not path.exists():
                demo_media.talking_video(path, person, size=(size, size), lead_s=LEAD_S, **kw)
    return videos


def choose_split(data: Path, percent: float, per_person: int) -> dict:
    """The ``data.split`` (``heldout_percent``, ``salt``) of the dataset: the first salt ``audio-learning-<i>`` under
    which every person has ``round(per_person * percent / 100)`` (at least 1) held-out videos. The split is the
    trainer's own (a hash of the content key of each video), so it is chosen, not written; saved as split.json."""
    import pandas as pd

    from train.data.plan import heldout_fraction

    videos = pd.read_parquet(data / "index.parquet", columns=["video_key", "source"]).drop_duplicates("video_key")
    person = {r.video_key: Path(r.source).stem.rsplit("_", 1)[0] for r in videos.itertuples()}
    want = max(1, round(per_person * percent / 100))
    for i in range(100_000):
        salt = f"audio-learning-{i}"
        held = sorted(k for k in person if heldout_fraction(k, salt) < percent / 100)
        if all(sum(person[k] == p for k in held) == want for p in set(person.values())):
            split = {"heldout_percent": percent, "salt": salt,
                     "heldout_videos": {k: person[k] for k in held},
                     "train_videos": {k: p for k, p in person.items() if k not in held}}
            (data / SPLIT_FILE).write_text(json.dumps(split, indent=1))
            return split
    raise SystemExit(f"no salt holds out {want} videos of every person at {percent}%: change --heldout-percent")


def dataset_mb(data: Path) -> float:
    """Size of the dataset folder (what is carried to a GPU machine), MB."""
    return sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) / 1e6


def build_data(args) -> dict:
    """The dataset and its split (reused when complete); returns split.json's content with the size."""
    data = args.out / "data"
    if not (data / "index.parquet").exists():
        videos = build_videos(args.out, args.size, args.videos_per_person, args.seed)
        preprocess(videos, data, args.size, args.frames, args.clip_frames, [])
    split_path = data / SPLIT_FILE
    split = json.loads(split_path.read_text()) if split_path.exists() else choose_split(
        data, args.heldout_percent, args.videos_per_person)
    split["dataset_mb"] = round(dataset_mb(data), 1)
    return split


def run_dir(args) -> Path:
    """The trainer's ``train.out_dir``: one per preset (a run resumes its own stage 4, never another preset's)."""
    return args.out / f"run_{args.preset}"


def common_overrides(args, split: dict) -> list[str]:
    """The trainer overrides of the calibration and the training: the data, its split and the clip shape.

    The video frames are decoded small (``--area``): the audio stage reads only the face crops and the audio."""
    return [f"model={args.preset}", f"launch={args.launch}", "model.weights.required=false", "stage=audio",
            f"data.source.dataset={args.out / 'data'}", f"data.split.heldout_percent={split['heldout_percent']}",
            f"data.split.salt={split['salt']}", f"data.buckets.area={args.area}", "data.buckets.aspect_ratios=[1.0]",
            "data.buckets.token_budget=1000000", f"data.buckets.max_batch_size={args.batch}",
            f"data.frames.min={args.frames}", f"data.frames.max={args.frames}", "data.frames.step=4",
            f"data.workers.num_workers={args.workers}", "data.refs.min=1", "data.refs.max=1", "data.augment.shift=0",
            f"train.out_dir={run_dir(args)}", f"train.seed={args.seed}", *args.overrides]


def compose_job(overrides: list[str]):
    """The trainer's typed job of ``conf/train.yaml`` with ``overrides``."""
    from hydra import compose, initialize_config_dir

    from train.config import to_job

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_job(compose("train", overrides))


def calibrate_teacher(encoder, crops, batch: int = 64, seed: int = 0) -> None:
    """Measure the BatchNorm statistics of the face motion encoder on ``crops`` (N, 3, S, S), in place: every
    BatchNorm averages the batch statistics of random batches of ``batch`` crops (cumulative, ``momentum=None``)."""
    import torch
    from torch import nn

    norms = [m for m in encoder.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for i in range(0, len(crops) - batch + 1, batch):
            encoder.motion_vectors(crops[order[i:i + batch]])
    for m in norms:
        m.momentum = 0.1
    encoder.train()  # BatchNorm back in eval mode (FaceMotionEncoder.train's frozen-statistics rule)


def token_stats(encoder, clips) -> dict:
    """The teacher's tokens of ``clips`` ([(T, 3, S, S) crops with a face]): mean square, variance over all frames,
    and the variance left inside a clip (what the mouth and the crops' jitter move), each averaged over channels."""
    import torch

    with torch.no_grad():
        tokens = [encoder.frame_tokens(c[None])[0].float() for c in clips]
    t = torch.cat(tokens)
    within = sum(x.var(0).mean().item() * len(x) for x in tokens) / len(t)
    return {"mean_square": t.square().mean().item(), "variance": t.var(0).mean().item(),
            "variance_within_clip": within}


def make_init(args, split: dict) -> tuple[Path, dict]:
    """The random stage-3 model of the preset (seeded) with its face motion encoder calibrated on training clips'
    face crops (``--calibration-clips``), as safetensors under ``<out>/init`` (reused); returns it and the teacher's
    token statistics before and after the calibration."""
    import torch
    from safetensors.torch import save_file

    from models.dreamactor import DreamActor
    from train.audio_step import speech_clip
    from train.data import build_loader

    path = args.out / INIT_DIR / f"stage3_{args.preset}_seed{args.seed}.safetensors"
    stats_path = path.with_suffix(".json")
    if path.exists() and stats_path.exists():
        return path, json.loads(stats_path.read_text())
    job = compose_job(common_overrides(args, split) + ["data.workers.num_workers=0", "data.shuffle.buffer=1"])
    torch.manual_seed(args.seed)
    model = DreamActor(job.model)  # the paper's stage-3 model: no audio encoder
    clips = []
    for b in build_loader(job.data, job.model, rank=0, world_size=1, seed=args.seed):  # the training split
        if int(b.epoch.max()) > 0 or len(clips) >= args.calibration_clips:
            break
        c = speech_clip(b)
        clips += [c.face_crops[i][c.face_valid[i].bool()] for i in range(b.size)]
    device = torch.device("cuda" if torch.cuda.is_available() and args.launch == "gpu" else "cpu")
    encoder = model.face_encoder.to(device)
    clips = [c.to(device) for c in clips[:args.calibration_clips] if len(c)]
    stats = {"before": token_stats(encoder, clips)}
    calibrate_teacher(encoder, torch.cat(clips), seed=args.seed)
    stats["after"] = token_stats(encoder, clips)
    stats["calibration_crops"] = sum(len(c) for c in clips)
    model.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    stats_path.write_text(json.dumps(stats, indent=1))
    return path, stats


def train(args, split: dict, init: Path) -> None:
    """Stage 4 through ``train/run.py`` under torchrun, with the periodic held-out evaluation."""
    over = common_overrides(args, split) + [
        f"stage.init={init}", f"train.optimizer.lr={args.lr}", "train.optimizer.lr_scale.audio_encoder=1",
        f"train.optimizer.warmup_steps={args.warmup}", "train.checkpoint.every=100000", "train.checkpoint.keep=1",
        "train.log.every=5", "train.log.sample_keys=false", "train.log.progress_bar=false", "train.ema.decay=0.99",
        f"train.eval.every={args.eval_every}", f"train.eval.clips={args.eval_clips}"]
    over += ([f"stage.steps={args.steps}"] if args.steps else
             ["stage.steps=1000000", f"train.time_limit_min={args.minutes}"])
    cmd = ["torchrun", "--nproc_per_node", str(args.nproc), "--master_port", str(29500 + os.getpid() % 1000),
           str(ROOT / "train" / "run.py"), *over]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log_path = args.out / "train_audio.log"
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"stage audio failed ({proc.returncode}); last lines of {log_path}:\n"
                         + "".join(open(log_path).readlines()[-40:]))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file ([] when absent)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def curves(args) -> dict[str, list]:
    """The training loss per logged step and the held-out evaluations (metrics.jsonl, eval.jsonl of stage 4)."""
    from models.dreamactor import AUDIO_STAGE

    stage = run_dir(args) / f"stage{AUDIO_STAGE}"
    return {"loss": [[r["step"], r["loss"]] for r in read_jsonl(stage / "metrics.jsonl") if "loss" in r],
            "eval": read_jsonl(stage / "eval.jsonl")}


METHODS = ("model", "silence", "shuffled")
COLORS = {"model": "tab:green", "silence": "tab:gray", "shuffled": "tab:orange"}


def plot(path: Path, curve: dict, title: str) -> None:
    """Training loss per step and the held-out token MSE of the model and the baselines per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([p[0] for p in curve["loss"]], [p[1] for p in curve["loss"]], lw=1, color="tab:green")
    a.set(xlabel="optimizer step", ylabel="token MSE (training batches)", title="training", yscale="log")
    steps = [r["step"] for r in curve["eval"]]
    for m in METHODS:
        b.plot(steps, [r[f"mse_{m}"] for r in curve["eval"]], marker="o", ms=3, label=m, color=COLORS[m])
    b.set(xlabel="optimizer step", ylabel="token MSE", yscale="log", title=title)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, summary: dict, curve: dict) -> int:
    """Write results.json / .md and audio_learning.png; 0 when the goal is met and every update was applied."""
    from models.dreamactor import AUDIO_STAGE

    if not curve["eval"]:
        raise SystemExit(f"no evaluation in {run_dir(args)}: train for at least --eval-every steps")
    last = curve["eval"][-1]
    final = {m: {"mse": last[f"mse_{m}"], "cos": last[f"cos_{m}"]} for m in METHODS}
    ratio = {b: last["mse_model"] / last[f"mse_{b}"] for b in METHODS[1:]}
    best = min(curve["eval"], key=lambda r: r["mse_model"])  # the final weights are scored; an earlier peak is said
    updates = update_counters(run_dir(args), (AUDIO_STAGE,))
    applied = all(u["all_applied"] and not u["nonfinite_steps"] and not u["skipped_steps"] for u in updates.values())
    ok = all(r < args.margin for r in ratio.values()) and applied and bool(updates)
    summary.update(args={k: str(v) for k, v in vars(args).items()}, date=time.strftime("%Y-%m-%d"),
                   steps=curve["loss"][-1][0] if curve["loss"] else 0, eval_step=last["step"], frames=last["frames"],
                   final=final, model_over_baseline=ratio, updates=updates, passed=ok,
                   best={"step": best["step"], **{f"mse_{m}": best[f"mse_{m}"] for m in METHODS}})
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    (args.out / "curve.json").write_text(json.dumps(curve))
    table = ("| method | held-out token MSE | cosine to the teacher |\n|---|---:|---:|\n"
             + "".join(f"| {m} | {v['mse']:.4g} | {v['cos']:.4f} |\n" for m, v in final.items())
             + f"\nmodel / silence: {ratio['silence']:.3f}; model / shuffled: {ratio['shuffled']:.3f} "
               f"(step {last['step']}, {last['frames']} held-out frames; goal < {args.margin} for both: "
               f"{'met' if ok else 'NOT met'}; every update applied: {applied}). Lowest held-out model MSE: "
               f"{best['mse_model']:.4g} at step {best['step']}\n")
    (args.out / "results.md").write_text(table)
    try:
        plot(args.out / "audio_learning.png", curve, f"held-out clips ({last['frames']} frames)")
    except ImportError as e:  # a bare GPU machine: plot later with --report-only where matplotlib is
        print(f"no plot ({e}): run --report-only on a machine with matplotlib", flush=True)
    print(table + json.dumps({k: summary.get(k) for k in ("steps", "updates", "data_s", "train_s")}), flush=True)
    return 0 if ok else 1


def main() -> int:
    """Data, teacher, training, report (the module docstring); the exit status of :func:`report`."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--size", type=int, default=128, help="frame side of the talking videos (square)")
    ap.add_argument("--videos-per-person", type=int, default=20,
                    help="talking videos of every person, each its own sentence (~0.8 MB of dataset each)")
    ap.add_argument("--heldout-percent", type=float, default=20.0,
                    help="share of every person's videos held out (data.split.heldout_percent)")
    ap.add_argument("--clip-frames", type=int, default=33, help="longest clip the preprocessing cuts")
    ap.add_argument("--frames", type=int, default=17, help="frames per training / evaluation sample (1 + 4k)")
    ap.add_argument("--area", type=int, default=64 * 64, help="pixels of the decoded video frames (unused here)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the stage")
    ap.add_argument("--steps", type=int, default=None, help="steps of the stage (instead of --minutes)")
    ap.add_argument("--lr", type=float, default=5e-4, help="the audio encoder's learning rate (lr_scale set to 1)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    ap.add_argument("--eval-clips", type=int, default=64, help="held-out clips scored (at most all of them)")
    ap.add_argument("--calibration-clips", type=int, default=32, help="training clips whose face crops calibrate "
                    "the random teacher's BatchNorm statistics")
    ap.add_argument("--margin", type=float, default=0.5,
                    help="the model's held-out token MSE must be below this fraction of both baselines'")
    ap.add_argument("--data-only", action="store_true", help="build the dataset and its split, then stop")
    ap.add_argument("--report-only", action="store_true",
                    help="write the results and the plot of an earlier run under --out again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more conf/train.yaml overrides")
    args = ap.parse_args()
    if args.minutes is None and args.steps is None and not (args.data_only or args.report_only):
        ap.error("give --minutes M or --steps N")
    args.out = args.out.resolve()  # the trainer runs in the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:  # e.g. here, of a run made on a GPU machine without matplotlib (its data need not be here)
        done = json.loads((args.out / "results.json").read_text())
        keep = ("dataset_mb", "videos", "teacher", "data_s", "init_s", "train_s")
        return report(args, {k: done[k] for k in keep if k in done}, curves(args))
    t0 = time.time()
    split = build_data(args)
    t_data = time.time() - t0
    print(f"dataset ready in {t_data:.0f} s: {args.out / 'data'}, {split['dataset_mb']} MB, "
          f"{len(split['train_videos'])} training and {len(split['heldout_videos'])} held-out videos "
          f"(data.split.salt={split['salt']})", flush=True)
    if args.data_only:
        return 0
    summary = {"dataset_mb": split["dataset_mb"], "videos": {"train": len(split["train_videos"]),
                                                            "heldout": len(split["heldout_videos"])}}
    init, summary["teacher"] = make_init(args, split)
    t1 = time.time()
    train(args, split, init)
    summary.update(data_s=round(t_data, 1), init_s=round(t1 - t_data - t0, 1), train_s=round(time.time() - t1, 1))
    return report(args, summary, curves(args))


if __name__ == "__main__":
    raise SystemExit(main())
