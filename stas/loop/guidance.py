"""The `guidance` config group: which diffusers guider (`diffusers.guiders`) combines the branch predictions in
stas's own loop, with its own keyword arguments (`guidance.params`). The guidance scale comes from the model config,
per step as the family's pipeline computes it (stas.backbones: `step_expert`)."""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

from stas.errors import ConfigError

# guidance.name -> the diffusers.guiders class
GUIDERS = {"cfg": "ClassifierFreeGuidance", "cfg_zero_star": "ClassifierFreeZeroStarGuidance",
           "apg": "AdaptiveProjectedGuidance"}
SET_BY_THE_LOOP = {"guidance_scale": "model.guidance_scale", "enabled": "model.guidance_scale (> 1: CFG)"}


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

    base = getattr(diffusers.guiders, GUIDERS[name])
    return type(base.__name__, (GuidesEveryStep, base), {"__module__": __name__})


def make_guider(guidance_cfg):
    """The diffusers guider of a `guidance` config (its scale is set per step by the loop); a ConfigError names a
    parameter the guider does not take or refuses."""
    name, params = str(guidance_cfg.name), dict(guidance_cfg.params)
    cls = guider_class(name)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - set(SET_BY_THE_LOOP)
    for key in params:
        if key in SET_BY_THE_LOOP:
            raise ConfigError(f"guidance.params.{key} is set by the loop from {SET_BY_THE_LOOP[key]}; set that instead")
        if key not in allowed:
            raise ConfigError(f"guidance.params.{key} is not a parameter of diffusers' {cls.__name__} "
                              f"(guidance={name}); parameters: {', '.join(sorted(allowed))}")
    try:
        with _quiet_guider_warning():
            return cls(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"guidance={name} with params {params}: {err}") from None


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
