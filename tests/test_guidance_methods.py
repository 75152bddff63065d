"""The guidance group beyond CFG in stas's own loop: skip-layer and perturbed-attention guidance (diffusers' guiders,
with their extra perturbed pass), Enhance-A-Video (stas.methods.enhance_a_video), each composed with STAS, their NFE,
and NFE matching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stas.generation import make_loop, make_steerer, run_pipeline
from stas.loop import GUIDANCE
from stas.methods.enhance_a_video import enhance_factor

from conftest import compose
from test_owned_loop import ITEM, STEPS, frames_and_record, setup


def guided_run(tiny_pipelines, twin: str, *overrides):
    """(frames, what the guider saw each step, loop, scale, skip scale) of ITEM under a guidance config."""
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin, *overrides)
    loop = make_loop(cfg, backbone)
    seen, forward = [], loop.guider.forward

    def record(**predictions):
        output = forward(**predictions)
        seen.append((loop.guider._step, predictions, output.pred))
        return output

    loop.guider.forward = record
    frames, _ = frames_and_record(pipe, kwargs, layout, loop)
    return frames, seen, loop, kwargs["guidance_scale"]


SLOW = pytest.mark.slow  # the quick tier keeps one case per guidance, one per family


@pytest.mark.parametrize("twin,name,weight_key", [
    ("tiny_wan21", "slg", "skip_layer_guidance_scale"), ("tiny_cogvideox", "pag", "perturbed_guidance_scale"),
    ("tiny_ltx", "pag", "perturbed_guidance_scale"),
    pytest.param("tiny_ltx", "slg", "skip_layer_guidance_scale", marks=SLOW),
    pytest.param("tiny_cogvideox", "slg", "skip_layer_guidance_scale", marks=SLOW),
    pytest.param("tiny_wan21", "pag", "perturbed_guidance_scale", marks=SLOW)])
def test_perturbed_pass_guidance_follows_the_guiders_math_and_leaves_no_hook(tiny_pipelines, twin, name, weight_key):
    """uncond + scale (cond - uncond) + w (cond - cond_perturbed) at the steps inside the window (diffusers: after
    step 0), CFG's at step 0; the perturbed pass differs from cond (the blocks were perturbed), the cond pass of step 0
    is CFG's (the perturbation is only on its own call), and CFG afterwards gives its frames again (hooks removed)."""
    cfg_frames, cfg_seen, _, scale = guided_run(tiny_pipelines, twin, "guidance=cfg")
    frames, seen, loop, _ = guided_run(tiny_pipelines, twin, f"guidance={name}")
    weight = loop.guider.skip_layer_guidance_scale
    assert weight == compose([f"guidance={name}"]).guidance.params[weight_key] and loop.nfe == 2 * STEPS + STEPS - 1
    assert not np.array_equal(frames, cfg_frames)
    assert [step for step, _, _ in seen] == list(range(STEPS))
    assert torch.equal(seen[0][1]["pred_cond"], cfg_seen[0][1]["pred_cond"])
    assert torch.equal(seen[0][2], cfg_seen[0][2]) and seen[0][1].get("pred_cond_skip") is None
    for step, predictions, pred in seen[1:]:
        cond, uncond, perturbed = (predictions[k] for k in ("pred_cond", "pred_uncond", "pred_cond_skip"))
        assert (cond - perturbed).abs().max() > 1e-4
        torch.testing.assert_close(pred, uncond + scale * (cond - uncond) + weight * (cond - perturbed))
    again, _, _, _ = guided_run(tiny_pipelines, twin, "guidance=cfg")
    assert np.array_equal(again, cfg_frames)


def test_enhance_factor_is_the_papers_cross_frame_intensity():
    """Against a direct loop over positions and heads: softmax(q k^T / sqrt(d)) over the frames of one position and
    head, the mean of the off-diagonal entries over all of them, times (frames + weight), at least 1."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, frames, positions, dim = 2, 3, 5, 4, 8
    query, key = (torch.randn(batch, heads, frames * positions, dim, generator=generator) for _ in range(2))
    intensities = []
    for b in range(batch):
        for h in range(heads):
            for s in range(positions):
                q, k = query[b, h, s::positions], key[b, h, s::positions]  # frame-major tokens: this position
                attention = torch.softmax(q @ k.T / dim ** 0.5, dim=-1)
                intensities.append((attention.sum() - attention.diagonal().sum()) / (frames * (frames - 1)))
    expected = torch.stack(intensities).mean() * (frames + 4.0)
    assert expected > 1
    torch.testing.assert_close(enhance_factor(query, key, frames, 4.0), expected)
    assert enhance_factor(query, key, frames, -frames) == 1.0  # clamped: never weakens the attention


@pytest.mark.parametrize("twin", ["tiny_cogvideox", "tiny_ltx", pytest.param("tiny_wan21", marks=SLOW)])
def test_enhance_hook_scales_the_video_output_of_each_self_attention_by_one_factor(tiny_pipelines, twin):
    """The first self-attention of the first call (the same inputs with and without the method): its video output is
    the plain one times a single factor > 1; CogVideoX's text output is untouched."""
    outputs = {}
    for name in ("cfg", "enhance_a_video"):
        _, backbone, pipe, _, _ = setup(tiny_pipelines, twin)
        attention = backbone.self_attentions(pipe.transformer)[0]
        handle = attention.register_forward_hook(lambda module, args, output, name=name: outputs.setdefault(name, output))
        try:
            guided_run(tiny_pipelines, twin, f"guidance={name}")
        finally:
            handle.remove()
    plain, enhanced = (backbone.attention_video_output(outputs[name]) for name in ("cfg", "enhance_a_video"))
    factor = (enhanced / plain).flatten()[plain.abs().flatten().argmax()]
    assert factor > 1 and torch.allclose(enhanced, plain * factor, rtol=1e-5, atol=1e-6)
    if backbone.joint_attention:
        assert torch.equal(outputs["cfg"][1], outputs["enhance_a_video"][1])


@pytest.mark.parametrize("twin", ["tiny_wan21", pytest.param("tiny_cogvideox", marks=SLOW)])
def test_enhance_a_video_is_cfg_exactly_when_its_factor_is_one(tiny_pipelines, twin):
    cfg_frames, _, _, _ = guided_run(tiny_pipelines, twin, "guidance=cfg")
    frames, _, loop, _ = guided_run(tiny_pipelines, twin, "guidance=enhance_a_video")
    assert not np.array_equal(frames, cfg_frames) and loop.nfe == 2 * STEPS
    record = loop.record()
    assert record["attention_calls_enhanced"] == loop.backbone.num_layers * len(
        loop.backbone.cfg_calls(("cond", "uncond"))) * STEPS and record["mean_factor"] > 1
    clamped, _, loop, _ = guided_run(tiny_pipelines, twin, "guidance=enhance_a_video",
                                     "guidance.params.enhance_weight=-100")
    assert np.array_equal(clamped, cfg_frames) and loop.record()["mean_factor"] == 1.0
    windowed, _, loop, _ = guided_run(tiny_pipelines, twin, "guidance=enhance_a_video",
                                      "guidance.params.enhance_start=0.5")
    assert loop.record()["attention_calls_enhanced"] == record["attention_calls_enhanced"] // 2
    assert not np.array_equal(windowed, frames)


@pytest.mark.slow  # every guidance twice (with and without STAS): the quick tier keeps the per-method math
@pytest.mark.parametrize("twin", ["tiny_wan21", "tiny_cogvideox"])
def test_every_guidance_composes_with_stas(tiny_pipelines, twin):
    """STAS steers the cond and uncond passes of every guidance in its window, and changes its frames; the record
    is the same whatever the guidance (perturbed passes are not steered)."""
    records = set()
    for name in GUIDANCE:
        cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin, f"guidance={name}", "steer=stas")
        steerer = make_steerer(cfg, backbone)
        steered, record = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone), steerer)
        plain, _ = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone))
        assert not np.array_equal(steered, plain), name
        data = json.loads(record)
        assert data["steps"] == [0, 1] and data["values_steered"] > 0
        records.add(json.dumps({k: data[k] for k in ("steps", "branches", "hook_calls", "tokens")}))
    assert len(records) == 1  # both CFG branches (two-pass: cond, uncond; batched: cond+uncond), never a perturbed pass


@pytest.mark.parametrize("name,steps,matched", [("cfg", 6, 6), ("cfg_zero_star", 6, 6), ("enhance_a_video", 6, 6),
                                                ("slg", 6, 4), ("pag", 10, 7), ("slg", 1, 1)])
def test_match_nfe_gives_the_most_steps_within_cfgs_passes(name, steps, matched):
    """Skip-layer and perturbed-attention guidance pay a third pass at every step after the first: 3s - 1 passes
    for s steps, at most CFG's 2 x steps."""
    cfg = compose([f"guidance={name}", "guidance.match_nfe=true", f"model.steps={steps}"])
    loop = make_loop(cfg, None)
    assert loop.steps_matching_nfe(steps, do_cfg=True) == matched
    assert loop.steps_matching_nfe(steps, do_cfg=False) == steps  # without CFG no guider adds a pass


def test_match_nfe_runs_fewer_steps_and_records_them(tiny_pipelines, tmp_path):
    from stas.generation import sampling_kwargs

    cfg, backbone, pipe, layout, _ = setup(tiny_pipelines, "tiny_wan21", "guidance=slg", "guidance.match_nfe=true",
                                           "model.steps=6")
    loop = make_loop(cfg, backbone)
    kwargs = sampling_kwargs(cfg, backbone, loop)
    assert kwargs["num_inference_steps"] == 4
    run_pipeline(pipe, ITEM, kwargs, None, layout, loop)
    assert loop.nfe == 11 <= 2 * 6


def test_guidance_settings_are_checked_against_the_model():
    from stas.config import validate
    from stas.errors import ConfigError

    with pytest.raises(ConfigError, match=r"guidance=slg perturbs blocks \[5\], but tiny_wan21 has blocks 0 to 1"):
        validate(compose(["guidance=slg", "guidance.params.skip_layer_config.indices=[5]"]))
    # LTX's scheduler takes 2 steps at least: slg's extra passes would leave 1 of 2 (NFE 2 + 3 > CFG's 4)
    with pytest.raises(ConfigError, match=r"guidance.match_nfe=true leaves guidance=slg 1 step\(s\) at "
                                          r"model.steps=2, fewer than family ltx's pipeline takes \(2\)"):
        validate(compose(["model=tiny_ltx", "model.steps=2", "guidance=slg", "guidance.match_nfe=true"]))
    validate(compose(["model=tiny_ltx", "model.steps=3", "guidance=slg", "guidance.match_nfe=true"]))  # 2 steps
    with pytest.raises(ConfigError, match=r"guidance.params.enhance_start=0.8 must be below"):
        validate(compose(["guidance=enhance_a_video", "guidance.params.enhance_start=0.8",
                          "guidance.params.enhance_stop=0.5"]))
    for model, block in (("tiny_wan21", 1), ("wan21_1.3b", 15), ("cogvideox5b", 21)):  # the middle block
        assert compose([f"model={model}", "guidance=pag"]).guidance.params.perturbed_guidance_layers == [block]
