"""Print the parameter count of each preset by group: ``python -m models [preset ...]``."""
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
        with torch.device("meta"):
            model = DreamActor(load_preset(name))
        row = "".join(f"{model.num_parameters(g):>16,}" for g in PARAM_GROUPS)
        print(f"{name:<10}{model.num_parameters():>16,}{row}")


if __name__ == "__main__":
    main()
