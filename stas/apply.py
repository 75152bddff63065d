"""`stas.apply_stas(pipe, **options)`: STAS on a diffusers pipeline a user built, in the style of diffusers'
`apply_layer_skip` / `enable_cache`.

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
    with stas.apply_stas(pipe, alpha=1.0, targets="first_frame+boundary") as steering:
        video = pipe(prompt, num_inference_steps=50).frames[0]     # called as usual
        print(steering.record())                                    # what the last call steered
    # out of the block (or after steering.remove()): the pipeline computes exactly what it did before

The options are the fields of the `steer` config (README, "Steering") plus `detect` (a rule name of the `detect`
group, or a dict of its fields) and `calibration` (an ma_dims.yaml for `dims="calibrated"`). The same hooks as
`python -m stas.run` run, so the frames equal that command's for the same settings. The pipeline's family comes from
the pipeline itself (stas.backbones.backbone_of_pipeline); each pipeline call is recognised by the scheduler's new
timesteps, which tell the number of steps, and its latents, which tell the token grid.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stas.backbones import backbone_of_pipeline
from stas.config.schema import DetectConfig, SteerConfig, load_group_option
from stas.config.validation import check_steer_options, validate_detect
from stas.core.layout import TokenLayout
from stas.errors import ConfigError
from stas.methods.stas import StasSteerer, steering_calibration


def apply_stas(pipe, *, detect: str | dict = "mean_abs", calibration: str | None = None, model: str | None = None,
               **steer) -> "StasHandle":
    """Attach STAS to `pipe` (a WanPipeline, Wan2.2-TI2V's WanImageToVideoPipeline, a CogVideoXPipeline or a
    HunyuanVideoPipeline): returns a handle to `remove()` it, usable as a context manager. `steer`: fields of the
    steer config (rule, alpha, strength, targets, boundary_width, boundary_unit, dims, layers, window, branches,
    reference, compile_hook); `model`: the model name a calibration was made for (default: the checkpoint the
    pipeline was loaded from). A bad option raises ConfigError naming it."""
    backbone = backbone_of_pipeline(pipe, model)
    steer_cfg = _options(SteerConfig, {**steer, "calibration": calibration}, "apply_stas option")
    detect_cfg = (load_group_option("detect", detect) if isinstance(detect, str)
                  else _options(DetectConfig, detect, "apply_stas detect field"))
    check_steer_options(steer_cfg, backbone, backbone)
    validate_detect(detect_cfg, steer_cfg)
    steerer = StasSteerer(backbone, steer_cfg, steering_calibration(steer_cfg, backbone), detect_cfg)
    return StasHandle(pipe, backbone, steerer)


def _options(schema, values: dict, what: str):
    """`values` merged onto the schema's defaults; a key or type the schema does not take is a ConfigError."""
    base = OmegaConf.structured(schema)
    for key, value in values.items():
        if key not in base:
            raise ConfigError(f"{what} {key!r} does not exist; allowed: {', '.join(sorted(base))}")
        try:
            base = OmegaConf.merge(base, {key: value})  # a dict merges into a nested node (window)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{what} {key}={value!r}: {' '.join(str(err).split()).split(' full_key')[0]}") from None
    return base


class StasHandle:
    """STAS attached to a pipeline's transformer: `record()` after a call, `remove()` (or leave the `with` block)
    to take every hook off."""

    def __init__(self, pipe, backbone, steerer: StasSteerer):
        self.pipe, self.backbone, self.steerer = pipe, backbone, steerer
        self._timesteps = None  # the scheduler's timesteps of the pipeline call in progress
        # The first transformer call's timestep, while the call's second transformer call has to tell whether the
        # pipeline runs CFG (Backbone.pipeline_call_cfg: None)
        self._first_timestep = None
        self._stack = ExitStack()
        experts = backbone.experts(pipe)  # every expert transformer (Wan2.2-A14B: transformer, transformer_2)
        # Before the steerer's own pre-hook (prepend): a new pipeline call must begin before its first step counts.
        for transformer in experts.values():
            self._stack.callback(transformer.register_forward_pre_hook(self._on_call, with_kwargs=True,
                                                                       prepend=True).remove)
        self._stack.enter_context(steerer.attach(experts))

    def _on_call(self, transformer, args, kwargs) -> None:
        timesteps, timestep = self.pipe.scheduler.timesteps, kwargs.get("timestep")
        if timesteps is self._timesteps:
            if self._first_timestep is not None:  # two-pass CFG calls the transformer twice at a timestep
                self.steerer.tracker.set_cfg(bool(torch.equal(timestep, self._first_timestep)))
                self._first_timestep = None
            return
        # set_timesteps made new timesteps: a new pipeline call (also after an interrupted one)
        self._timesteps = timesteps
        layout = TokenLayout(*self.backbone.grid_of_call(args, kwargs))
        do_cfg = self.backbone.pipeline_call_cfg(self.pipe)
        self._first_timestep = timestep.clone() if do_cfg is None else None
        self.steerer.begin(layout, len(timesteps), do_cfg=bool(do_cfg))

    def record(self) -> dict:
        """What the last pipeline call steered (layers, steps, branches, tokens, channels, values, reference)."""
        return self.steerer.record()

    def remove(self) -> None:
        self._stack.close()
        self._timesteps = self._first_timestep = None

    def __enter__(self) -> "StasHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
