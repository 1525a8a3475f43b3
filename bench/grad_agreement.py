"""Do activation checkpointing and ``compile_blocks`` change the gradients? One forward + backward of the
flow-matching loss per variant on the same weights and batch, plain PyTorch (no DeepSpeed), bf16 weights as
under DeepSpeed bf16; the gradient norm per parameter group and the relative L2 difference of every group's
gradient against the reference variant (eager, nothing checkpointed), plus the number of non-finite tensors.

    python bench/grad_agreement.py --preset wan1_3b --layers 4 --frames 49 --height 480 --width 832 --refs 3 \
        --variants eager:0 eager:2 eager:-1 compile:0 compile:2 compile:-1 --steps 3 --out grads.json

A variant is ``eager|compile|outer : checkpointed blocks (-1 = all) [: attention backend] [: full]``
(``full``: checkpointed blocks keep only their inputs; default selective, the attention outputs kept too);
``outer`` calls compiled blocks inside an outer checkpoint, ``refout`` makes the last block return its unused
reference stream and ``mix`` turns Inductor's mix-order reduction back on: all three together are the DiT
before the fix; ``mix`` alone reproduces the wrong gradients (pytorch/pytorch#193061, docs/performance.md).
With ``--steps N`` each variant also takes N AdamW steps (lr ``--lr``) so that the gradients of steps 2..N
come from updated weights, as in training. Exit status 1 when a variant disagrees with the reference beyond
``--tol`` or has a non-finite gradient: the GPU test (tests/models/test_gpu_grads.py) runs this.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.conditions import Conditions  # noqa: E402
from models.config import load_preset  # noqa: E402
from models.dreamactor import DreamActor, param_group_of  # noqa: E402
from models.flow import add_noise, flow_loss  # noqa: E402

BACKENDS = ("cudnn", "flash", "efficient", "math")


def make_batch(cfg, frames: int, height: int, width: int, refs: int, device, seed: int):
    """Random latents, noise level, pose maps and face crops of one clip (batch 1), fp32."""
    tc, sc = cfg.vae.temporal_compression, cfg.vae.spatial_compression
    t, h, w, c = 1 + (frames - 1) // tc, height // sc, width // sc, cfg.dit.latent_channels
    g = torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(1, c, t, h, w, device=device, generator=g)
    noise = torch.randn(1, c, t, h, w, device=device, generator=g)
    sigma = torch.rand(1, device=device, generator=g) * 0.8 + 0.1
    xt, target = add_noise(x0, noise, sigma)
    s = cfg.face_encoder.crop_size
    return {
        "xt": xt, "sigma": sigma, "target": target,
        "ref": torch.randn(1, c, refs, h, w, device=device, generator=g),
        "pose": torch.rand(1, cfg.pose_encoder.in_channels, frames, height, width, device=device, generator=g),
        "face": torch.rand(1, frames, 3, s, s, device=device, generator=g) * 2 - 1,
    }


def loss_of(model: DreamActor, b: dict) -> torch.Tensor:
    """The flow-matching loss of one batch (inputs cast to the weights' dtype, as train/step.py does)."""
    dt = model.dit.patch_embed.weight.dtype
    v = model(b["xt"].to(dt), b["sigma"], Conditions(b["ref"].to(dt), b["pose"].to(dt), b["face"].to(dt)),
              use_face=True)
    return flow_loss(v, b["target"])


def group_grads(model: DreamActor) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """Every group's gradients flattened to one fp32 vector, the names of non-finite gradients, and each
    parameter's gradient (by name)."""
    groups: dict[str, list[torch.Tensor]] = {}
    bad, each = [], {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().float().flatten()
        if not torch.isfinite(g).all():
            bad.append(name)
        groups.setdefault(param_group_of(name), []).append(g)
        each[name.replace(".inner.inner.", ".").replace(".inner.", ".")] = g
    return {k: torch.cat(v) for k, v in groups.items()}, bad, each


class OuterCheckpoint(torch.nn.Module):
    """``torch.utils.checkpoint`` around a (compiled) block, as the DiT did before the checkpoint moved inside."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, checkpointed: bool = False, ref_out: bool = True):
        if checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, ref_out=ref_out)
        return self.inner(*args, ref_out=ref_out)


class RefOut(torch.nn.Module):
    """Every block returns its reference stream, the last one too (the DiT before the fix)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, checkpointed: bool = False, ref_out: bool = True):
        return self.inner(*args, checkpointed=checkpointed, ref_out=True)


def run_variant(base: DreamActor, spec: str, batches: list[dict], lr: float) -> dict:
    """Gradients of every step of one variant (a fresh copy of ``base``)."""
    mode, ckpt, *rest = spec.split(":")
    model = copy.deepcopy(base)
    backend = next((r for r in rest if r in BACKENDS), None)
    dit_cfg = model.dit.cfg
    backends = (dit_cfg.attention_backends if backend is None
                else (backend,) + tuple(b for b in BACKENDS if b != backend))
    if model.dit.blocks[0].backends and next(model.parameters()).device.type == "cuda":
        for blk in model.dit.blocks:
            blk.backends = tuple(backends)
    model.dit.cfg = dataclasses.replace(  # read at every forward
        dit_cfg, activation_checkpointing=int(ckpt), checkpoint_policy="full" if "full" in rest else "selective")
    if mode in ("compile", "outer"):
        torch._dynamo.reset()  # compile anew with this variant's Inductor options
        model.compile_blocks(mix_order_reduction="mix" in rest)
    if mode == "outer":  # the arrangement before the fix: a compiled block inside an outer checkpoint
        model.dit.blocks = torch.nn.ModuleList(OuterCheckpoint(b) for b in model.dit.blocks)
    if "refout" in rest:  # before the fix: the last block also returns the reference stream nobody reads
        model.dit.blocks = torch.nn.ModuleList(RefOut(b) for b in model.dit.blocks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=True)
    steps = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, b)
        loss.backward()
        grads, bad, each = group_grads(model)
        steps.append({"loss": loss.item(), "grads": grads, "nonfinite": bad, "each": each})
        opt.step()
    return {"variant": spec, "steps": steps}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 difference ||a - b|| / ||b||."""
    d = torch.linalg.vector_norm(a - b).item()
    n = torch.linalg.vector_norm(b).item()
    return d / n if n else (0.0 if d == 0 else math.inf)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="wan1_3b")
    ap.add_argument("--layers", type=int, default=4, help="DiT blocks (fewer than the preset: same block, less time)")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", nargs="+", default=["eager:0", "eager:2", "eager:-1", "compile:0", "compile:2",
                                                       "compile:-1"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tol", type=float, default=0.05, help="largest relative L2 difference of a group's gradient")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = load_preset(args.preset).replace(dit={"num_layers": args.layers})
    if device.type != "cuda":
        cfg = cfg.replace(dit={"attention_backends": ()})
    torch.manual_seed(0)
    with torch.device(device):
        base = DreamActor(cfg)
    base = base.to(getattr(torch, args.dtype))
    with torch.no_grad():  # no zero-initialised branch: every path carries gradient
        for p in base.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    base.train()
    base.set_stage(3)
    batches = [make_batch(cfg, args.frames, args.height, args.width, args.refs, device, seed=i)
               for i in range(args.steps)]

    results = [run_variant(base, v, batches, args.lr) for v in args.variants]
    ref = results[0]
    report, ok = [], True
    for r in results:
        for i, s in enumerate(r["steps"]):
            diffs = {g: rel(s["grads"][g], ref["steps"][i]["grads"][g]) for g in s["grads"]}
            norms = {g: torch.linalg.vector_norm(v).item() for g, v in s["grads"].items()}
            total = math.sqrt(sum(n * n for n in norms.values()))
            agree = all(d <= args.tol for d in diffs.values()) and not s["nonfinite"]
            ref_each = ref["steps"][i]["each"]
            worst = sorted(((rel(g, ref_each[n]), n) for n, g in s["each"].items() if n in ref_each), reverse=True)[:5]
            ok &= agree
            row = {"variant": r["variant"], "step": i + 1, "loss": s["loss"], "grad_norm": total, "group_norms": norms,
                   "rel_diff_vs_ref": diffs, "nonfinite": s["nonfinite"], "agrees": agree,
                   "worst_params": [[n, d] for d, n in worst]}
            report.append(row)
            print(f"{r['variant']:>18} step {i + 1}: loss {s['loss']:.5f} grad norm {total:10.4f} "
                  f"max rel diff {max(diffs.values()):.4f} non-finite {len(s['nonfinite'])}"
                  f"{'' if agree else '  <-- DISAGREES'}", flush=True)
            if s["nonfinite"]:
                print("    non-finite:", ", ".join(s["nonfinite"][:12]), flush=True)
            if not agree:
                print("    worst:", ", ".join(f"{n} {d:.3g}" for d, n in worst), flush=True)
    if args.out:
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        Path(args.out).write_text(json.dumps({"args": vars(args), "torch": torch.__version__,
                                              "device": device_name, "rows": report}, indent=1))
    print("all variants agree" if ok else "SOME VARIANTS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
