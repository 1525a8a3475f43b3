"""The DreamActor-M1 DiT (paper 3.1): a Wan 2.1 transformer that also carries reference tokens,
Ref Attn, Face Attn and pose features.

Token sequence: reference latents and noisy video latents are patchified by the same patch embedding
and concatenated, ``[ref tokens ; video tokens]``. Reference tokens share every weight with the video
tokens and are modulated with the timestep of a clean latent (sigma = 0). Per block:

1. 3D self-attention over all tokens, 3D RoPE (video frames at t = 0..T-1, reference frames at
   t = -R..-1), adaLN modulation (Wan's 6-way ``modulation`` table + timestep projection);
2. Wan's text (+ image) cross-attention, kept and fed a fixed context (see ``DiT.text_context``);
3. **Ref Attn**: video tokens cross-attend to all reference tokens. The paper reshapes T_D to
   t_D x (h w) and T_R to 1 x (h w t_R): every frame's queries see the same keys, which is exactly
   one cross-attention from all video tokens to all reference tokens, done here in one SDPA call;
4. **Face Attn**: the video tokens of latent frame i cross-attend to the face motion tokens of the
   pixel frames that latent frame covers (the VAE's temporal factor: 4);
5. MLP with adaLN modulation.

Ref Attn, Face Attn, the pose-feature projection and the conditioning channels missing from a T2V
checkpoint start at zero, so a converted Wan checkpoint computes exactly what Wan computes.

Sequence parallelism (``DiT.set_sequence_parallel``, ``train.sequence_parallel``): the video tokens are split
over the ranks of a group and attention runs head-sharded between two all-to-alls (DeepSpeed-Ulysses); the
reference and face tokens are replicated. Layout and gradient rule: :mod:`models.sequence_parallel`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .config import DiTConfig
from .layers import (
    FP32MLP,
    MLP,
    Attention,
    FP32LayerNorm,
    grid_positions,
    rope_cos_sin,
    timestep_features,
)
from .partitioned import gathered
from .sequence_parallel import SequenceParallel, Shard, gather

# The attention kernels a selectively checkpointed block keeps (their outputs and log-sum-exp): re-running them is
# most of a block's recompute (attention is 64-84% of the model's FLOPs at the paper's shapes), keeping them costs
# ~5 bf16 vectors per token against ~36 + 6 * ffn/dim for the whole block.
_ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_attention)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with (B, 1, D) parameters."""
    return x * (1 + scale) + shift


class ImageContextEmbed(nn.Module):
    """Wan I2V's CLIP image-context projection: LayerNorm -> MLP (GELU) -> LayerNorm."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.norm_in = FP32LayerNorm(d_in)
        self.mlp = MLP(d_in, d_in, dim, act="gelu")
        self.norm_out = FP32LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, d_in) -> (B, L, dim)."""
        h = self.norm_in(x).type_as(x)
        return self.norm_out(self.mlp(h)).type_as(x)


class DiTBlock(nn.Module):
    """Self-attn -> text cross-attn -> Ref Attn -> Face Attn -> MLP, on separate ref / video streams."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d, eps = cfg.dim, cfg.eps
        self.backends = tuple(cfg.attention_backends)
        self.norm1 = FP32LayerNorm(d, eps, elementwise_affine=False)
        self.self_attn = Attention(d, cfg.num_heads, eps)
        self.norm_text = FP32LayerNorm(d, eps, elementwise_affine=True)
        self.text_attn = Attention(d, cfg.num_heads, eps, extra_kv_dim=d if cfg.image_dim is not None else None)
        self.norm_ref = FP32LayerNorm(d, eps, elementwise_affine=True)
        self.ref_attn = Attention(d, cfg.num_heads, eps)
        self.norm_face = FP32LayerNorm(d, eps, elementwise_affine=True)
        self.face_attn = Attention(d, cfg.num_heads, eps)
        self.norm3 = FP32LayerNorm(d, eps, elementwise_affine=False)
        self.ffn = MLP(d, cfg.ffn_dim, d, act="gelu_tanh")
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def _self_attention(self, xs, es, rope, sp):
        """Modulated 3D self-attention over the concatenation of the streams, gated back per stream (under
        sequence parallelism the video stream is this rank's shard, the reference stream replicated)."""
        mods = [(self.modulation + e).chunk(6, dim=1) for e in es]
        h = torch.cat([_modulate(self.norm1(x), m[0], m[1]).type_as(x) for x, m in zip(xs, mods)], dim=1)
        replicated = xs[0].shape[1] if len(xs) == 2 else 0
        a = self.self_attn(h, rope=rope, backends=self.backends, sp=sp, replicated=replicated)
        parts = a.split([x.shape[1] for x in xs], dim=1)
        return [(x.float() + p * m[2]).type_as(x) for x, p, m in zip(xs, parts, mods)], mods

    def _face_attention(self, h: torch.Tensor, face_tokens: torch.Tensor, sp) -> torch.Tensor:
        """Face Attn of the (normalised) video tokens ``h`` (B, n, D): each latent frame's tokens attend to that
        frame's face motion tokens (B * T, G, D). A sequence-parallel shard may begin and end inside a frame: its
        queries are padded to whole frames (the padding's outputs are dropped)."""
        b, n = h.shape[:2]
        frames = face_tokens.shape[0] // b
        if sp is None:
            return self.face_attn(h, face_tokens, backends=self.backends, query_groups=frames)
        per_frame, start = sp.total // frames, sp.start
        f0, f1 = start // per_frame, (start + n - 1) // per_frame + 1
        lead = start - f0 * per_frame
        padded = torch.nn.functional.pad(h, (0, 0, lead, f1 * per_frame - start - n))
        ctx = face_tokens.unflatten(0, (b, frames))[:, f0:f1].flatten(0, 1)
        out = self.face_attn(padded, ctx, backends=self.backends, query_groups=f1 - f0)
        return out[:, lead:lead + n]

    def forward(self, *args, checkpointed: str = "", ref_out: bool = True, sp=None):
        """One block (see :meth:`block`), its activations recomputed in backward when ``checkpointed`` is
        ``full`` (only the inputs kept) or ``selective`` (the inputs and the attention kernels' outputs kept: the
        backward re-runs the projections, norms and MLP, not the attention).

        The checkpoint sits inside the block's forward so that ``torch.compile`` of the block traces it
        (Dynamo's activation-checkpoint operator; the recompute is part of the compiled backward and the
        partitioner sees it), the arrangement torchtitan uses, rather than a compiled graph re-run from an
        outer ``torch.utils.checkpoint``.
        """
        if checkpointed and torch.is_grad_enabled():
            if checkpointed not in ("full", "selective"):
                raise ValueError(f"checkpointed must be '', 'full' or 'selective', got {checkpointed!r}")
            contexts = {"context_fn": _selective_contexts} if checkpointed == "selective" else {}
            return checkpoint(self.block, *args, ref_out=ref_out, sp=sp, use_reentrant=False, **contexts)
        return self.block(*args, ref_out=ref_out, sp=sp)

    def block(self, x_ref, x_vid, e_ref, e_vid, rope, context, image_context, face_tokens, motion_keep,
              ref_out: bool = True, sp: Shard | None = None):
        """One block on the reference stream (B, Nr, D) and the video stream (B, Nv, D) (with ``sp``: this rank's
        Nv / N video tokens, see :mod:`models.sequence_parallel`).

        ``ref_out=False`` (the last block) returns ``(None, x_vid)``: nothing reads the reference stream after
        the last block, so its modulated MLP is not run (the references' keys and values still serve this
        block's attention)."""
        xs = [x_ref, x_vid] if x_ref.shape[1] else [x_vid]
        es = [e_ref, e_vid] if x_ref.shape[1] else [e_vid]
        # 1. 3D self-attention over [ref ; video] tokens, adaLN-modulated per stream
        xs, mods = self._self_attention(xs, es, rope, sp)
        # 2. Wan's text (+ image) cross-attention on the fixed context
        xs = [x + self.text_attn(self.norm_text(x).type_as(x), context, extra_context=image_context,
                                 backends=self.backends) for x in xs]
        x_vid = xs[-1]
        # 3. Ref Attn: video tokens attend to every reference token (paper 3.1)
        if len(xs) == 2:
            r = self.norm_ref(xs[0]).type_as(x_vid)
            x_vid = x_vid + self.ref_attn(self.norm_ref(x_vid).type_as(x_vid), r, backends=self.backends)
        # 4. Face Attn: each latent frame's tokens attend to its face motion tokens (paper 3.2)
        if face_tokens is not None:
            f = self._face_attention(self.norm_face(x_vid).type_as(x_vid), face_tokens, sp)
            x_vid = x_vid + (f if motion_keep is None else f * motion_keep)
        xs[-1] = x_vid
        # 5. modulated MLP (not for the reference stream of the last block: nothing reads it)
        if not ref_out:
            xs, mods = xs[-1:], mods[-1:]
        out = []
        for x, m in zip(xs, mods):
            h = _modulate(self.norm3(x), m[3], m[4]).type_as(x)
            out.append((x.float() + self.ffn(h).float() * m[5]).type_as(x))
        if not ref_out:
            return None, out[-1]
        return (out[0] if len(out) == 2 else x_ref), out[-1]


# Activation memory of one DiT block per token, bf16, in bytes: ``a * dim + f * ffn_dim`` (the saved inputs of the
# projections, attention outputs and statistics, fp32 norm inputs, the MLP's hidden activations). Calibrated
# on an H200 (docs/performance.md, wan1_3b: 2.47 GiB per block at 24,960 tokens and 2.3-2.6 GiB from the model
# step, 7.25 GiB at 81,600 tokens; compiled blocks); eager blocks keep ~1.27x that (unfused elementwise).
BLOCK_BYTES_PER_TOKEN = (36, 6)
EAGER_FACTOR = 1.27
# Activations outside the blocks that scale with pixels (the pose encoder runs at full resolution), bytes per
# pixel per channel of its first stage (195 B/pixel measured at 16 channels).
ENCODER_BYTES_PER_PIXEL_CHANNEL = 12


def block_activation_bytes(cfg: DiTConfig, tokens: int, compiled: bool) -> int:
    """Estimated activation bytes one un-checkpointed block keeps for backward over ``tokens`` tokens."""
    a, f = BLOCK_BYTES_PER_TOKEN
    per_token = a * cfg.dim + f * cfg.ffn_dim
    return int(tokens * per_token * (1.0 if compiled else EAGER_FACTOR))


def checkpointed_bytes(cfg: DiTConfig, tokens: int, policy: str) -> int:
    """Bytes one checkpointed block keeps over ``tokens`` tokens: its two input streams (bf16), and with the
    ``selective`` policy the outputs of its attention kernels (self, text (+ image), Ref and Face Attn: a bf16
    vector and an fp32 log-sum-exp per head and token each; Ref and Face Attn have only the video tokens as
    queries, counted over all tokens here)."""
    inputs = tokens * cfg.dim * 2 * 2
    if policy == "full":
        return inputs
    kernels = 4 + (cfg.image_dim is not None)
    return inputs + tokens * kernels * (cfg.dim * 2 + cfg.num_heads * 4)


class CheckpointPlan(NamedTuple):
    """Blocks from the first: ``full`` checkpointed keeping only their inputs, then ``selective`` keeping their
    attention outputs too, the rest not checkpointed."""

    full: int
    selective: int

    @property
    def blocks(self) -> int:
        return self.full + self.selective

    def mode(self, i: int) -> str:
        """How block ``i`` runs: ``full``, ``selective`` or ``""`` (not checkpointed)."""
        return "full" if i < self.full else "selective" if i < self.blocks else ""


def fixed_plan(cfg: DiTConfig, blocks: int) -> CheckpointPlan:
    """``blocks`` checkpointed (-1: every block) under ``cfg.checkpoint_policy``."""
    k = cfg.num_layers if blocks < 0 else min(blocks, cfg.num_layers)
    return CheckpointPlan(k, 0) if cfg.checkpoint_policy == "full" else CheckpointPlan(0, k)


def checkpoint_plan(cfg: DiTConfig, batch: int, tokens: int, pixels: int, budget_bytes: int, compiled: bool,
                    encoder_channels: int = 16) -> CheckpointPlan:
    """The cheapest checkpointing under which the activations of a batch fit ``budget_bytes``.

    ``tokens`` and ``pixels`` are per sample. First the fewest checkpointed blocks under ``cfg.checkpoint_policy``
    (a selective block re-runs everything but attention, a full one everything); when even every block selective
    does not fit, the fewest full blocks with the rest selective. Returns no checkpointing when everything fits
    (the fastest: no recomputation) and every block full when even that does not fit (the caller's memory will
    tell)."""
    n = cfg.num_layers
    if cfg.checkpoint_policy == "full":
        plans = [CheckpointPlan(k, 0) for k in range(n + 1)]
    else:
        plans = [CheckpointPlan(0, k) for k in range(n + 1)] + [CheckpointPlan(j, n - j) for j in range(1, n + 1)]
    for plan in plans:
        if activation_bytes(cfg, batch, tokens, pixels, compiled, plan, encoder_channels) <= budget_bytes:
            return plan
    return CheckpointPlan(n, 0)


def activation_bytes(cfg: DiTConfig, batch: int, tokens: int, pixels: int, compiled: bool,
                     plan: CheckpointPlan | int, encoder_channels: int = 16) -> int:
    """Estimated peak activation bytes of a batch under ``plan`` (an int: that many blocks under
    ``cfg.checkpoint_policy``; see :func:`checkpoint_plan`). While one checkpointed block is recomputed in
    backward its full activations live once more."""
    if isinstance(plan, int):
        plan = fixed_plan(cfg, plan)
    block = batch * block_activation_bytes(cfg, tokens, compiled)
    encoders = batch * pixels * ENCODER_BYTES_PER_PIXEL_CHANNEL * encoder_channels
    kept = (plan.full * checkpointed_bytes(cfg, tokens, "full")
            + plan.selective * checkpointed_bytes(cfg, tokens, "selective"))
    return encoders + (cfg.num_layers - plan.blocks) * block + batch * kept + (block if plan.blocks else 0)


class DiT(nn.Module):
    """The DreamActor DiT; see the module docstring for the token layout and block structure."""

    def __init__(self, cfg: DiTConfig, pose_channels: int, pose_encoder_channels: int = 16):
        super().__init__()
        self.cfg = cfg
        self.encoder_channels = pose_encoder_channels
        d = cfg.dim
        if cfg.patch_size[0] != 1:
            raise ValueError("reference frames are single latent frames: patch_size[0] must be 1")
        if cfg.cond_channels not in (0, cfg.latent_channels + 4):
            raise ValueError(f"cond_channels must be 0 or {cfg.latent_channels + 4} (Wan I2V: 4 mask + latent)")
        in_ch = cfg.latent_channels + cfg.cond_channels
        self.patch_embed = nn.Conv3d(in_ch, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # [noisy latent ; pose features] -> token is patch_embed on the latent part plus this on the pose part.
        self.pose_embed = nn.Conv3d(pose_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embed = FP32MLP(cfg.freq_dim, d, d, act="silu")
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_embed = MLP(cfg.text_dim, d, d, act="gelu_tanh")
        # The fixed context fed to Wan's cross-attention (a buffer: saved in checkpoints, never trained).
        self.register_buffer("text_context", torch.zeros(cfg.text_len, cfg.text_dim))
        if cfg.image_dim is not None:
            self.image_embed = ImageContextEmbed(cfg.image_dim, d)
            self.register_buffer("image_context", torch.zeros(cfg.image_len, cfg.image_dim))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = FP32LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(d, cfg.latent_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.head_modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        # activation_checkpointing=auto: the activation memory this model may use (set by the trainer from the
        # GPU's memory, see checkpoint_plan); None = unlimited (no checkpointing). Pixels per latent cell: the
        # pose encoder runs at full resolution, its activations scale with pixels, not tokens.
        self.activation_budget_bytes: int | None = None
        self.pixels_per_latent_cell = 1
        self.compiled = False
        self.sequence_parallel: SequenceParallel | None = None  # set_sequence_parallel
        self.reset_parameters()

    def set_sequence_parallel(self, sp: SequenceParallel | None) -> None:
        """Split the video tokens over ``sp``'s group from now on (None or a group of 1: no split). Every rank of
        the group must then call forward with the same inputs (models.sequence_parallel)."""
        if sp is not None and sp.size > 1 and self.cfg.num_heads % sp.size:
            raise ValueError(f"sequence parallelism over {sp.size} ranks needs dit.num_heads ({self.cfg.num_heads}) "
                             f"to be a multiple of {sp.size}")
        self.sequence_parallel = sp if sp is not None and sp.size > 1 else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Wan's initialisation for the backbone, zeros for every DreamActor branch. Each module is gathered while
        it is initialised: under ``deepspeed.zero.Init`` its children are already partitioned (same draws, same
        order, so the same values as an ordinary build on the CPU)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                with gathered(m.parameters(recurse=False), modify=True):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        with gathered(self.patch_embed.parameters(), modify=True):
            nn.init.xavier_uniform_(self.patch_embed.weight.flatten(1))
            nn.init.zeros_(self.patch_embed.bias)
        for mlp in (self.time_embed, self.text_embed):
            with gathered([mlp.fc1.weight, mlp.fc2.weight], modify=True):
                nn.init.normal_(mlp.fc1.weight, std=0.02)
                nn.init.normal_(mlp.fc2.weight, std=0.02)
        with gathered([self.proj_out.weight], modify=True):
            nn.init.zeros_(self.proj_out.weight)
        self.zero_dreamactor_branches()

    @torch.no_grad()
    def zero_dreamactor_branches(self) -> None:
        """Zero the outputs of the new branches (Ref Attn, Face Attn, pose projection, cond channels are not
        touched: a checkpoint may carry them)."""
        branches = [self.pose_embed] + [attn.to_out for b in self.blocks for attn in (b.ref_attn, b.face_attn)]
        for m in branches:
            with gathered(m.parameters(), modify=True):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def checkpoint_plan(self, batch: int, tokens: int, pixels: int) -> CheckpointPlan:
        """Which blocks (from the first) run under activation checkpointing for this batch, and how."""
        ac = self.cfg.activation_checkpointing
        if ac != "auto":
            return fixed_plan(self.cfg, ac)
        if self.activation_budget_bytes is None or not torch.is_grad_enabled():
            return CheckpointPlan(0, 0)
        return checkpoint_plan(self.cfg, batch, tokens, pixels, self.activation_budget_bytes, self.compiled,
                               self.encoder_channels)

    def timestep_embedding(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) sigma in [0, 1] -> fp32 embedding (B, D) and 6-way modulation (B, 6, D)."""
        temb = self.time_embed(timestep_features(sigma * self.cfg.timestep_scale, self.cfg.freq_dim))
        w = self.time_proj.weight.float()
        proj = torch.nn.functional.linear(torch.nn.functional.silu(temb), w, self.time_proj.bias.float())
        return temb, proj.unflatten(1, (6, -1))

    def context(self, batch: int, dtype: torch.dtype):
        """Embedded fixed text (and image) context, expanded to the batch."""
        text = self.text_embed(self.text_context.to(dtype)[None]).expand(batch, -1, -1)
        image = None
        if self.cfg.image_dim is not None:
            image = self.image_embed(self.image_context.to(dtype)[None]).expand(batch, -1, -1)
        return text, image

    @staticmethod
    def token_positions(n_ref: int, t: int, h: int, w: int, device=None) -> torch.Tensor:
        """(t, h, w) RoPE positions of [ref tokens ; video tokens]: video frames 0..t-1, references -R..-1."""
        return torch.cat([grid_positions(-n_ref, n_ref, h, w, device), grid_positions(0, t, h, w, device)])

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, ref_latents: torch.Tensor | None = None,
                pose_features: torch.Tensor | None = None, face_tokens: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, motion_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity.

        latents: (B, C, T, H, W) noisy latents; sigma: (B,) noise level in [0, 1];
        ref_latents: (B, C, R, H, W) clean reference latents or None;
        pose_features: (B, Cp, T, H, W) pose-encoder output or None;
        face_tokens: (B * T, G, D) face motion tokens grouped per latent frame, or None;
        cond: (B, cond_channels, T, H, W) Wan I2V conditioning (mask + latent) or None (zeros);
        motion_keep: (B,) 1 to keep, 0 to drop the motion condition (pose + face) of a sample.
        Returns (B, C, T, H, W).
        """
        cfg = self.cfg
        b, _, t, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        gt, gh, gw = t // pt, h // ph, w // pw
        dtype = self.patch_embed.weight.dtype
        if cond is None:
            cond = latents.new_zeros(b, cfg.cond_channels, t, h, w)
        x_vid = self.patch_embed(torch.cat([latents, cond], dim=1).to(dtype))
        keep = None if motion_keep is None else motion_keep.to(dtype).view(b, 1, 1)
        if pose_features is not None:
            pose = self.pose_embed(pose_features.to(dtype))
            x_vid = x_vid + (pose if motion_keep is None else pose * keep[..., None, None])
        x_vid = x_vid.flatten(2).transpose(1, 2).contiguous()

        n_ref = 0 if ref_latents is None else ref_latents.shape[2]
        if n_ref:
            ones = ref_latents.new_ones(b, cfg.cond_channels - cfg.latent_channels, n_ref, h, w)
            ref_cond = torch.cat([ones, ref_latents], dim=1) if cfg.cond_channels else ref_latents[:, :0]
            x_ref = self.patch_embed(torch.cat([ref_latents, ref_cond], dim=1).to(dtype))
            x_ref = x_ref.flatten(2).transpose(1, 2).contiguous()
        else:
            x_ref = x_vid[:, :0]

        positions = self.token_positions(n_ref, gt, gh, gw, latents.device)
        shard = None
        if self.sequence_parallel is not None:  # this rank's video tokens, at their global positions
            shard = self.sequence_parallel.split(x_vid.shape[1], f"video tokens ({gt} x {gh} x {gw} patches of latents "
                                                         f"{tuple(latents.shape)}, patch {tuple(cfg.patch_size)})")
            x_vid = x_vid[:, shard.local]
            n_r = n_ref * gh * gw
            positions = torch.cat([positions[:n_r], positions[n_r:][shard.local]])
        rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        temb, e_vid = self.timestep_embedding(sigma)
        e_ref = self.timestep_embedding(torch.zeros_like(sigma))[1] if n_ref else None
        context, image_context = self.context(b, dtype)
        if face_tokens is not None:
            face_tokens = face_tokens.to(dtype)

        plan = self.checkpoint_plan(b, n_ref * gh * gw + x_vid.shape[1], t * h * w * self.pixels_per_latent_cell)
        for i, block in enumerate(self.blocks):
            args = (x_ref, x_vid, e_ref, e_vid, rope, context, image_context, face_tokens, keep)
            x_ref, x_vid = block(*args, checkpointed=plan.mode(i), ref_out=i < len(self.blocks) - 1, sp=shard)

        shift, scale = (self.head_modulation + temb[:, None]).chunk(2, dim=1)
        out = self.proj_out(_modulate(self.norm_out(x_vid), shift, scale).type_as(x_vid))
        if shard is not None:  # every rank returns the whole velocity (the loss is computed as without SP)
            out = gather(out, shard, dim=1)
        out = out.reshape(b, gt, gh, gw, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, t, h, w)
