"""Initialise the DreamActor DiT from an open Wan 2.1 transformer checkpoint (paper 4.1: "initialized from
a pretrained image-to-video DiT").

Input: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or sharded
``*.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``), in diffusers'
``WanTransformer3DModel`` format (e.g. ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers/transformer``) or in the
original Wan release format (``Wan-AI/Wan2.1-T2V-1.3B``; its keys are renamed with diffusers' own
converter). Tensors are read one at a time (``safe_open``), so peak host memory is one module, also when
ZeRO-3 partitioned the model as it was built (models/partitioned.py).

What maps to what (diffusers name -> ours): see ``WAN_TO_DREAMACTOR``. Wan's text/image
cross-attention is kept as ``text_attn`` and fed a fixed context (the ``text_context`` /
``image_context`` buffers: zeros, or a tensor from ``weights.text_context_path`` /
``image_context_path``, e.g. a precomputed umT5 embedding of a neutral prompt). A T2V checkpoint has
16 input channels: the 20 Wan-I2V conditioning channels (mask + latent) are zero-initialised. New
DreamActor parts start as: Ref Attn q/k/v/norms = copies of the block's self-attention
(``ref_attn_init: self_attn``) or random, Ref Attn / Face Attn output projections = 0, pose
projection = 0; so the converted model computes Wan's function until those branches learn.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .dit import DiT
from .partitioned import SafetensorsReader, assign, gathered, shape

WAN_TO_DREAMACTOR: tuple[tuple[str, str], ...] = (
    (r"^patch_embedding\.", "patch_embed."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embed.fc1."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embed.fc2."),
    (r"^condition_embedder\.time_proj\.", "time_proj."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embed.fc1."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embed.fc2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "image_embed.norm_in."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "image_embed.mlp.fc1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "image_embed.mlp.fc2."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "image_embed.norm_out."),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.to_out."),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.text_attn.to_out."),
    (r"^blocks\.(\d+)\.attn2\.add_k_proj\.", r"blocks.\1.text_attn.extra_k."),
    (r"^blocks\.(\d+)\.attn2\.add_v_proj\.", r"blocks.\1.text_attn.extra_v."),
    (r"^blocks\.(\d+)\.attn2\.norm_added_k\.", r"blocks.\1.text_attn.norm_extra_k."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.text_attn."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm_text."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.fc1."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.fc2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^scale_shift_table$", "head_modulation"),
    (r"^proj_out\.", "proj_out."),
)
# Parts of our DiT that no Wan checkpoint has.
DREAMACTOR_ONLY = re.compile(r"(^pose_embed\.|\.ref_attn\.|\.norm_ref\.|\.face_attn\.|\.norm_face\.|_context$)")
_IGNORED = re.compile(r"\.norm_added_q\.")  # diffusers ignores it too


def rename_wan_key(key: str) -> str | None:
    """Our parameter name for a diffusers Wan transformer key (None if it has no counterpart)."""
    for pattern, repl in WAN_TO_DREAMACTOR:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _wan_shapes(config: dict) -> dict:
    """Shape fields of a diffusers or original-format Wan config, in diffusers' names."""
    if "num_attention_heads" in config:
        return {k: config.get(k) for k in ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers",
                                            "in_channels", "out_channels", "text_dim", "freq_dim", "image_dim")}
    heads = config["num_heads"]
    i2v = config.get("model_type") in ("i2v", "flf2v")
    return {"num_attention_heads": heads, "attention_head_dim": config["dim"] // heads, "ffn_dim": config["ffn_dim"],
            "num_layers": config["num_layers"], "in_channels": config["in_dim"], "out_channels": config["out_dim"],
            "text_dim": config.get("text_dim", 4096), "freq_dim": config["freq_dim"],
            "image_dim": 1280 if i2v else None}


def check_config(dit: DiT, config: dict) -> None:
    """Raise if the checkpoint's shapes do not fit the DiT config."""
    c = dit.cfg
    wan = _wan_shapes(config)
    ours = {"num_attention_heads": c.num_heads, "attention_head_dim": c.head_dim, "ffn_dim": c.ffn_dim,
            "num_layers": c.num_layers, "out_channels": c.latent_channels, "text_dim": c.text_dim,
            "freq_dim": c.freq_dim, "image_dim": c.image_dim}
    bad = {k: (wan[k], v) for k, v in ours.items() if wan[k] != v}
    if wan["in_channels"] not in (c.latent_channels, c.latent_channels + c.cond_channels):
        bad["in_channels"] = (wan["in_channels"], f"{c.latent_channels} or {c.latent_channels + c.cond_channels}")
    if bad:
        raise ValueError("Wan checkpoint does not match model.dit: " +
                         ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in bad.items()))


def _shards(path: Path) -> list[Path]:
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    return found


def _diffusers_names(keys: list[str], shard: Path) -> dict[str, str]:
    """{diffusers name: name in the file} of one shard's keys. Original-format Wan keys are renamed by diffusers'
    own converter, given the names alone (for Wan 2.1 it only renames: no tensor needs to be read for it)."""
    if not any(k.startswith(("blocks.0.self_attn.", "head.head.")) or ".self_attn.q." in k for k in keys):
        return {k: k for k in keys}
    from diffusers.loaders.single_file_utils import (
        convert_wan_transformer_to_diffusers,
    )

    try:
        return convert_wan_transformer_to_diffusers({k: k for k in keys})
    except (AttributeError, TypeError, IndexError) as e:  # a conversion that reshapes tensors
        raise ValueError(f"{shard}: this original-format Wan checkpoint needs more than a renaming ({e}); convert "
                         "it to diffusers' format first (WanTransformer3DModel.save_pretrained)") from e


def _sources(dit: DiT, path: Path) -> dict[str, tuple[SafetensorsReader, str]]:
    """Where each of our parameters is in the checkpoint (file, key), from the names and shapes alone."""
    params = {n: shape(p) for n, p in dit.named_parameters()}
    found, unexpected = {}, []
    for shard in _shards(path):
        reader = SafetensorsReader(shard)
        for key, stored in _diffusers_names(list(reader), shard).items():
            ours = rename_wan_key(key)
            if ours is None or ours not in params:
                if not _IGNORED.search(key):
                    unexpected.append(key)
                continue
            have, want = reader.shape(stored), params[ours]
            if ours == "patch_embed.weight" and len(have) > 1 and have[1] < want[1]:
                want = want[:1] + have[1:2] + want[2:]  # conditioning channels a T2V checkpoint lacks: zeros
            if have != want:
                raise ValueError(f"{key} -> {ours}: checkpoint shape {have}, model {want}")
            found[ours] = (reader, stored)
    if unexpected:
        raise ValueError(f"{path}: keys with no place in the DreamActor DiT: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(k for k in params if k not in found and not DREAMACTOR_ONLY.search(k))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} backbone parameters, e.g. {missing[:8]}")
    return found


@torch.no_grad()
def load_wan_transformer(dit: DiT, path: str | Path, ref_attn_init: str = "self_attn") -> dict:
    """Copy Wan transformer weights from ``path`` into ``dit``; returns a report of what was loaded.

    Tensors are read one at a time into one gathered module at a time (models/partitioned.py): peak memory is
    one module, whether ``dit`` is whole or partitioned by ZeRO-3."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no Wan transformer at {path} (expected config.json + *.safetensors). Point "
            "model.weights.wan_transformer_dir at the 'transformer' folder of a Wan 2.1 diffusers checkpoint, "
            "e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers/transformer or Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer.")
    if ref_attn_init not in ("self_attn", "random"):
        raise ValueError(f"ref_attn_init must be 'self_attn' or 'random', got {ref_attn_init!r}")
    check_config(dit, json.loads((path / "config.json").read_text()))
    sources = _sources(dit, path)
    cond_channels = shape(dit.patch_embed.weight)[1]

    def read(name: str) -> torch.Tensor:
        reader, key = sources[name]
        value = reader[key]
        if name == "patch_embed.weight" and value.shape[1] < cond_channels:
            pad = value.new_zeros(value.shape[0], cond_channels - value.shape[1], *value.shape[2:])
            value = torch.cat([value, pad], dim=1)
        return value

    assign(dit, read, sources)
    dit.zero_dreamactor_branches()
    if ref_attn_init == "self_attn":
        for block in dit.blocks:
            names = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
            src = [p for n in names for p in getattr(block.self_attn, n).parameters()]
            dst = [p for n in names for p in getattr(block.ref_attn, n).parameters()]
            with gathered(src), gathered(dst, modify=True):
                for d, s in zip(dst, src):
                    d.copy_(s)
    params = [n for n, _ in dit.named_parameters()]
    return {"loaded": len(sources), "new": sorted(k for k in params if k not in sources)}


def load_context(buffer: torch.Tensor, path: str | Path, what: str) -> None:
    """Fill a fixed-context buffer from a (L, D) tensor file (.safetensors with one tensor, or torch .pt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found at {path}; set it to null to use a zero context")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(path)).values())
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected one tensor, found {len(tensors)}")
        value = tensors[0]
    else:
        value = torch.load(path, map_location="cpu", weights_only=True)
    value = value.squeeze(0) if value.dim() == 3 else value
    if tuple(value.shape) != tuple(buffer.shape):
        raise ValueError(f"{path}: {what} has shape {tuple(value.shape)}, model expects {tuple(buffer.shape)}")
    with torch.no_grad():
        buffer.copy_(value.to(buffer.dtype))
