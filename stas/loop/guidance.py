"""The `guidance` config group: which diffusers guider (`diffusers.guiders`) combines the branch predictions in
stas's own loop, with its own keyword arguments (`guidance.params`), and, for a method that changes the transformer
instead (Enhance-A-Video), that change. The guidance scale comes from the model config, per step as the family's
pipeline computes it (stas.backbones: `step_expert`)."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from stas.errors import ConfigError
from stas.methods.enhance_a_video import EnhanceAVideo


@dataclass(frozen=True)
class Guidance:
    """One option of the guidance group: its diffusers guider, what a step costs, where it comes from."""

    guider: str  # the diffusers.guiders class
    passes: str  # transformer passes (NFE) per step, with CFG on
    source: str  # the paper, and the code stas runs
    change: type | None = None  # a Method that changes the transformer during the run (stas.methods)
    change_params: dict[str, str] = field(default_factory=dict)  # guidance.params key -> the change's argument


GUIDANCE = {
    "cfg": Guidance("ClassifierFreeGuidance", "2", "Ho & Salimans 2207.12598; diffusers ClassifierFreeGuidance"),
    "cfg_zero_star": Guidance("ClassifierFreeZeroStarGuidance", "2",
                              "Fan et al. 2503.18886; diffusers ClassifierFreeZeroStarGuidance"),
    "apg": Guidance("AdaptiveProjectedGuidance", "2", "Sadat et al. 2410.02416; diffusers AdaptiveProjectedGuidance"),
    "slg": Guidance("SkipLayerGuidance", "3 inside its window, else 2",
                    "Stability AI SD3.5 / STG (Hyung et al. 2411.18664); diffusers SkipLayerGuidance"),
    "pag": Guidance("PerturbedAttentionGuidance", "3 inside its window, else 2",
                    "Ahn et al. 2403.17377; diffusers PerturbedAttentionGuidance"),
    "enhance_a_video": Guidance("ClassifierFreeGuidance", "2 (plus a temporal attention map per self-attention)",
                                "Luo et al. 2502.07508; stas.methods.enhance_a_video (diffusers has none)",
                                EnhanceAVideo, {"enhance_weight": "weight", "enhance_start": "start",
                                                "enhance_stop": "stop"}),
}
# HunyuanVideo (guidance-distilled): model.true_cfg_scale instead (Backbone.step_expert, Backbone.uses_cfg)
SET_BY_THE_LOOP = {"guidance_scale": "model.guidance_scale (HunyuanVideo: model.true_cfg_scale)",
                   "enabled": "model.guidance_scale > 1 (HunyuanVideo: model.true_cfg_scale > 1)"}


class GuidesEveryStep:
    """Mixed into a diffusers guider: whether it guides is decided once per video, as the pipelines decide it
    (guidance_scale > 1: `denoise` enables or disables the guider), not again at every step from that step's scale.

    diffusers' guiders skip the uncond pass at a step whose scale is within math.isclose of 1 (of 0 with
    use_original_formulation) and return the cond prediction; the pipelines still compute uncond + scale * (cond -
    uncond) there. CogVideoX's dynamic CFG sets the scale per step and can come that close: 1 + 2.5e-13 at the
    second of 3 DDIM steps (t=333, guidance_scale 6), where the plain guider skips the uncond rows and its frames
    differ from `pipe(...)`'s. The start/stop window of the guider still applies, as diffusers checks it."""

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        steps = self._num_inference_steps
        return int(self._start * steps) <= self._step < int(self._stop * steps)

    _is_apg_enabled = _is_cfg_enabled  # AdaptiveProjectedGuidance's name for the same decision


@functools.cache
def guider_class(name: str) -> type:
    import diffusers.guiders

    base = getattr(diffusers.guiders, GUIDANCE[name].guider)
    return type(base.__name__, (GuidesEveryStep, base), {"__module__": __name__})


def guidance_params(guidance_cfg) -> dict:
    """guidance.params as plain Python values (nested mappings too, e.g. slg's skip_layer_config)."""
    params = guidance_cfg.params
    return dict(OmegaConf.to_container(params, resolve=True) if OmegaConf.is_config(params) else params)


def make_guider(guidance_cfg):
    """The diffusers guider of a `guidance` config (its scale is set per step by the loop); a ConfigError names a
    parameter the guider does not take or refuses."""
    name = str(guidance_cfg.name)
    spec, cls = GUIDANCE[name], guider_class(name)
    params = {key: value for key, value in guidance_params(guidance_cfg).items() if key not in spec.change_params}
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - set(SET_BY_THE_LOOP)
    for key in params:
        if key in SET_BY_THE_LOOP:
            raise ConfigError(f"guidance.params.{key} is set by the loop from {SET_BY_THE_LOOP[key]}; set that instead")
        if key not in allowed:
            raise ConfigError(f"guidance.params.{key} is not a parameter of diffusers' {cls.__name__} "
                              f"(guidance={name}); parameters: {', '.join(sorted({*allowed, *spec.change_params}))}")
    if "skip_layer_guidance_layers" in params:
        # diffusers 0.42's SkipLayerGuidance makes LayerSkipConfig(indices=<one int>) of each listed layer, which
        # its hook cannot take (len() of an int): the same skip as one config listing the layers.
        layers = params.pop("skip_layer_guidance_layers")
        params["skip_layer_config"] = {"indices": [layers] if isinstance(layers, int) else list(layers), "fqn": "auto"}
    try:
        with _quiet_guider_warning():
            return cls(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"guidance={name} with params {params}: {err}") from None


def make_changes(guidance_cfg, backbone) -> tuple:
    """The Methods that change the transformer for a guidance (Enhance-A-Video), with their guidance.params."""
    spec = GUIDANCE[str(guidance_cfg.name)]
    if spec.change is None:
        return ()
    params = guidance_params(guidance_cfg)
    return (spec.change(backbone, **{argument: params[key] for key, argument in spec.change_params.items()
                                     if key in params}),)


def skipped_layers(guider) -> list[int]:
    """The blocks a skip-layer or perturbed-attention guider perturbs (none for other guiders)."""
    return sorted({index for config in getattr(guider, "skip_layer_config", None) or ()
                   for index in config.indices})


@contextmanager
def _quiet_guider_warning():
    """diffusers warns that guiders are experimental on every construction (validation builds one too): stas names its
    guider in the config and the run's identity instead."""
    from diffusers.utils import logging

    logger = logging.get_logger("diffusers.guiders.guider_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
