"""Wan2.2-A14B's two expert transformers (WanPipeline's transformer and transformer_2) on the tiny twin
tiny_wan22_a14b: both experts steered inside the window, the step index continuous across the switch, the analysis
and the calibration per expert. At 10 steps the twin runs steps 0-2 on transformer and 3-9 on transformer_2, so the
default window [0, 0.4) (steps 0-3) spans the switch."""

from __future__ import annotations

import pytest
import torch
import yaml

from stas.config import ConfigError, validate
from stas.core.layout import TokenLayout
from stas.core.massive import load_calibration
from stas.generation import make_loop, make_steerer, run_pipeline
from stas.loggers import RunLogger
from stas.ma.analysis import DIMS_FILE, analyze
from stas.methods.hooks import DenoisingTracker
from stas.prompts import Item

from conftest import build_twin, compose

TWIN = "tiny_wan22_a14b"
ITEM = Item(0, "a red fox runs through fresh snow", 0, 3)
FIRST, SECOND = [5, 17, 26], [9, 40, 77]  # the channels planted in transformer and in transformer_2
SWITCH = 3  # the first step on transformer_2


@pytest.fixture(scope="module")
def twin():
    return build_twin(TWIN)[1:]


def sample(backbone, pipe, cfg, steerer, loop):
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    with steerer.attach(backbone.experts(pipe)):
        frames = run_pipeline(pipe, ITEM, backbone.pipeline_kwargs(cfg.model), steerer, layout, loop).frames[0]
        return frames, steerer.record()


def test_the_twin_has_two_experts_with_their_own_weights_and_switch(twin):
    backbone, pipe = twin
    experts = backbone.experts(pipe)
    assert list(experts) == ["transformer", "transformer_2"] and pipe.config.boundary_ratio == 0.9
    first, second = (dict(module.named_parameters())["proj_out.weight"] for module in experts.values())
    assert not torch.equal(first, second)
    assert backbone.pipeline_kwargs(compose([f"model={TWIN}"]).model)["guidance_scale_2"] == 3.0


@pytest.mark.parametrize("owned", [True, False], ids=["owned_loop", "pipeline_loop"])
def test_both_experts_steered_inside_the_window_with_a_continuous_step_index(twin, owned):
    """The window [0, 0.4) of 10 steps spans the switch: steps 0-2 on transformer, step 3 on transformer_2; under
    the pipeline's own loop (calls counted) as under stas's (calls announced)."""
    backbone, pipe = twin
    cfg = compose([f"model={TWIN}", "logger=none", "steer=stas"])
    steerer = make_steerer(cfg, backbone)
    seen = []
    steerer.tracker.listeners.append(lambda: seen.append((steerer.tracker.step, steerer.tracker.expert)))
    _, record = sample(backbone, pipe, cfg, steerer, make_loop(cfg, backbone) if owned else None)
    expected = [(step, "transformer" if step < SWITCH else "transformer_2") for step in range(10) for _ in "cu"]
    assert seen == expected  # every call of both experts counted, the step index going on across the switch
    assert record["steps"] == [0, 1, 2, 3] and record["layers"] == [0, 1]
    assert record["experts"] == {"transformer": [0, 1, 2], "transformer_2": [3]}
    assert record["hook_calls"] == 4 * 2 * 2 and record["values_steered"] > 0


def test_steering_changes_the_low_noise_expert_too(twin):
    """A window of transformer_2's steps only steers (and so changes the frames) through transformer_2's hooks."""
    backbone, pipe = twin
    late = compose([f"model={TWIN}", "logger=none", "steer=stas", "steer.window.unit=steps", "steer.window.start=3",
                    "steer.window.end=5"])
    steered, record = sample(backbone, pipe, late, make_steerer(late, backbone), make_loop(late, backbone))
    assert record["experts"] == {"transformer": [], "transformer_2": [3, 4]} and record["values_steered"] > 0
    vanilla = compose([f"model={TWIN}", "logger=none", "steer=none"])
    kwargs = backbone.pipeline_kwargs(vanilla.model)
    layout = TokenLayout.for_video(backbone, 64, 96, 17)
    plain = run_pipeline(pipe, ITEM, kwargs, None, layout, make_loop(vanilla, backbone)).frames[0]
    assert not (plain == steered).all()


def test_analysis_names_each_steps_expert_and_calibrates_each_expert(twin, tmp_path):
    backbone, pipe = twin
    cfg = compose([f"model={TWIN}", "logger=none", "progress=false", "prompts.limit=3", "model.steps=6",
                   "analysis.plots=[]"], config_name="analyze")
    with RunLogger(cfg, tmp_path, job_type="analyze") as logger:
        result = analyze(cfg, tmp_path, backbone, logger, pipe=pipe)
    summary = result.summary
    assert "  experts: transformer steps 0-1; transformer_2 steps 2-5" in str(result)
    # 6 steps at shift 3: t = 999, 946, 875, ... -> steps 0-1 on transformer (t >= 900)
    assert summary["experts"] == {"transformer": [0, 1], "transformer_2": [2, 3, 4, 5]}
    experts = summary["results"]["vanilla"]["experts"]
    for layer in ("0", "1"):
        assert experts["transformer"]["layers"][layer]["massive"] == FIRST
        assert experts["transformer_2"]["layers"][layer]["massive"] == SECOND
    dims = yaml.safe_load((tmp_path / DIMS_FILE).read_text())
    assert dims["experts"]["transformer"]["layers"][0]["massive"] == FIRST
    assert dims["experts"]["transformer_2"]["layers"][1]["massive"] == SECOND
    loaded = load_calibration(tmp_path / DIMS_FILE, "calibrated", backbone)
    # "*" (for an expert the file does not list): over both experts' steps, where transformer_2 ran 4 of the 6, so
    # only its channels are massive in at least half of them: why each expert needs its own
    assert loaded == {"*": {0: SECOND, 1: SECOND}, "transformer": {0: FIRST, 1: FIRST},
                      "transformer_2": {0: SECOND, 1: SECOND}}

    # calibrated steering: each expert steers its own channels
    steer = compose([f"model={TWIN}", "logger=none", "steer=stas", "steer.dims=calibrated",
                     f"steer.calibration={tmp_path / DIMS_FILE}"])
    validate(steer)
    _, record = sample(backbone, pipe, steer, make_steerer(steer, backbone), make_loop(steer, backbone))
    assert record["channels"] == {"transformer": {0: FIRST, 1: FIRST}, "transformer_2": {0: SECOND, 1: SECOND}}
    assert record["values_steered"] == 4 * 2 * 2 * 3 * record["tokens"]  # steps x calls x blocks x channels x tokens


def test_a_second_expert_is_refused_where_the_family_has_one_transformer():
    with pytest.raises(ConfigError, match="model.boundary_ratio is set, but family cogvideox has one transformer"):
        validate(compose(["model=tiny_cogvideox", "logger=none", "model.boundary_ratio=0.5"]))
    with pytest.raises(ConfigError, match="model.guidance_scale_2=3.0 needs model.boundary_ratio"):
        validate(compose(["model=tiny_wan21", "logger=none", "model.guidance_scale_2=3"]))
    with pytest.raises(ConfigError, match=r"model.boundary_ratio=1.5 must be a finite number in \[0, 1\]"):
        validate(compose([f"model={TWIN}", "logger=none", "model.boundary_ratio=1.5"]))


def test_the_tracker_names_the_expert_of_a_counted_call():
    from stas.backbones import get_backbone

    tracker = DenoisingTracker(get_backbone(TWIN))
    tracker.begin(TokenLayout(5, 4, 6), 4, do_cfg=True)
    assert tracker.counted_call("transformer_2").expert == "transformer_2"


def test_apply_stas_on_a_users_two_expert_pipeline_steers_both_experts(twin):
    """stas.apply_stas on a WanPipeline with transformer_2 called as users call it (`pipe(...)`): both experts'
    calls counted, the window spanning the switch steered on both."""
    import stas

    backbone, pipe = twin
    kwargs = backbone.pipeline_kwargs(compose([f"model={TWIN}"]).model)
    experts = backbone.experts(pipe).values()
    hooks = [(len(module._forward_pre_hooks), len(module._forward_hooks)) for module in experts]
    with stas.apply_stas(pipe, window={"start": 2, "end": 5, "unit": "steps"}) as steering:
        with torch.inference_mode():
            pipe(prompt=ITEM.prompt, generator=torch.Generator().manual_seed(3), **kwargs)
        record = steering.record()
    assert record["steps"] == [2, 3, 4] and record["experts"] == {"transformer": [2], "transformer_2": [3, 4]}
    # every hook gone from both (the twin's planted-MA hooks stay)
    assert [(len(module._forward_pre_hooks), len(module._forward_hooks)) for module in experts] == hooks
