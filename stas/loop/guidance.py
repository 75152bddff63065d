"""The `guidance` config group: which diffusers guider (`diffusers.guiders`) combines the branch predictions in
stas's own loop. Only what the config names is built; the guidance scale comes from the model config, per step as
the family's pipeline computes it (stas.backbones: `step_expert`)."""

from __future__ import annotations

import functools

# guidance.name -> the diffusers.guiders class
GUIDERS = {"cfg": "ClassifierFreeGuidance"}


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


@functools.cache
def guider_class(name: str) -> type:
    import diffusers.guiders

    base = getattr(diffusers.guiders, GUIDERS[name])
    return type(base.__name__, (GuidesEveryStep, base), {"__module__": __name__})


def make_guider(guidance_cfg):
    """The diffusers guider of a `guidance` config (its scale is set per step by the loop)."""
    return guider_class(str(guidance_cfg.name))()
