"""Backbones: one Backbone subclass per diffusers family (families/), the registry of model configs, pipeline
loading and the tiny twins. Nothing outside this package compares family names: it asks its Backbone."""

from stas.backbones.base import (CFG_BRANCHES, DTYPES, FAMILIES, Backbone, BackboneError, DenoisingRun, Expert,
                                 register_family)
from stas.backbones.compile import COMPILE_MODES, compile_counts, compile_transformer, reset_compiler
from stas.backbones.memory import GROUP_OFFLOAD_MODES, LAYERWISE_CASTING_DTYPES
from stas.backbones.loading import check_pipeline_matches, load_pipeline, resolve_device, start_ranks
from stas.backbones.registry import available_models, backbone_from_config, backbone_of_pipeline, get_backbone

__all__ = [
    "CFG_BRANCHES", "COMPILE_MODES", "GROUP_OFFLOAD_MODES", "LAYERWISE_CASTING_DTYPES", "compile_counts",
    "compile_transformer", "reset_compiler", "DTYPES", "FAMILIES", "Backbone", "BackboneError", "DenoisingRun",
    "Expert", "register_family",
    "check_pipeline_matches", "load_pipeline", "resolve_device", "start_ranks", "available_models", "backbone_from_config",
    "backbone_of_pipeline", "get_backbone",
]
