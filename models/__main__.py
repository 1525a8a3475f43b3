"""Print the parameter count of each preset by group: ``python -m models [preset ...]``. ``total`` is the paper's
model (stages 1-3); the audio groups are the extension that stage 4 adds (``DreamActor(cfg, audio=True)``)."""
from __future__ import annotations

import sys

import torch

from .config import PRESETS, load_preset
from .dreamactor import PARAM_GROUPS, DreamActor


def main(argv: list[str] | None = None) -> None:
    """Build each preset on the meta device (no memory) and print its parameter counts."""
    names = (sys.argv[1:] if argv is None else argv) or list(PRESETS)
    print(f"{'preset':<10}{'total':>16}" + "".join(f"{g:>16}" for g in PARAM_GROUPS))
    for name in names:
        cfg = load_preset(name)
        with torch.device("meta"):
            model = DreamActor(cfg, audio=cfg.audio_encoder.frontend == "mel")  # pretrained needs its files
        row = "".join(f"{model.num_parameters(g):>16,}" for g in PARAM_GROUPS)
        total = model.num_parameters() - model.num_parameters("audio_encoder") - model.num_parameters("audio_backbone")
        print(f"{name:<10}{total:>16,}{row}")


if __name__ == "__main__":
    main()
