"""stas.apply_stas on pipelines called as users call them: the frames of `python -m stas.run`'s path, and exactly
the vanilla pipeline again once removed."""

import numpy as np
import pytest
import torch

import stas
from stas.backbones import backbone_of_pipeline
from stas.core.layout import TokenLayout
from stas.errors import ConfigError
from stas.generation import make_steerer, sample, to_uint8
from stas.prompts import Item

from conftest import compose

FAMILIES = ["tiny_wan21", "tiny_wan22", "tiny_cogvideox", "tiny_ltx"]
ITEM = Item(0, "a red fox runs through fresh snow", 0, 7)
STEPS = 4


def user_call(pipe, cfg, backbone, **extra):
    """The pipeline called as a user script would: prompt, generator, sampling arguments."""
    kwargs = {**backbone.pipeline_kwargs(cfg.model), "num_inference_steps": STEPS, **extra}
    generator = torch.Generator(device="cpu").manual_seed(ITEM.seed)
    with torch.inference_mode():
        return to_uint8(pipe(prompt=ITEM.prompt, generator=generator, **kwargs).frames[0])


def stas_run_frames(tiny_pipelines, name, *overrides):
    """The frames stas.run's generation path makes for ITEM with `overrides`."""
    cfg, backbone, pipe = tiny_pipelines[name]
    run_cfg = compose([f"model={name}", "logger=none", f"model.steps={STEPS}", *overrides])
    steerer = make_steerer(run_cfg, backbone)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    with steerer.attach(pipe.transformer):
        frames = sample(pipe, ITEM, dict(backbone.pipeline_kwargs(cfg.model), num_inference_steps=STEPS), steerer,
                        layout)
    return frames, steerer.record()


@pytest.mark.parametrize("name", FAMILIES)
def test_apply_stas_equals_stas_run_and_removal_restores_the_pipeline(tiny_pipelines, name):
    cfg, backbone, pipe = tiny_pipelines[name]
    vanilla = user_call(pipe, cfg, backbone)
    expected, expected_record = stas_run_frames(tiny_pipelines, name, "steer.alpha=1.5", "steer.targets=boundary")
    with stas.apply_stas(pipe, alpha=1.5, targets="boundary") as steering:
        steered = user_call(pipe, cfg, backbone)
        again = user_call(pipe, cfg, backbone)  # a second call begins afresh (new timesteps)
        record = steering.record()
    assert np.array_equal(steered, expected) and np.array_equal(again, expected)
    assert record == expected_record and record["values_steered"] > 0
    assert not np.array_equal(steered, vanilla)
    assert np.array_equal(user_call(pipe, cfg, backbone), vanilla)  # removed: bit for bit the pipeline again


def test_remove_without_a_with_block_and_options_reach_the_hooks(tiny_pipelines):
    cfg, backbone, pipe = tiny_pipelines["tiny_wan21"]
    vanilla = user_call(pipe, cfg, backbone)
    handle = stas.apply_stas(pipe, dims=[5, 17], layers=[1], window={"start": 0, "end": 2, "unit": "steps"},
                             branches="cond", detect="channel_peak")
    steered = user_call(pipe, cfg, backbone)
    record = handle.record()
    handle.remove()
    assert record["layers"] == [1] and record["steps"] == [0, 1] and record["branches"] == ["cond"]
    assert record["channels"] == {1: [5, 17]} and record["detection"]["rule"] == "channel_peak"
    assert not np.array_equal(steered, vanilla)
    assert np.array_equal(user_call(pipe, cfg, backbone), vanilla)


def test_the_number_of_steps_and_cfg_come_from_each_call(tiny_pipelines):
    cfg, backbone, pipe = tiny_pipelines["tiny_cogvideox"]
    with stas.apply_stas(pipe) as steering:
        user_call(pipe, cfg, backbone, num_inference_steps=5)
        assert steering.record()["steps"] == [0, 1]  # the default window [0, 0.4) of 5 steps
        user_call(pipe, cfg, backbone, num_inference_steps=10, guidance_scale=1.0)
        record = steering.record()
    assert record["steps"] == [0, 1, 2, 3] and record["branches"] == ["cond"]  # no CFG: only the cond branch


def test_a_pipeline_built_outside_stas_is_recognised(tiny_pipelines):
    """A WanPipeline made from diffusers classes directly (no planted MAs): its family and sizes come from the
    pipeline; fixed channels are steered and removal restores it."""
    import diffusers

    cfg, backbone, twin = tiny_pipelines["tiny_wan21"]
    torch.manual_seed(0)
    vae, transformer, scheduler = backbone.tiny_components(diffusers, cfg.model.tiny, cfg.model)
    pipe = diffusers.WanPipeline(tokenizer=twin.tokenizer, text_encoder=twin.text_encoder, vae=vae,
                                 transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    found = backbone_of_pipeline(pipe, "mine")
    assert (type(found).family, found.num_layers, found.hidden_dim) == ("wan21", 2, 128)
    vanilla = user_call(pipe, cfg, backbone)
    with stas.apply_stas(pipe, dims=[3, 9], rule="scale", alpha=4.0):
        steered = user_call(pipe, cfg, backbone)
    assert not np.array_equal(steered, vanilla)
    assert np.array_equal(user_call(pipe, cfg, backbone), vanilla)


@pytest.mark.parametrize("options,message", [
    ({"alpah": 1.0}, r"apply_stas option 'alpah' does not exist; allowed: alpha, boundary_unit, "),
    ({"alpha": "high"}, r"apply_stas option alpha='high': Value 'high' of type 'str' could not be converted to Float"),
    ({"rule": "clip"}, r"steer.rule='clip' is not a rule; allowed: max_scaled"),
    ({"dims": [500]}, r"steer.dims=\[500\]: a channel list must be non-empty integers in 0..127"),
    ({"targets": "middle"}, r"steer.targets='middle'"),
    ({"detect": "median"}, r"detect='median' is not an option; available: channel_peak, mean_abs, sun"),
    ({"detect": {"rule": "sun", "ratio": -1.0}}, r"^detect.ratio=-1.0 must be > 0$"),
    ({"detect": {"rulez": "sun"}}, r"apply_stas detect field 'rulez' does not exist; allowed: branches, floor, "),
    ({"dims": "calibrated"}, r"steer.dims=calibrated needs steer.calibration"),
])
def test_bad_options_name_the_option(tiny_pipelines, options, message):
    _, _, pipe = tiny_pipelines["tiny_wan21"]
    with pytest.raises(ConfigError, match=message):
        stas.apply_stas(pipe, **options)


def test_an_unknown_pipeline_is_refused():
    class NotAPipeline:
        pass

    with pytest.raises(Exception, match=r"NotAPipeline is no family stas knows \(supported pipelines: "
                                        r"CogVideoXPipeline, HunyuanVideoPipeline, LTXPipeline, WanPipeline\)"):
        stas.apply_stas(NotAPipeline())
