"""Checks of a model config beyond its ranges (stas.config.validation.validate_model): the steps the family's
pipeline can take, a second expert transformer and true CFG where the family has them, the tiny twins' sizes and
planted massive activations."""

from __future__ import annotations

from stas.backbones import FAMILIES, Backbone
from stas.errors import ConfigError
from stas.loop import OwnedLoop

PLANT_MAGNITUDE_MAX = 1e4  # planted MAs far beyond this overflow the tiny twins' activations


def check_steps(model, backbone: Backbone) -> None:
    if model.steps < backbone.min_steps:
        raise ConfigError(f"model.steps={model.steps} is too few for family {model.family}: its pipeline's scheduler "
                          f"needs at least {backbone.min_steps} steps")


def check_matched_steps(guidance_name: str, guider, model, backbone: Backbone) -> None:
    """guidance.match_nfe: the steps it leaves a guidance with extra passes must be steps the pipeline can take."""
    steps = OwnedLoop(backbone, guider).steps_matching_nfe(model.steps,
                                                           backbone.uses_cfg(backbone.pipeline_kwargs(model)))
    if steps < backbone.min_steps:
        raise ConfigError(f"guidance.match_nfe=true leaves guidance={guidance_name} {steps} step(s) at "
                          f"model.steps={model.steps}, fewer than family {model.family}'s pipeline takes "
                          f"({backbone.min_steps}); raise model.steps or set guidance.match_nfe=false")


def check_experts(model, backbone: Backbone) -> None:
    """model.boundary_ratio and model.guidance_scale_2: a second expert transformer where the family has one."""
    for name in ("boundary_ratio", "guidance_scale_2"):
        if getattr(model, name, None) is not None and not backbone.takes_experts:
            families = ", ".join(family for family, cls in FAMILIES.items() if cls.takes_experts)
            raise ConfigError(f"model.{name} is set, but family {model.family} has one transformer (a second expert "
                              f"is WanPipeline's transformer_2: families {families})")
    if getattr(model, "guidance_scale_2", None) is not None and getattr(model, "boundary_ratio", None) is None:
        raise ConfigError(f"model.guidance_scale_2={model.guidance_scale_2} needs model.boundary_ratio (the switch to "
                          "the second expert transformer, transformer_2, whose guidance scale it is)")


def check_true_cfg(model, backbone: Backbone) -> None:
    """model.true_cfg_scale: only where the pipeline takes it (HunyuanVideo)."""
    if model.true_cfg_scale != 1.0 and not backbone.takes_true_cfg:
        raise ConfigError(f"model.true_cfg_scale={model.true_cfg_scale} is HunyuanVideo's; {model.name}'s pipeline "
                          "has none (its CFG is model.guidance_scale): leave it at 1.0")


def check_tiny(model, backbone: Backbone) -> None:
    """A tiny twin's sizes against the model's, and its planted MAs."""
    tiny = model.tiny
    if tiny.num_single_layers and backbone.single_blocks_attr is None:
        raise ConfigError(f"model.tiny.num_single_layers={tiny.num_single_layers}, but family {model.family} has one "
                          "block list (single-stream blocks are HunyuanVideo's): set it to 0")
    layers = tiny.num_layers + tiny.num_single_layers
    if (model.num_layers, model.hidden_dim) != (layers, tiny.num_heads * tiny.head_dim):
        raise ConfigError(
            f"model.num_layers={model.num_layers} and model.hidden_dim={model.hidden_dim} must equal "
            f"model.tiny.num_layers+num_single_layers={layers} and num_heads*head_dim={tiny.num_heads * tiny.head_dim}"
        )
    for name in ("plant", "plant_2"):
        if tiny.get(name) is not None and tiny[name].enabled:
            check_plant(f"model.tiny.{name}", tiny[name], model.hidden_dim)


def check_plant(path: str, plant, hidden_dim: int) -> None:
    """A tiny twin's planted MAs (model.tiny.plant, model.tiny.plant_2): channels that exist, finite magnitudes."""
    for channel in plant.channels:
        if not 0 <= channel < hidden_dim:
            raise ConfigError(f"{path}.channels contains {channel}; allowed: 0..{hidden_dim - 1}")
    for magnitude in plant.magnitudes:
        if not abs(magnitude) <= PLANT_MAGNITUDE_MAX:
            raise ConfigError(f"{path}.magnitudes contains {magnitude!r}; allowed: finite numbers in "
                              f"[-{PLANT_MAGNITUDE_MAX:g}, {PLANT_MAGNITUDE_MAX:g}]")
    if len(plant.channels) != len(plant.magnitudes):
        raise ConfigError(f"{path}.channels and {path}.magnitudes must have equal length")
