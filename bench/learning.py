"""The learning test: does data + trainer produce a model that follows the driving motion on held-out clips?

1. **Data**, made by the project's own preprocessing (``preprocess/run.py``, embedded annotators) from media
   that ships in packages: three people (skimage's astronaut and camera, matplotlib's grace_hopper), each in
   several videos with different known motions (shift, scale, rotation, mirror), plus opencv-doc's
   Megamind.avi in the training set when it is installed. Split by source video: for every person one motion
   is held out, so the held-out clips show known people doing new motions. Two datasets: ``train`` and
   ``heldout``.
2. **Training**, with the real trainer (``train/run.py``: DeepSpeed ZeRO-2, the launch group's defaults)
   from scratch: stage 1 (pose), then stage 3 (everything) from stage 1's export, each for a wall-clock
   budget (``train.time_limit_min``) or a step count.
3. **Evaluation** (``train/evaluate.py``): on every held-out clip, the sampled clean latents vs the
   ground-truth latents, against copy-the-reference and the motion-dropped branch of the same model, in
   latent PSNR. There is no pretrained VAE here: ``--vae patch`` (default) is the fixed linear autoencoder of the Wan
   layout (``models.vae.PatchAutoencoder``); ``--vae wan``, a random init of Wan's VAE, hardly encodes any frame but
   the first, so motion is nearly invisible in its latents (``models/vae.py``).

Writes ``results.json``, ``results.md`` and ``learning.png`` (training curves + held-out PSNR) under ``--out``.
Exit status 1 when the model does not beat both baselines by ``--margin`` dB.

    python bench/learning.py --out /tmp/learn --launch gpu --preset small --minutes 4 4      # one GPU, ~10 min
    python bench/learning.py --out /tmp/learn --launch local --preset tiny --steps 150 150   # CPU, minutes
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

def random_motions(seed: int, n: int, size: int) -> list[dict]:
    """``n`` random motions (``preprocess.demo_media.Motion`` kwargs, pixels) of a photo in a ``size`` frame.

    Each video shows the person smaller than the frame (scale 0.6-0.95 of the fitted photo) so that it can travel:
    a start offset, then a straight move of 0.3-0.6 frame sides over the video in a random direction, a scale change
    of up to 1.3x either way, a turn of up to 15 degrees, and a mirror half of the time. A 17-frame window of a
    34-frame video then moves the person by ~2-5 latent pixels: the reference held still cannot match it, and
    only the skeleton says where the person goes. Random rather than a fixed list so that the model cannot
    memorise each video: held-out clips (another seed) are new motions of known people."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s0 = rng.uniform(0.6, 0.95)
        angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.6) * size
        shift = (dist * np.cos(angle), dist * np.sin(angle))
        start = tuple(-0.5 * d + rng.uniform(-0.08, 0.08) * size for d in shift)  # the move is centred
        r0 = rng.uniform(-10, 10)
        out.append(dict(start=start, shift=shift, scale=(s0, s0 * rng.uniform(0.77, 1.3)),
                        rotate=(r0, r0 + rng.uniform(-15, 15)), flip=bool(rng.random() < 0.5)))
    return out


PEOPLE = ("astronaut", "grace_hopper", "camera")
# The VAE: no pretrained weights here. ``--vae patch`` (default): the fixed linear autoencoder of the Wan layout
# (models.vae.PatchAutoencoder), whose every latent frame summarises its own frames. ``--vae wan``: a randomly
# initialised AutoencoderKLWan (the tiny preset's shape), whose latents hardly depend on any frame but the first
# (models/vae.py), so that the motion after it is nearly invisible: held-out runs 1-8 (docs/performance.md) used it.
# Either way the latent normalisation (latents_mean / latents_std, which a pretrained VAE ships) is measured on the
# training clips by calibrate_vae.
VAE_ARCH = "base_dim:8,z_dim:16,dim_mult:[1,2,2,2],num_res_blocks:1,temperal_downsample:[false,true,true]"


def vae_overrides(preset: str, stats: dict | None, kind: str = "patch") -> list[str]:
    """Hydra overrides of ``model.vae``: the VAE of ``--vae``, with the latent normalisation (0 / 1 = raw latents until
    measured)."""
    from models.config import load_preset

    fmt = lambda v: "[" + ",".join(f"{x:.6g}" for x in v) + "]"  # noqa: E731
    mean, std = (stats["mean"], stats["std"]) if stats else ([0.0] * 16, [1.0] * 16)
    out = [f"model.vae.kind={kind}"]
    if load_preset(preset).vae.arch is None:
        arch = f"{VAE_ARCH}," if kind == "wan" else ""
        return out + [f"model.vae.arch={{{arch}latents_mean:{fmt(mean)},latents_std:{fmt(std)}}}"]
    return out + [f"+model.vae.arch.latents_mean={fmt(mean)}", f"+model.vae.arch.latents_std={fmt(std)}"]


def calibrate_vae(args) -> dict:
    """Per-channel mean / std of the raw latents of training clips (saved as ``vae_stats_<kind>.json``)."""
    import torch
    from hydra import compose, initialize_config_dir

    from train.config import to_job
    from train.data import build_loader
    from train.step import build_vae

    path = args.out / f"vae_stats_{args.vae}.json"
    if path.exists():
        return json.loads(path.read_text())
    args.vae_stats = None
    over = common_overrides(args, args.out / "data" / "train") + ["stage=pose", "data.workers.num_workers=0"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        job = to_job(compose("train", over))
    vae = build_vae(job, torch.device("cpu"))  # the trainer's seeded VAE, normalisation 0 / 1: raw latents
    zs = []
    for i, b in enumerate(build_loader(job.data, job.model, rank=0, world_size=1, seed=args.seed)):
        if i >= 6:
            break
        zs.append(vae.encode(b.video_pixels()).transpose(0, 1).flatten(1))
    z = torch.cat(zs, 1)
    stats = {"mean": z.mean(1).tolist(), "std": z.std(1).clamp_min(1e-4).tolist()}
    path.write_text(json.dumps(stats))
    return stats


def build_videos(root: Path, size: int, n_frames: int, per_person: tuple[int, int],
                 seed: int) -> tuple[Path, Path]:
    """Write the corpus: ``root/videos/{train,heldout}/<person>_<k>.mp4``, ``per_person`` = (train, held-out)
    random motions of every person; the held-out motions come from another seed than the training ones."""
    from preprocess import demo_media

    dirs = {s: root / "videos" / s for s in ("train", "heldout")}
    for p, person in enumerate(PEOPLE):
        photo = demo_media.load_photo(person)
        for split, n, stream in (("train", per_person[0], 0), ("heldout", per_person[1], 1)):
            for k, kw in enumerate(random_motions(seed * 1000 + 10 * p + stream, n, size)):
                path = dirs[split] / f"{person}_{k:02d}.mp4"
                if not path.exists():
                    frames, _ = demo_media.render_motion(photo, (size, size), n_frames, demo_media.Motion(**kw))
                    demo_media.write_video(path, frames, 25.0)
    return dirs["train"], dirs["heldout"]


def preprocess(videos: Path, out: Path, size: int, min_frames: int, clip_frames: int, extra: list[str]) -> None:
    """``preprocess/run.py`` on one split (skipped when its output is complete: the engine resumes)."""
    cmd = [sys.executable, str(ROOT / "preprocess" / "run.py"), f"input={videos}", f"output={out}",
           "annotators=embedded", f"plan.min_frames={min_frames}", f"plan.max_frames={clip_frames}",
           f"decode.max_side={size}", "ray.progress_bars=false", "progress_interval_s=30", *extra]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 3):  # 3: some inputs failed (recorded); the rest is usable
        raise SystemExit(f"preprocessing {videos} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")


def video_tokens(size: int, frames: int) -> int:
    """Video tokens of one square clip: the VAE's 4x time / 8x space compression, then the DiT's 1x2x2 patches."""
    return (1 + (frames - 1) // 4) * (size // 16) ** 2


def common_overrides(args, dataset: Path) -> list[str]:
    """The trainer overrides shared by both stages and the evaluation.

    The noise shift is pinned to the Wan value (``flow.shift`` = 3) at the test's clip size. The resolution rule
    (``shift * sqrt(tokens / shift_ref_tokens)``) would give 0.3 for 320 tokens: training sigmas pushed to the clean
    end (median 0.23), where the noisy latent already shows where the person is and the skeleton has nothing to add.
    Measured with the CPU-sized command (side by side, same data, dev box, 2026-12-01): held-out PSNR at guidance 1,
    13.32 -> 17.27 dB; one-step denoising loss with motion vs motion dropped -2% -> -14%."""
    return [f"model={args.preset}", f"model.flow.shift_ref_tokens={video_tokens(args.size, args.frames)}",
            f"launch={args.launch}", "model.weights.required=false",
            *vae_overrides(args.preset, args.vae_stats, args.vae), "model.vae.dtype=float32",
            f"data.source.dataset={dataset}",
            f"data.buckets.area={args.size * args.size}", "data.buckets.aspect_ratios=[1.0]",
            f"data.buckets.token_budget={args.token_budget}", f"data.buckets.max_batch_size={args.batch}",
            f"data.frames.min={args.frames}", f"data.frames.max={args.frames}", "data.frames.step=4",
            f"data.workers.num_workers={args.workers}", f"data.refs.min={args.refs[0]}",
            f"data.refs.max={args.refs[-1]}",
            f"train.out_dir={args.out / 'run'}", f"train.seed={args.seed}", *args.overrides]


def train_stage(args, stage: str, budget, init: Path | None) -> Path:
    """One stage through ``train/run.py`` under torchrun; returns its export directory."""
    over = common_overrides(args, args.out / "data" / "train") + [
        f"stage={stage}", f"train.optimizer.lr={args.lr}", "train.optimizer.warmup_steps=50",
        "train.checkpoint.every=100000", "train.checkpoint.keep=1", "train.sample.every=0", "train.log.every=10",
        "train.log.sample_keys=false", "train.log.progress_bar=false", "train.ema.decay=0.99",
        f"data.augment.shift={args.shift}", f"train.optimizer.cooldown={args.cooldown}",
        f"data.shuffle.window_shards={args.window_shards}"]
    kind, value = budget
    over += [f"stage.steps={value}"] if kind == "steps" else ["stage.steps=1000000", f"train.time_limit_min={value}"]
    if init is not None:
        over.append(f"stage.init={init}")
    cmd = ["torchrun", "--nproc_per_node", str(args.nproc), "--master_port", str(29500 + os.getpid() % 1000),
           str(ROOT / "train" / "run.py"), *over]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    log_path = args.out / f"train_{stage}.log"
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}); last lines of {log_path}:\n"
                         + "".join(open(log_path).readlines()[-40:]))
    stage_id = {"pose": 1, "face": 2, "full": 3}[stage]
    return args.out / "run" / f"stage{stage_id}" / "export"


def evaluate(args, export: Path, split: str | None = None) -> dict:
    """Latent PSNR of the stage-3 weights and of the baselines (train/evaluate.py) on ``split`` (default
    ``--eval-split``), in batches of ``--eval-batch`` clips (the training batch would not fit: stage 3's face
    encoder on every frame's crop of 64 clips ran an H200 out of memory)."""
    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from models.dreamactor import DreamActor
    from train.config import to_job
    from train.data import build_loader
    from train.evaluate import evaluate_latents
    from train.step import build_vae

    over = common_overrides(args, args.out / "data" / (split or args.eval_split)) + [
        f"data.buckets.max_batch_size={min(args.batch, args.eval_batch)}", "stage=full",
        f"stage.init={export / args.weights}", "data.dropout.ref=0", "data.dropout.motion=0",
        "data.augment.shift=0",
        "data.workers.num_workers=0", "data.shuffle.buffer=1", "data.refs.primary_outside_window=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        job = to_job(compose("train", over))
    device = torch.device("cuda" if job.launch.device == "cuda" and torch.cuda.is_available() else "cpu")
    model = DreamActor.from_config(job.model, load_weights=False)
    model.load_state_dict(load_file(str(export / args.weights)))
    model.to(device)
    vae = build_vae(job, device)  # the trainer's own (seeded) VAE
    loader = build_loader(job.data, job.model, rank=0, world_size=1, seed=args.seed)
    batches = []
    for b in loader:
        if int(b.epoch.max()) > 0 or sum(x.size for x in batches) >= args.eval_clips:
            break
        batches.append(b)
    scores = evaluate_latents(model, vae, batches, steps=args.eval_steps, seed=args.seed, dtype=torch.float32,
                              guidance_ref=args.guidance or None, guidance_motion=args.guidance or None)
    return scores.summary()


def curves(args) -> dict[str, list]:
    """(global step, loss) of both stages from their metrics.jsonl."""
    out, offset = {}, 0
    for sid in (1, 3):
        path = args.out / "run" / f"stage{sid}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        out[f"stage{sid}"] = [[offset + r["step"], r["loss"]] for r in rows if "loss" in r]
        if rows:
            offset += rows[-1]["step"]
    return out


def plot(path: Path, summary: dict, curve: dict) -> None:
    """Training loss per step (both stages) and the held-out PSNR of the model and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curve.items():
        if pts:
            a.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=1)
    a.set(xlabel="optimizer step", ylabel="flow-matching loss", title="training", yscale="log")
    a.legend()
    means = summary["mean_psnr_db"]
    labels = list(means)
    b.bar(labels, [means[k] for k in labels], color=["tab:green", "tab:gray", "tab:orange"])
    for i, k in enumerate(labels):
        b.text(i, means[k], f"{means[k]:.2f}", ha="center", va="bottom")
    b.set(ylabel="latent PSNR (dB)", title=f"held-out clips ({summary['clips']})")
    lo = min(means.values())
    b.set_ylim(lo - 3, max(means.values()) + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of a learning run shared with bench/audio_learning.py: where, on what, how many processes."""
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--launch", default="gpu", help="gpu | local (CPU, gloo)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--vae", default="patch", choices=("patch", "wan"),
                    help="patch: the fixed linear autoencoder (default); wan: a random AutoencoderKLWan (runs 1-8)")
    ap.add_argument("--nproc", type=int, default=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--size", type=int, default=128, help="frame side (square clips)")
    ap.add_argument("--video-frames", type=int, default=33)
    ap.add_argument("--motions", type=int, nargs=2, default=[24, 4], metavar=("TRAIN", "HELDOUT"),
                    help="random motions (videos) of every person in the training and the held-out split")
    ap.add_argument("--clip-frames", type=int, default=None,
                    help="longest clip the preprocessing cuts (default: --video-frames, one clip per video); every "
                         "clip must be longer than --frames, so that the primary reference is from outside the window")
    ap.add_argument("--frames", type=int, default=17, help="frames per training / evaluation sample (1 + 4k)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--refs", type=int, nargs="+", default=[3],
                    help="references per batch: N, or MIN MAX (drawn per batch). One number gives every batch one "
                    "shape, so compiled blocks compile once (missing references are masked by ref_valid)")
    ap.add_argument("--token-budget", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--minutes", type=float, nargs=2, default=None, help="wall-clock budget of stage 1 and stage 3")
    ap.add_argument("--steps", type=int, nargs=2, default=None, help="steps of stage 1 and stage 3")
    ap.add_argument("--lr", type=float, default=2e-4,
                    help="from scratch (the paper's 5e-6 fine-tunes a pretrained DiT)")
    ap.add_argument("--shift", type=float, default=0.25,
                    help="training only (data.augment.shift): the driving frames and their skeleton moved against "
                    "the references by up to this fraction of the side. Without it a model large enough to "
                    "memorise its training videos places the person from the references (each video's refs name "
                    "its trajectory) and never reads the skeleton: H200, small preset, 2026-12-02, one-step "
                    "denoising gain of motion over motion dropped 0.2%% on held-out clips after 520 steps")
    ap.add_argument("--cooldown", type=float, default=0.25,
                    help="train.optimizer.cooldown of both stages: the last fraction of each stage's budget (its "
                         "minutes or steps) with the learning rate falling linearly to 0. H200, small, 2026-12-02: "
                         "0.25 took the stage-1 model from +2.02 to +2.68-2.75 dB over motion dropped (with 7.2 "
                         "instead of 5.3 minutes)")
    ap.add_argument("--window-shards", type=int, default=64,
                    help="data.shuffle.window_shards of training: the loader batches each window of shards apart, "
                         "so on a corpus of a few shards small windows leave a partial batch each (GPU run 10: "
                         "batches of 3-32 clips, ~20 on average); one window per epoch gives batches of 32 and one "
                         "remainder (79 clips: 32, 32, 15), so compiled blocks compile two shapes")
    ap.add_argument("--weights", default="model.safetensors", help="model.safetensors | ema.safetensors")
    ap.add_argument("--eval-clips", type=int, default=24)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--eval-batch", type=int, default=8, help="clips per evaluation batch")
    ap.add_argument("--also-stage1", action="store_true",
                    help="score stage 1's export too (does the short stage 3 help?), in results.json")
    ap.add_argument("--reuse-stage1", action="store_true",
                    help="skip stage 1 and start stage 3 from the stage-1 export an earlier call left under --out "
                         "(one budget split over two calls: --minutes S1 0, then --reuse-stage1 --minutes 0 S3)")
    ap.add_argument("--also-train-split", action="store_true",
                    help="score the training clips too (the memorisation gap: train vs held-out), in results.json")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="classifier-free guidance of the sampler, reference and motion. Default 1 (no guidance): "
                    "the conditional model itself; guidance trades fidelity, which PSNR measures, for sharpness "
                    "(CPU-sized run, 2026-12-01: model - motion dropped +0.53 dB at 1, -0.65 dB at the paper's 2.5). "
                    "0 = the preset's (2.5)")
    ap.add_argument("--eval-only", action="store_true",
                    help="score the stage-3 export of an earlier run under --out again (e.g. --weights "
                    "ema.safetensors or another --guidance); writes results-<weights>-g<guidance>.{json,md}")
    ap.add_argument("--eval-split", default="heldout", choices=("heldout", "train"),
                    help="clips to score: held-out (the test) or training ones (is the motion path used at all, "
                    "or only not generalising?)")
    ap.add_argument("--margin", type=float, default=3.0, help="dB the model must beat both baselines by")
    ap.add_argument("--no-megamind", action="store_true")
    ap.add_argument("--data-only", action="store_true", help="build the datasets and stop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="more conf/train.yaml overrides for both stages")
    args = ap.parse_args()
    if args.minutes is None and args.steps is None and not (args.data_only or args.eval_only):
        ap.error("give --minutes S1 S3 or --steps S1 S3")
    args.clip_frames = args.clip_frames or args.video_frames
    shortest = args.video_frames // math.ceil(args.video_frames / args.clip_frames)  # preprocess/plan.py's split
    if shortest <= args.frames:
        ap.error(f"--video-frames {args.video_frames} cut at --clip-frames {args.clip_frames} gives clips of "
                 f"{shortest} frames: a {args.frames}-frame window covers a whole clip, so the primary reference "
                 f"would be one of the frames to generate. Use more --video-frames or --clip-frames, or fewer --frames")
    args.out.mkdir(parents=True, exist_ok=True)
    args.vae_stats = None
    t0 = time.time()

    ready = all((args.out / "data" / s / "index.parquet").exists() for s in ("train", "heldout"))
    videos = [] if ready else build_videos(args.out, args.size, args.video_frames, args.motions, args.seed)
    if ready:  # made earlier (maybe elsewhere, with other arguments): its clips must still leave room for the reference
        import pyarrow.parquet as pq

        for s in ("train", "heldout"):
            index = pq.read_table(args.out / "data" / s / "index.parquet", columns=["n_frames"])
            n = min(index["n_frames"].to_pylist())
            if n <= args.frames:
                raise SystemExit(f"{args.out / 'data' / s} has clips of {n} frames: a {args.frames}-frame window "
                                 "covers a whole clip (the primary reference would be a frame to generate); rebuild it")
    splits = zip(("train", "heldout"), videos)
    for split, videos in splits:  # (a finished dataset is reused: e.g. made on a CPU box, trained on a GPU one)
        if split == "train" and not args.no_megamind:
            from preprocess.demo_media import MEGAMIND

            if MEGAMIND.exists() and not (videos / MEGAMIND.name).exists():
                (videos / MEGAMIND.name).symlink_to(MEGAMIND)
        preprocess(videos, args.out / "data" / split, args.size, args.frames, args.clip_frames, [])
    t_data = time.time() - t0
    print(f"datasets ready in {t_data:.0f} s: {args.out / 'data'}", flush=True)
    if args.data_only:
        return 0

    args.vae_stats = calibrate_vae(args)
    if args.eval_only:
        last = 3 if (args.out / "run" / "stage3" / "export").exists() else 1
        return report(args, evaluate(args, args.out / "run" / f"stage{last}" / "export"), curves(args),
                      f"-{Path(args.weights).stem}-g{args.guidance or 'preset'}-{args.eval_split}")
    budgets = [("minutes", m) for m in args.minutes] if args.minutes else [("steps", s) for s in args.steps]
    t1 = time.time()
    export1 = args.out / "run" / "stage1" / "export"
    if args.reuse_stage1:  # trained by an earlier call (a machine whose calls are shorter than the whole budget)
        if not (export1 / "model.safetensors").exists():
            raise SystemExit(f"--reuse-stage1: no stage-1 export at {export1}; run stage 1 first (--minutes S1 0)")
        print(f"stage 1: reusing {export1}", flush=True)
    else:
        export1 = train_stage(args, "pose", budgets[0], None)
    # a zero stage-3 budget skips it (hyper-parameter sweeps of stage 1; the test itself runs both)
    export3 = train_stage(args, "full", budgets[1], export1 / "model.safetensors") if budgets[1][1] else export1
    t_train = time.time() - t1
    summary = evaluate(args, export3)
    summary.update(data_s=round(t_data, 1), train_s=round(t_train, 1))
    if args.also_stage1 and export3 != export1:
        s1 = evaluate(args, export1)
        summary["stage1_export"] = {k: s1[k] for k in ("clips", "mean_psnr_db", "denoise_mse")}
        print("stage 1's export:", json.dumps(summary["stage1_export"]), flush=True)
    if args.also_train_split:
        train = evaluate(args, export3, "train")
        summary["train_split"] = {k: train[k] for k in ("clips", "mean_psnr_db", "denoise_mse")}
        print("training clips:", json.dumps(summary["train_split"]), flush=True)
    return report(args, summary, curves(args))


def report(args, summary: dict, curve: dict, suffix: str = "") -> int:
    """Write results{suffix}.json / .md (and learning.png for a full run); 0 when the goal is met."""
    summary.update(args={k: str(v) for k, v in vars(args).items()}, date=time.strftime("%Y-%m-%d"),
                   steps={k: (v[-1][0] if v else 0) for k, v in curve.items()},
                   updates=update_counters(args.out / "run"))
    ok = all(m >= args.margin for m in summary["model_minus_baseline_db"].values())
    summary["passed"] = ok
    (args.out / f"results{suffix}.json").write_text(json.dumps(summary, indent=1))
    m = summary["mean_psnr_db"]
    dm = summary["denoise_mse"]
    table = ("| method | held-out latent PSNR (dB) | one-step denoising loss |\n|---|---:|---:|\n"
             + "".join(f"| {k} | {v:.2f} | {dm[k]:.4f} |\n" for k, v in m.items())
             + f"\nmodel - copy_reference: {summary['model_minus_baseline_db']['copy_reference']:+.2f} dB; "
               f"model - motion_dropped: {summary['model_minus_baseline_db']['motion_dropped']:+.2f} dB "
               f"({summary['clips']} clips; goal >= {args.margin} dB over both: {'met' if ok else 'NOT met'})\n")
    (args.out / f"results{suffix}.md").write_text(table)
    if not suffix:
        (args.out / "curve.json").write_text(json.dumps(curve))
        plot(args.out / "learning.png", summary, curve)
    print(table + json.dumps({k: summary.get(k) for k in ("steps", "updates", "data_s", "train_s")}), flush=True)
    return 0 if ok else 1


def update_counters(run: Path, stages=(1, 3)) -> dict:
    """The update guard's counters at the last logged step of each stage of the run under ``run`` (every update
    applied: zeros)."""
    out = {}
    for sid in stages:
        path = run / f"stage{sid}" / "metrics.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            last = rows[-1] if rows else {}
            out[f"stage{sid}"] = {k: last.get(k) for k in ("nonfinite_steps", "skipped_steps")}
            out[f"stage{sid}"]["all_applied"] = all(r.get("update_applied", 1) for r in rows)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
