"""STAS hooks on the real tiny pipelines of every family."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from stas.generation import make_steerer, sample
from stas.methods.stas import StasSteerer
from stas.methods.steering_hook import LayerSteering
from stas.core.layout import TokenLayout
from stas.core.massive import Detection, massive_channel_mask
from stas.prompts import Item
from stas.core.rules import RULES, apply_rule

from conftest import compose

FAMILIES = ["tiny_wan21", "tiny_wan22", "tiny_wan22_a14b", "tiny_cogvideox", "tiny_cogvideox15", "tiny_ltx"]  # CFG on
EVERY_FAMILY = [*FAMILIES, "tiny_hunyuanvideo"]  # its twin runs one branch (true CFG off)
ITEM = Item(0, "a red fox runs through fresh snow", 0, 7)
STEPS = 4


def steer_cfg(name, *overrides):
    return compose([f"model={name}", "logger=none", f"model.steps={STEPS}", *overrides])


def run(pipelines, name, steerer):
    cfg, backbone, pipe = pipelines[name]
    kwargs = dict(backbone.pipeline_kwargs(cfg.model), num_inference_steps=STEPS)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    if steerer is None:
        return sample(pipe, ITEM, kwargs, None, layout)
    with steerer.attach(backbone.experts(pipe)):  # both of Wan2.2-A14B's experts
        return sample(pipe, ITEM, kwargs, steerer, layout)


def steerer_for(pipelines, name, *overrides):
    cfg = steer_cfg(name, *overrides)
    return make_steerer(cfg, pipelines[name][1])


@pytest.mark.parametrize("name", EVERY_FAMILY)
def test_empty_window_equals_vanilla_and_steering_changes_the_video(tiny_pipelines, name):
    vanilla = run(tiny_pipelines, name, None)
    # [0, 0.05) of 4 steps rounds to no step at all
    empty = run(tiny_pipelines, name, steerer_for(tiny_pipelines, name, "steer.window.end=0.05"))
    assert np.array_equal(empty, vanilla)
    steered = run(tiny_pipelines, name, steerer_for(tiny_pipelines, name))
    assert steered.shape == vanilla.shape
    assert np.abs(steered.astype(int) - vanilla.astype(int)).max() > 0
    # detached: the pipeline is vanilla again, bit for bit
    assert np.array_equal(run(tiny_pipelines, name, None), vanilla)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("branches", ["cond", "uncond", "both"])
def test_hook_fires_exactly_on_configured_steps_layers_branches(tiny_pipelines, name, branches):
    steerer = steerer_for(tiny_pipelines, name, "steer.window.unit=steps", "steer.window.start=1",
                          "steer.window.end=3", "steer.layers=[1]", f"steer.branches={branches}")
    run(tiny_pipelines, name, steerer)
    batched = tiny_pipelines[name][1].cfg_layout == "batched"
    if branches == "both":
        names = ["cond+uncond"] if batched else ["cond", "uncond"]
    else:
        names = [branches]
    assert steerer.calls == Counter({(1, step, b): 1 for step in (1, 2) for b in names})
    record = steerer.record()
    assert record["layers"] == [1] and record["steps"] == [1, 2]


@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_batched_cfg_steers_only_the_configured_half(tiny_pipelines, branch):
    cfg, backbone, pipe = tiny_pipelines["tiny_cogvideox"]
    outputs = {}

    def spy(block, args, output):  # registered after the steering hook, so it sees the steered output
        if len(outputs) == 0:
            outputs["first"] = output[0].clone()

    handle = backbone.blocks(pipe.transformer)[0].register_forward_hook(spy)
    try:
        run(tiny_pipelines, "tiny_cogvideox", None)
        vanilla = outputs.pop("first")
        steerer = steerer_for(tiny_pipelines, "tiny_cogvideox", "steer.layers=[0]", f"steer.branches={branch}")
        handle.remove()
        with steerer.attach(pipe.transformer):
            handle = backbone.blocks(pipe.transformer)[0].register_forward_hook(spy)
            layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
            kwargs = dict(backbone.pipeline_kwargs(cfg.model), num_inference_steps=STEPS)
            sample(pipe, ITEM, kwargs, steerer, layout)
    finally:
        handle.remove()
    steered = outputs["first"]
    uncond, cond = slice(0, 1), slice(1, 2)  # the pipeline batches [uncond, cond]
    kept, changed = (uncond, cond) if branch == "cond" else (cond, uncond)
    assert torch.equal(steered[kept], vanilla[kept])
    assert not torch.equal(steered[changed], vanilla[changed])


@pytest.mark.parametrize("name", EVERY_FAMILY)
@pytest.mark.parametrize("rule", RULES)
def test_in_place_hook_equals_apply_rule(tiny_pipelines, name, rule):
    """The fast in-place hook computes what the reference function `apply_rule` computes, in the last block (the
    HunyuanVideo twin's: a single-stream block)."""
    cfg, backbone, pipe = tiny_pipelines[name]
    before, after = [], []
    last = len(backbone.blocks(pipe.transformer)) - 1
    block = backbone.blocks(pipe.transformer)[last]
    h1 = block.register_forward_hook(lambda m, a, o: before.append(backbone.video_tokens(o).clone()))
    steerer = steerer_for(tiny_pipelines, name, f"steer.layers=[{last}]", f"steer.rule={rule}", "steer.alpha=1.5",
                          "steer.strength=0.75", "steer.window.end=0.25")
    try:
        with steerer.attach(pipe.transformer):
            h2 = block.register_forward_hook(lambda m, a, o: after.append(backbone.video_tokens(o).clone()))
            layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
            kwargs = dict(backbone.pipeline_kwargs(cfg.model), num_inference_steps=STEPS)
            sample(pipe, ITEM, kwargs, steerer, layout)
    finally:
        h1.remove()
        h2.remove()
    token_mask = layout.mask(cfg.steer.targets, cfg.steer.boundary_width, cfg.steer.boundary_unit)
    hidden = before[0]  # step 0, first call: the cond pass (two-pass) or the whole [uncond, cond] batch
    expected = []
    for row in hidden.split(1):  # one row per CFG branch, each with its own channels (detect.branches=per_branch)
        channels = massive_channel_mask(row, Detection.of(cfg.detect))
        assert channels.nonzero().flatten().tolist() == [5, 17, 26]  # the three planted channels
        expected.append(apply_rule(row, token_mask, channels, rule=rule, alpha=1.5, strength=0.75))
    torch.testing.assert_close(after[0], torch.cat(expected), rtol=1e-6, atol=1e-5)
    assert not torch.equal(after[0], hidden)
    # later steps are outside the window: untouched
    assert torch.equal(after[-1], before[-1])


@pytest.mark.parametrize("dims", ["auto", "list", "all"])
def test_steering_hook_never_synchronises(tiny_pipelines, dims):
    """Run the hook on meta tensors: any host read of a value (.item(), bool(), .tolist()) would raise."""
    cfg, backbone, _ = tiny_pipelines["tiny_wan21"]
    override = {"auto": "steer.dims=auto", "list": "steer.dims=[5,17]", "all": "steer.dims=all"}[dims]
    steerer = StasSteerer(backbone, steer_cfg("tiny_wan21", override).steer)
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    steerer.begin(layout, num_steps=STEPS, do_cfg=True)
    hidden = torch.empty(1, layout.num_tokens, backbone.hidden_dim, device="meta")
    steerer.tracker.on_transformer_call(None, (), {"hidden_states": hidden})  # the call's batch and device
    hook = LayerSteering(steerer, 0, steerer.channels[0].to("meta") if steerer.channels[0] is not None else None)
    assert hook(None, (), hidden) is None
    assert steerer.calls[(0, 0, "cond")] == 1
    if dims == "auto":  # counted on the device: only record() reads it
        assert steerer.values_steered.device.type == "meta"


def steered_rows(calls: Counter) -> int:
    """Batch rows that hook calls steered: one per CFG branch a call steered (one prompt per call)."""
    return sum(count * len(branch.split("+")) for (_, _, branch), count in calls.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_record_counts_the_steered_values(tiny_pipelines, name):
    cfg, backbone, _ = tiny_pipelines[name]
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    tokens = int(layout.mask(cfg.steer.targets, cfg.steer.boundary_width, cfg.steer.boundary_unit).sum())
    fixed = steerer_for(tiny_pipelines, name, "steer.dims=[5,17]")
    run(tiny_pipelines, name, fixed)
    assert fixed.record()["values_steered"] == steered_rows(fixed.calls) * tokens * 2 > 0
    detected = steerer_for(tiny_pipelines, name)  # auto: the planted channels, as many as qualify in each call
    run(tiny_pipelines, name, detected)
    record = detected.record()
    assert 0 < record["channels_mean"] <= 3
    # every call steers the same rows, so the mean number of channels per call gives the total
    assert record["values_steered"] == pytest.approx(steered_rows(detected.calls) * tokens * record["channels_mean"])


def test_record_says_when_nothing_was_steered(tiny_pipelines):
    """No channel qualifies as massive: the hooks ran, nothing was steered, and the record says so."""
    vanilla = run(tiny_pipelines, "tiny_wan21", None)
    steerer = steerer_for(tiny_pipelines, "tiny_wan21", "detect.ratio=10000")
    assert np.array_equal(run(tiny_pipelines, "tiny_wan21", steerer), vanilla)
    record = steerer.record()
    assert record["hook_calls"] > 0 and record["values_steered"] == 0 and record["channels_mean"] == 0


def test_steering_json_always_has_the_count(tmp_path):
    from test_generation import gen, rows_of

    for run_dir, overrides, steered in ((tmp_path / "none", ["detect.ratio=10000"], False),
                                        (tmp_path / "planted", [], True)):
        gen(run_dir, "prompts.prompts=[a cat]", *overrides)
        record = json.loads((run_dir / "steering.json").read_text())
        assert (record["values_steered"] > 0) is steered
        assert rows_of(run_dir)[0]["steering"]["values_steered"] == record["values_steered"]


def test_no_cfg_means_every_call_is_cond(tiny_pipelines):
    steerer = steerer_for(tiny_pipelines, "tiny_wan21", "steer.branches=uncond", "model.guidance_scale=1.0")
    cfg, backbone, pipe = tiny_pipelines["tiny_wan21"]
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    kwargs = dict(backbone.pipeline_kwargs(cfg.model), num_inference_steps=STEPS, guidance_scale=1.0)
    with steerer.attach(pipe.transformer):
        sample(pipe, ITEM, kwargs, steerer, layout)
    assert steerer.calls == Counter()  # no uncond branch exists without CFG


def uncond_spike(steerer, backbone, channel=40, size=50.0):
    """A block hook that makes `channel` massive (size x the state's mean |value|) in the uncond rows only."""

    def hook(block, args, output):
        hidden = backbone.video_tokens(output)
        for name, rows in steerer.tracker.branches_of_call(hidden.shape[0]):
            if name == "uncond":
                hidden[rows, :, channel] = size * hidden[rows].abs().mean()
        return output

    return hook


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("branches,expected", [("per_branch", (3 + 4) / 2), ("shared", 3.0)])
def test_detect_branches_is_the_same_in_every_family(tiny_pipelines, name, branches, expected):
    """An extra massive channel in the uncond branch only: per_branch steers it there (3 channels in cond, 4 in
    uncond), shared steers the cond branch's 3 in both; alike for two-pass (Wan) and batched (CogVideoX) CFG."""
    cfg, backbone, pipe = tiny_pipelines[name]
    steerer = steerer_for(tiny_pipelines, name, f"detect.branches={branches}", "steer.layers=[1]")
    handle = backbone.blocks(pipe.transformer)[1].register_forward_hook(uncond_spike(steerer, backbone))
    try:
        run(tiny_pipelines, name, steerer)
    finally:
        handle.remove()
    record = steerer.record()
    assert record["detection"]["branches"] == branches
    assert record["channels_mean"] == pytest.approx(expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_reference_is_the_layers_ma_maximum_unless_asked_otherwise(tiny_pipelines, name):
    """Fixed non-MA channels (ablation_dims): M is the layer's true-MA maximum by default, so the ablation varies
    the channels only; reference=steered pushes them to their own small maximum."""
    records = {}
    first_call = ("steer.layers=[0]", "steer.window.unit=steps", "steer.window.end=1")  # states not yet steered
    for reference in ("ma_max", "steered"):
        steerer = steerer_for(tiny_pipelines, name, "steer.dims=[40,41]", f"steer.reference={reference}", *first_call)
        run(tiny_pipelines, name, steerer)
        records[reference] = steerer.record()["reference"]
    # dims=auto: M is the largest detected (planted) channel's peak
    detected = steerer_for(tiny_pipelines, name, *first_call)
    run(tiny_pipelines, name, detected)
    auto = detected.record()["reference"]
    assert records["ma_max"]["kind"] == "ma_max" and records["steered"]["kind"] == "steered"
    assert records["ma_max"] == {**auto, "kind": "ma_max"}
    assert records["steered"]["max"] < records["ma_max"]["min"] / 10


def test_reference_falls_back_to_the_steered_channels_without_mas(tiny_pipelines):
    steerer = steerer_for(tiny_pipelines, "tiny_wan21", "steer.dims=[40,41]", "detect.ratio=10000")
    run(tiny_pipelines, "tiny_wan21", steerer)
    own = steerer_for(tiny_pipelines, "tiny_wan21", "steer.dims=[40,41]", "steer.reference=steered")
    run(tiny_pipelines, "tiny_wan21", own)
    assert steerer.record()["reference"]["max"] == own.record()["reference"]["max"]
