"""Presets load through PyYAML and through Hydra into the same typed config; bad configs fail loudly."""
from __future__ import annotations

import pytest
import torch

from models.config import CONF_DIR, PRESETS, ModelConfig, load_preset, preset_data
from models.dreamactor import DreamActor


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_hydra_agrees(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    cfg = load_preset(name)
    assert cfg.name == name
    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base="1.3"):
        hydra_cfg = compose(overrides=[f"+model={name}"])
    assert ModelConfig.from_dict(OmegaConf.to_container(hydra_cfg.model, resolve=True)) == cfg


def test_wan_presets_match_wan_shapes():
    # Wan 2.1 shapes (diffusers configs of Wan2.1-T2V-1.3B and Wan2.1-I2V-14B-480P).
    small, big = load_preset("wan1_3b").dit, load_preset("wan14b").dit
    assert (small.dim, small.ffn_dim, small.num_layers, small.num_heads) == (1536, 8960, 30, 12)
    assert (big.dim, big.ffn_dim, big.num_layers, big.num_heads, big.image_dim) == (5120, 13824, 40, 40, 1280)


@pytest.mark.parametrize("name,backbone", [("wan1_3b", 1.3e9), ("wan14b", 14e9)])
def test_parameter_counts_printed_and_plausible(name, backbone, capsys):
    from models.__main__ import main

    with torch.device("meta"):
        model = DreamActor(load_preset(name))
    groups = {g: model.num_parameters(g) for g in ("dit", "pose_encoder", "face_encoder", "face_attn")}
    # The Wan backbone (+ Ref Attn) is the "dit" group; Wan's own count is 1.42e9 / 16.4e9 with its I2V branch.
    assert backbone < groups["dit"] < 1.5 * backbone
    main([name])
    assert f"{model.num_parameters():,}" in capsys.readouterr().out


def test_unknown_and_missing_keys_raise():
    data = preset_data("tiny")  # tiny.yaml with its base (conf/model/base/wan.yaml) merged in
    data["dit"]["num_layerz"] = 3
    with pytest.raises(KeyError, match="num_layerz"):
        ModelConfig.from_dict(data)
    del data["dit"]["num_layerz"], data["flow"]["shift"]
    with pytest.raises(KeyError, match="shift"):
        ModelConfig.from_dict(data)
    data = preset_data("tiny")
    data["dit"]["num_layers"] = "two"
    with pytest.raises(TypeError, match="num_layers"):
        ModelConfig.from_dict(data)


def test_overrides_and_replace():
    cfg = load_preset("tiny", {"dit": {"num_layers": 3}})
    assert cfg.dit.num_layers == 3 and cfg.dit.num_heads == load_preset("tiny").dit.num_heads
    assert cfg.replace(flow={"shift": 7.0}).flow.shift == 7.0
