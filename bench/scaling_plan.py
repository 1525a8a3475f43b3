"""The scale-out plan on paper (docs/scaling.md): memory per GPU, step time, communication per step and GPU-days
for the paper's schedule, for ``wan1_3b`` and ``wan14b`` at the paper's shapes, from the project's own model
definitions and the figures measured on one H200 (docs/performance.md). Prints markdown tables.

    python bench/scaling_plan.py                  # the tables of docs/scaling.md
    python bench/scaling_plan.py --mfu 0.44 0.46 --inter-node-gbs 50 --json plan.json

Everything here is arithmetic on inputs that are either computed from the model (parameters, FLOPs per step,
activation bytes per block: ``models.flops``, ``models.dit.block_activation_bytes`` / ``checkpoint_plan``, the latter
calibrated on the H200) or measured and given as options (their defaults cite where they come from). Where an
input is an assumption (bandwidths, the 14B model's MFU, overlap of communication) the option says so; the tables
carry the same caveats.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
PAPER_STEPS = (20_000, 20_000, 30_000)  # paper 4.1: stages 1, 2, 3
PAPER_GPUS = 8  # "All stages are trained with 8 H20 GPUs": one clip per GPU per step
PAPER_FRAMES = tuple(range(25, 122, 4))  # "randomly selected from 25 to 121 frames" (1 + 4k for the causal VAE)
PAPER_SIZE = (640, 960)  # "an area of 960 x 640, maintaining the original aspect ratio"; 3:2 landscape here
# bytes per parameter: bf16 weights, bf16 gradients, fp32 master + Adam m + v, fp32 EMA (train/ema.py, sharded)
WEIGHT, GRAD, OPTIM, EMA = 2, 2, 12, 4


def model_facts(preset: str) -> dict:
    """Parameters and shapes of a preset, built on the meta device (no memory)."""
    import torch

    from models.config import load_preset
    from models.dreamactor import DreamActor

    cfg = load_preset(preset)
    with torch.device("meta"):
        model = DreamActor.from_config(cfg, load_weights=False)
    return {"cfg": cfg, "params": sum(p.numel() for p in model.parameters())}


def tokens_of(cfg, frames: int, size: tuple[int, int]) -> int:
    """Video tokens of one clip (the VAE's compression, then the DiT's patches)."""
    pt, ph, pw = cfg.dit.patch_size
    t = 1 + (frames - 1) // cfg.vae.temporal_compression
    sc = cfg.vae.spatial_compression
    return t // pt * (size[0] // sc // ph) * (size[1] // sc // pw)


def static_bytes(params: int, zero: int, ranks: int) -> dict:
    """Per-GPU bytes of weights, gradients, optimizer state and EMA under ZeRO-``zero`` over ``ranks``."""
    return {"weights": params * WEIGHT / (ranks if zero == 3 else 1),
            "grads": params * GRAD / (ranks if zero >= 2 else 1),
            "optimizer": params * OPTIM / ranks, "ema": params * EMA / ranks}


def comm_bytes(params: int, zero: int, ranks: int) -> float:
    """Bytes each GPU sends per step for the ZeRO collectives (ring algorithms: (n-1)/n of the buffer per op).
    ZeRO-2: reduce-scatter of the bf16 gradients + all-gather of the updated bf16 weights; ZeRO-3: the weights are
    all-gathered in forward and again in backward, gradients reduce-scattered."""
    ops = 2 if zero < 3 else 3
    return ops * params * 2 * (ranks - 1) / ranks


def sp_bytes(cfg, video_tokens: int, ref_tokens: int, sp: int, recompute: float) -> float:
    """Bytes each GPU sends per step for the Ulysses exchanges (models/sequence_parallel.py): per block, forward
    + backward, ``2 s D (N-1)/N (4 Nv/N + Nr)`` (q, k, v and the attention output of the sharded video tokens, the
    replicated references' head outputs gathered, and their adjoints); a checkpointed block repeats its forward
    exchanges (``recompute`` = the checkpointed fraction: 3/2 of that)."""
    if sp == 1:
        return 0.0
    per_block = 2 * 2 * cfg.dit.dim * (sp - 1) / sp * (4 * video_tokens / sp + ref_tokens)
    return per_block * cfg.dit.num_layers * (1 + recompute / 2)


def plan_rows(args) -> dict:
    from models.dit import activation_bytes, checkpoint_plan
    from models.flops import flops_per_step

    out = {"memory": [], "time": [], "days": []}
    for preset in args.presets:
        facts = model_facts(preset)
        cfg, params = facts["cfg"], facts["params"]
        mean_flops = sum(flops_per_step(cfg, 1, f, *PAPER_SIZE, 3) for f in PAPER_FRAMES) / len(PAPER_FRAMES)
        video, refs = tokens_of(cfg, PAPER_FRAMES[-1], PAPER_SIZE), 3 * tokens_of(cfg, 1, PAPER_SIZE)
        for zero in (2, 3):
            for ranks in args.gpus:
                st = static_bytes(params, zero, ranks)
                budget = args.gpu_gib * GIB * args.usable - sum(st.values())
                for sp in args.sp:
                    if ranks % sp or cfg.dit.num_heads % sp:
                        continue
                    tok = video // sp + refs  # the references are replicated on every rank of a group
                    pixels = PAPER_SIZE[0] * PAPER_SIZE[1] * PAPER_FRAMES[-1]  # the pose encoder: whole clip
                    plan = checkpoint_plan(cfg.dit, 1, tok, pixels, max(budget, 0), compiled=True)
                    need = activation_bytes(cfg.dit, 1, tok, pixels, True, plan)
                    k = plan.blocks
                    fits = budget > 0 and need <= budget
                    mfu = args.mfu[1] if k else args.mfu[0]
                    dp = ranks // sp
                    compute = mean_flops / sp / (mfu * args.peak_tflops * 1e12)
                    bw = args.intra_node_gbs if ranks <= args.gpus_per_node else args.inter_node_gbs
                    zero_s = comm_bytes(params, zero, ranks) / (bw * 1e9)
                    sp_s = sp_bytes(cfg, video, refs, sp, k / cfg.dit.num_layers) / (args.intra_node_gbs * 1e9)
                    step = compute + zero_s * (1 - args.overlap) + sp_s
                    out["memory"].append({
                        "preset": preset, "params_b": params / 1e9, "zero": zero, "gpus": ranks, "sp": sp,
                        **{f"{n}_gib": v / GIB for n, v in st.items()}, "tokens_per_gpu": tok,
                        "checkpointed": f"{k} of {cfg.dit.num_layers} ({plan.full} full)",
                        "activations_gib": need / GIB, "fits": fits})
                    if not fits:
                        continue
                    samples = sum(PAPER_STEPS) * PAPER_GPUS
                    steps = samples / dp
                    out["time"].append({
                        "preset": preset, "zero": zero, "gpus": ranks, "sp": sp, "compute_s": compute,
                        "zero_comm_gb": comm_bytes(params, zero, ranks) / 1e9, "zero_comm_s": zero_s,
                        "sp_comm_gb": sp_bytes(cfg, video, refs, sp, k / cfg.dit.num_layers) / 1e9,
                        "sp_comm_s": sp_s,
                        "step_s": step, "clips_per_s": dp / step})
                    out["days"].append({
                        "preset": preset, "zero": zero, "gpus": ranks, "sp": sp, "steps": steps,
                        "wall_days": steps * step / 86400, "gpu_days": steps * step * ranks / 86400})
    hours = args.corpus_hours
    frames = hours * 3600 * args.fps
    out["preprocess"] = {
        "corpus_hours": hours, "frames": frames,
        "embedded_cpu_core_hours": frames * args.cpu_ms_per_frame / 1000 / 3600,
        "smplx_fit_gpu_hours": frames * args.smplx_fit_ms_per_frame / 1000 / 3600,
        "head_fit_gpu_hours": frames * args.head_fit_ms_per_frame / 1000 / 3600,
        "networks_gpu_hours": frames * args.networks_ms_per_frame / 1000 / 3600,
        "embedded_gpu_node_hours": hours / args.embedded_video_hours_per_gpu_hour,
        "latent_cache_gpu_hours": hours * args.clip_coverage / args.encode_video_hours_per_gpu_hour}
    return out


def best(days: list[dict]) -> list[dict]:
    """Per (preset, GPUs): the fitting configuration with the fewest GPU-days (ZeRO-2 before 3 on a tie)."""
    out: dict[tuple, dict] = {}
    for r in days:
        key = (r["preset"], r["gpus"])
        if key not in out or r["gpu_days"] < out[key]["gpu_days"] * 0.999:
            out[key] = r
    return list(out.values())


def markdown(plan: dict, args) -> str:
    lines = ["### Memory per GPU (the longest clip: 121 frames at 640 x 960 + 3 references, compiled blocks)", "",
             "| preset | ZeRO | GPUs | SP | weights | grads | optimizer | EMA | tokens / GPU | checkpointed "
             "| activations | fits |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in plan["memory"]:
        lines.append(f"| {r['preset']} ({r['params_b']:.1f} B) | {r['zero']} | {r['gpus']} | {r['sp']} "
                     f"| {r['weights_gib']:.1f} | {r['grads_gib']:.1f} | {r['optimizer_gib']:.1f} | {r['ema_gib']:.1f} "
                     f"| {r['tokens_per_gpu']:,} | {r['checkpointed']} | {r['activations_gib']:.1f} "
                     f"| {'yes' if r['fits'] else '**no**'} |")
    lines += ["", "### Step time (mean over the paper's clip lengths, one clip per data-parallel rank)", "",
              "| preset | ZeRO | GPUs | SP | compute s | ZeRO comm GB / s | SP comm GB / s | step s | clips/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in plan["time"]:
        lines.append(f"| {r['preset']} | {r['zero']} | {r['gpus']} | {r['sp']} | {r['compute_s']:.2f} "
                     f"| {r['zero_comm_gb']:.1f} / {r['zero_comm_s']:.2f} "
                     f"| {r['sp_comm_gb']:.1f} / {r['sp_comm_s']:.2f} "
                     f"| {r['step_s']:.2f} | {r['clips_per_s']:.2f} |")
    lines += ["", f"### The paper's schedule ({' + '.join(f'{s:,}' for s in PAPER_STEPS)} steps at "
              f"{PAPER_GPUS} clips per step = {sum(PAPER_STEPS) * PAPER_GPUS:,} clips), the cheapest configuration "
              "that fits per preset and GPU count", "",
              "| preset | GPUs | ZeRO | SP | steps (one clip per data-parallel group) | step s | wall days "
              "| GPU-days |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    step_of = {(r["preset"], r["zero"], r["gpus"], r["sp"]): r["step_s"] for r in plan["time"]}
    for r in best(plan["days"]):
        lines.append(f"| {r['preset']} | {r['gpus']} | {r['zero']} | {r['sp']} | {r['steps']:,.0f} "
                     f"| {step_of[r['preset'], r['zero'], r['gpus'], r['sp']]:.2f} | {r['wall_days']:.1f} "
                     f"| {r['gpu_days']:.0f} |")
    p = plan["preprocess"]
    gpu_ms = args.networks_ms_per_frame + args.smplx_fit_ms_per_frame + args.head_fit_ms_per_frame
    lines += ["", f"### Preprocessing {p['corpus_hours']:.0f} h", "",
              f"- {p['frames'] / 1e6:.1f} M frames at {args.fps:g} fps; embedded annotators at "
              f"{args.cpu_ms_per_frame:g} CPU-ms per frame: **{p['embedded_cpu_core_hours']:,.0f} core-hours** "
              f"(e.g. {p['embedded_cpu_core_hours'] / 64 / 24:.1f} days on one 64-core node at full efficiency). "
              f"On GPU nodes (`+cluster=prod`, MediaPipe's GPU delegate, 16 cores per GPU) at the measured "
              f"{args.embedded_video_hours_per_gpu_hour:g} source-video-hours per GPU-hour: "
              f"**{p['embedded_gpu_node_hours']:,.0f} GPU-hours** "
              f"({p['embedded_gpu_node_hours'] / args.gpus_per_node:,.0f} hours on one {args.gpus_per_node}-GPU node).",
              f"- latent cache ({args.clip_coverage:.0%} of the footage inside clips, "
              f"{args.encode_video_hours_per_gpu_hour:g} video-hours per GPU-hour): "
              f"**{p['latent_cache_gpu_hours']:,.0f} GPU-hours**.",
              f"- production annotators (`annotators=full`) on GPUs: the whole-body keypoints and face networks at "
              f"{args.networks_ms_per_frame:g} GPU-ms per frame: **{p['networks_gpu_hours']:,.0f} GPU-hours**; the "
              f"SMPL-X fit at {args.smplx_fit_ms_per_frame:g} (8 clips per fit): "
              f"**{p['smplx_fit_gpu_hours']:,.0f} GPU-hours**; the 3DMM head fit at {args.head_fit_ms_per_frame:g} "
              f"(16 clips per fit): **{p['head_fit_gpu_hours']:,.0f} GPU-hours**; together "
              f"{1e3 / args.fps / gpu_ms:.2f} source-video-hours per GPU-hour. Person detection (MediaPipe "
              f"Pose) and the hand landmarks stay CPU work."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["wan1_3b", "wan14b"])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--gpu-gib", type=float, default=139.8, help="H200 memory as torch sees it")
    ap.add_argument("--usable", type=float, default=0.9, help="fraction left after the CUDA context, allocator slack")
    ap.add_argument("--mfu", type=float, nargs=2, default=[0.443, 0.460],
                    help="trainer MFU without / with (selective) checkpointing: the trainer's own metric, wan1_3b, one "
                         "H200, ZeRO-2, 49 and 121 frames, cached latents, compiled encoders (docs/performance.md, "
                         "2026-12-03); assumed to hold for wan14b (uncertain)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak used for MFU")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--intra-node-gbs", type=float, default=300.0,
                    help="achieved NVLink bus bandwidth per GPU for collectives (assumed; H200 NVLink 4: 450 GB/s "
                         "per direction peak)")
    ap.add_argument("--inter-node-gbs", type=float, default=40.0,
                    help="achieved bandwidth per GPU across nodes (assumed: one 400 Gb/s NIC per GPU at 80%%)")
    ap.add_argument("--overlap", type=float, default=0.5,
                    help="fraction of the ZeRO traffic hidden behind compute (assumed; DeepSpeed overlaps "
                         "reduce-scatter with backward)")
    ap.add_argument("--corpus-hours", type=float, default=500.0)
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--cpu-ms-per-frame", type=float, default=63.3,
                    help="embedded annotators, stages alone (bench/preprocess.py, dev CPU, the pipeline-efficiency "
                         "issue's run)")
    ap.add_argument("--embedded-video-hours-per-gpu-hour", type=float, default=2.25,
                    help="embedded annotators on a GPU node (+cluster=prod, one H200 + 16 cores): bench/preprocess.py "
                         "--videos 32 (docs/performance.md, 2026-12-03)")
    ap.add_argument("--encode-video-hours-per-gpu-hour", type=float, default=1.62,
                    help="the latent pass under Ray, per busy encode-actor hour, 121 x 640 x 960, H200: "
                         "bench/latents.py --encode (docs/performance.md, 2026-12-03; the VAE stage alone: 1.89)")
    ap.add_argument("--smplx-fit-ms-per-frame", type=float, default=3.12,
                    help="SMPL-X fit, 8 clips of 121 frames per fit, 300 iterations, CUDA graph: "
                         "bench/annotators_gpu.py --clips 8, H200 (docs/performance.md, 2026-12-03)")
    ap.add_argument("--head-fit-ms-per-frame", type=float, default=1.40,
                    help="3DMM head fit, 16 clips of 121 frames per fit, CUDA graph: bench/annotators_gpu.py "
                         "--head-clips 16, H200 (docs/performance.md, 2026-12-03)")
    ap.add_argument("--networks-ms-per-frame", type=float, default=6.81,
                    help="RTMW-x whole-body keypoints 5.52 + face detection 0.76, landmarks 0.38, identity 0.15: "
                         "bench/annotators_gpu.py, H200 (docs/performance.md, 2026-12-03)")
    ap.add_argument("--clip-coverage", type=float, default=0.8,
                    help="fraction of the corpus inside training clips (assumed: shot cuts, persons missing)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    plan = plan_rows(args)
    print(markdown(plan, args))
    if args.json:
        args.json.write_text(json.dumps(plan, indent=1, default=str))
    return plan


if __name__ == "__main__":
    main()
