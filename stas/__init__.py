"""stas: see and steer the Massive Activations of video diffusion transformers.

The names most scripts need, importable from the package itself (loaded on first use, so that `import stas.errors`
stays light):

    from stas import TokenLayout, get_backbone, massive_channel_mask, apply_rule, StasSteerer, apply_stas

The layers and where each kind of change goes: docs/architecture.md.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "TokenLayout": "stas.core.layout",
    "massive_channel_mask": "stas.core.massive",
    "apply_rule": "stas.core.rules",
    "get_backbone": "stas.backbones",
    "load_pipeline": "stas.backbones",
    "StasSteerer": "stas.methods",
    "METHODS": "stas.methods",
    "apply_stas": "stas.apply",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stas' has no attribute {name!r}")
