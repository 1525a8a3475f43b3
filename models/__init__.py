"""The DreamActor-M1 networks and the renderers of their control signals (docs/models.md).

Import the submodules directly (``from models.dreamactor import DreamActor``); nothing is imported here so
that the light parts (config, DiT, benchmark) load without the heavier optional dependencies.
"""
