"""stas's own denoising loop (stas.loop) against the pipelines' `pipe(...)`: the same frames bit for bit on every tiny
twin, with and without CFG, with steering attached; and the steps, branches and experts it announces to the hooks."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from diffusers.guiders import ClassifierFreeGuidance

from stas.backbones import get_backbone
from stas.core.layout import TokenLayout
from stas.generation import make_loop, make_steerer, run_pipeline
from stas.loop import OwnedLoop, denoise, make_guider
from stas.methods.hooks import DenoisingCall, DenoisingTracker, announced
from stas.prompts import Item

from conftest import compose

TWINS = ("tiny_wan21", "tiny_wan22", "tiny_wan22_a14b", "tiny_cogvideox", "tiny_cogvideox15", "tiny_hunyuanvideo",
         "tiny_ltx")
# The overrides that turn CFG on and off: guidance_scale; HunyuanVideo's true CFG (its twin's default runs none, and
# its guidance_scale is embedded, never a second branch)
CFG_SWITCH = {"tiny_hunyuanvideo": {True: ["model.true_cfg_scale=4.0"], False: []}}
GUIDANCE_SCALE_SWITCH = {True: [], False: ["model.guidance_scale=1"]}
# (first-frame + boundary tokens, all tokens) of a twin's video: CogVideoX1.5's 3 x 4 x 6 grid (12 first-frame tokens,
# 2 x 2 boundary rows of 6), LTX's 3 x 4 x 5 (20 first-frame tokens, 2 x 2 boundary rows of 5)
STEERED_TOKENS = {"tiny_cogvideox15": (48, 72), "tiny_ltx": (40, 60)}
ITEM = Item(0, "a red fox runs through fresh snow", 0, 3)
STEPS = 4  # the default window [0, 0.4) steers steps 0 and 1


def setup(tiny_pipelines, twin: str, *overrides):
    """(cfg, backbone, pipe, layout, kwargs) of a twin, with `overrides` composed into its config."""
    _, backbone, pipe = tiny_pipelines[twin]
    cfg = compose([f"model={twin}", "logger=none", f"model.steps={STEPS}", *overrides])
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    return cfg, backbone, pipe, layout, backbone.pipeline_kwargs(cfg.model)


def frames_and_record(pipe, kwargs, layout, loop, steerer=None):
    """The float frames (and the steering record) of ITEM through `loop` (None: pipe(...))."""
    with steerer.attach(steerer.backbone.experts(pipe)) if steerer is not None else nullcontext():
        frames = np.asarray(run_pipeline(pipe, ITEM, kwargs, steerer, layout, loop).frames[0])
        record = None if steerer is None else json.dumps(steerer.record(), sort_keys=True)
    return frames, record


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "no_cfg"])
def test_owned_loop_gives_the_pipelines_frames_bit_for_bit(tiny_pipelines, twin, cfg_on):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin,
                                                *CFG_SWITCH.get(twin, GUIDANCE_SCALE_SWITCH)[cfg_on])
    assert backbone.uses_cfg(kwargs) is cfg_on
    expected, _ = frames_and_record(pipe, kwargs, layout, None)
    frames, _ = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone))
    assert frames.dtype == np.float32 and frames.shape == expected.shape
    assert np.array_equal(frames, expected)


@pytest.mark.slow  # the quick tier keeps the bit-for-bit CFG cases; the golden frames run the loop too
@pytest.mark.parametrize("twin", TWINS)
def test_owned_loop_with_steering_gives_the_pipelines_frames_and_record(tiny_pipelines, twin):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin, "steer=stas")
    steerer = make_steerer(cfg, backbone)
    expected, expected_record = frames_and_record(pipe, kwargs, layout, None, steerer)
    frames, record = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone), steerer)
    assert np.array_equal(frames, expected) and record == expected_record
    steered = json.loads(record)
    assert steered["steps"] == [0, 1] and steered["values_steered"] > 0
    if twin in STEERED_TOKENS:  # the families whose regions are defined anew: temporal patches, packed latents
        assert (steered["tokens"], steered["tokens_total"]) == STEERED_TOKENS[twin]
    vanilla, _ = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone))
    assert not np.array_equal(frames, vanilla)  # steering did something


@pytest.mark.slow  # the quick tier keeps the bit-for-bit CFG cases; the golden frames run the loop too
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_cogvideox_dynamic_cfg_bit_for_bit_also_where_the_scale_comes_near_one(tiny_pipelines, scheduler):
    """3 DDIM steps: the dynamic scale at t=333 is 1 + 2.5e-13, where diffusers' own guider would skip the uncond
    rows (math.isclose to 1): stas's guider guides every step as the pipeline does (stas.loop.guidance)."""
    from diffusers import CogVideoXDPMScheduler

    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_cogvideox", "model.use_dynamic_cfg=true",
                                                "model.steps=3")
    original = pipe.scheduler
    if scheduler == "dpm":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(original.config)
    try:
        expected, _ = frames_and_record(pipe, kwargs, layout, None)
        frames, _ = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone))
        plain, _ = frames_and_record(pipe, kwargs, layout, OwnedLoop(backbone, ClassifierFreeGuidance()))
    finally:
        pipe.scheduler = original
    assert np.array_equal(frames, expected)
    assert not np.array_equal(plain, expected)  # why GuidesEveryStep exists


@pytest.mark.slow  # the quick tier keeps the bit-for-bit CFG cases; the golden frames run the loop too
@pytest.mark.parametrize("twin", TWINS)
def test_latent_output_is_the_pipelines(tiny_pipelines, twin):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin)
    kwargs = {**kwargs, "output_type": "latent"}
    with torch.inference_mode():
        expected = pipe(prompt=ITEM.prompt, generator=torch.Generator().manual_seed(3), **kwargs).frames
        latents = denoise(pipe, backbone, make_guider(cfg.guidance), prompt=ITEM.prompt,
                          generator=torch.Generator().manual_seed(3), **kwargs).frames
    assert torch.equal(latents, expected)


@pytest.mark.slow  # the quick tier keeps the bit-for-bit CFG cases; the golden frames run the loop too
@pytest.mark.parametrize("scale_2", [None, 3.0])
def test_two_expert_wan_bit_for_bit_and_each_call_names_its_expert(tiny_pipelines, scale_2):
    """Wan2.2-A14B's layout on the tiny Wan twin: a second transformer (transformer_2, guidance_scale_2) below the
    boundary timestep 0.8 x 1000 (timesteps 999, 900, 750, 500: the last two steps)."""
    import copy

    from diffusers import WanPipeline

    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan21")
    second = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.mul_(0.9)
    two = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                      transformer=pipe.transformer, scheduler=pipe.scheduler, transformer_2=second, boundary_ratio=0.8)
    two.set_progress_bar_config(disable=True)
    kwargs = {**kwargs, "guidance_scale_2": scale_2}
    seen = []
    tracker = DenoisingTracker(backbone)
    tracker.listeners.append(lambda: seen.append((tracker.step, tracker.expert)))
    handles = [module.register_forward_pre_hook(tracker.on_transformer_call, with_kwargs=True)
               for module in (two.transformer, second)]
    try:
        tracker.begin(layout, STEPS, do_cfg=True)
        frames, _ = frames_and_record(two, kwargs, layout, make_loop(cfg, backbone))
    finally:
        for handle in handles:
            handle.remove()
    expected, _ = frames_and_record(two, kwargs, layout, None)
    one_expert, _ = frames_and_record(pipe, {**kwargs, "guidance_scale_2": None}, layout, None)
    assert np.array_equal(frames, expected) and not np.array_equal(frames, one_expert)
    assert seen == [(step, "transformer" if step < 2 else "transformer_2") for step in range(STEPS) for _ in "cu"]


def test_the_comparison_fails_for_a_guidance_scale_off_by_a_millionth(tiny_pipelines):
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan21")
    expected, _ = frames_and_record(pipe, kwargs, layout, None)
    nudged = {**kwargs, "guidance_scale": kwargs["guidance_scale"] + 1e-6}
    frames, _ = frames_and_record(pipe, nudged, layout, make_loop(cfg, backbone))
    assert not np.array_equal(frames, expected)
    assert np.abs(frames - expected).max() < 1e-3  # a near miss, and still caught


def test_make_guider_is_diffusers_classifier_free_guidance():
    guider = make_guider(compose(["logger=none"]).guidance)
    assert isinstance(guider, ClassifierFreeGuidance)
    guider.guidance_scale = 1.0 + 1e-13
    guider.set_state(0, 4, torch.tensor(999))
    assert guider.num_conditions == 2  # decided per video, not per step (diffusers' own: 1)
    guider.disable()
    assert guider.num_conditions == 1


# ------------------------------------------------------------------------------------ announced steps and branches


class ExtraPassCFG(ClassifierFreeGuidance):
    """CFG plus a third transformer pass per step on the cond inputs, whose prediction is ignored: the shape of
    skip-layer guidance's extra pass, to show that announced steps stay right where counted ones slip."""

    _input_predictions = ["pred_cond", "pred_uncond", "pred_extra"]

    @property
    def num_conditions(self) -> int:
        return super().num_conditions + 1

    def prepare_inputs(self, data):
        return [*super().prepare_inputs(data), self._prepare_batch(data, 0, "pred_extra")]

    def forward(self, pred_cond, pred_uncond=None, pred_extra=None):
        return super().forward(pred_cond, pred_uncond)


class Recorder(torch.nn.Module):
    def forward(self, hidden_states):
        return hidden_states


def test_announced_calls_label_steps_and_branches_where_counting_slips():
    """Three calls per step (cond, uncond, an extra pass): counting assumes the pipeline's two and mislabels from
    the third call on; announcements give every call its step, branches and expert."""
    backbone = get_backbone("tiny_wan21")
    tracker = DenoisingTracker(backbone)
    module = Recorder()
    module.register_forward_pre_hook(tracker.on_transformer_call, with_kwargs=True)
    seen = []
    tracker.listeners.append(lambda: seen.append((tracker.step, tracker.branches_of_call(1), tracker.expert)))
    calls = (("cond",), ("uncond",), ("extra",))
    for explicit in (False, True):
        tracker.begin(TokenLayout.for_video(backbone, 64, 96, 9), num_steps=2, do_cfg=True)
        seen.clear()
        for step in range(2):
            for index in range(len(calls)):
                call = DenoisingCall(step, index, calls, "transformer_2")
                with announced(module, call) if explicit else nullcontext():
                    module(hidden_states=torch.zeros(1, 3))
        labels = [(step, [name for name, _ in branches]) for step, branches, _ in seen]
        if explicit:
            assert labels == [(0, ["cond"]), (0, ["uncond"]), (0, []), (1, ["cond"]), (1, ["uncond"]), (1, [])]
            assert {expert for _, _, expert in seen} == {"transformer_2"}
        else:
            assert labels == [(0, ["cond"]), (0, ["uncond"]), (1, ["cond"]), (1, ["uncond"]), (2, ["cond"]),
                              (2, ["uncond"])]
    assert not hasattr(module, "_stas_denoising_call")  # the announcement ends with its call


@pytest.mark.slow  # the quick tier keeps the bit-for-bit CFG cases; the golden frames run the loop too
@pytest.mark.parametrize("twin", ["tiny_wan21", "tiny_wan22"])
def test_an_extra_pass_per_step_leaves_steering_where_it_was(tiny_pipelines, twin, monkeypatch):
    """With a guider that adds an ignored pass, the steered frames and record are plain CFG's: every call is
    announced, so the extra pass is no branch STAS steers and no step is shifted. Counted instead (announcements
    off), steps shift and the frames change."""
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, twin, "steer=stas")
    steerer = make_steerer(cfg, backbone)
    expected, expected_record = frames_and_record(pipe, kwargs, layout, make_loop(cfg, backbone), steerer)
    extra = OwnedLoop(backbone, ExtraPassCFG())
    frames, record = frames_and_record(pipe, kwargs, layout, extra, steerer)
    assert np.array_equal(frames, expected) and record == expected_record
    monkeypatch.setattr("stas.loop.denoising.announced", lambda module, call: nullcontext())
    counted, _ = frames_and_record(pipe, kwargs, layout, extra, steerer)
    assert not np.array_equal(counted, expected)


def test_batched_family_announces_one_call_for_cfg_and_one_per_extra_pass(tiny_pipelines):
    """CogVideoX stacks the CFG branches in one call, uncond first, as its pipeline does; a guider's extra pass is a
    call of its own (the guider may change the model for it)."""
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_cogvideox")
    seen = []
    tracker = DenoisingTracker(backbone)
    tracker.listeners.append(lambda: seen.append((tracker.step, tracker.step_calls, tracker.call_latents().shape[0])))
    handle = pipe.transformer.register_forward_pre_hook(tracker.on_transformer_call, with_kwargs=True)
    try:
        tracker.begin(layout, STEPS, do_cfg=True)
        run_pipeline(pipe, ITEM, kwargs, None, layout, OwnedLoop(backbone, ExtraPassCFG()))
    finally:
        handle.remove()
    calls = (("uncond", "cond"), ("extra",))
    assert seen == [(step, calls, rows) for step in range(STEPS) for rows in (2, 1)]


def test_run_directories_from_before_the_guidance_group_read_as_cfg(tmp_path):
    from stas.rundir import claim_run_dir, identity, load_identity
    from stas.rundir.files import yaml_text

    cfg = compose(["logger=none"])
    older = identity(cfg)
    del older["guidance"]
    (tmp_path / "run_identity.yaml").write_text(yaml_text(older))
    assert load_identity(tmp_path)["guidance"] == {"name": "cfg", "params": {"guidance_rescale": 0.0},
                                                   "match_nfe": False}
    claim_run_dir(tmp_path, cfg, [])  # the same run: no refusal


# ------------------------------------------------------------------------ other guiders: diffusers' own, in the loop


def recording(guider) -> list:
    """Each step's (step, pred_cond, pred_uncond, guided prediction) as the guider sees and returns them."""
    seen, forward = [], guider.forward

    def record(**predictions):
        output = forward(**predictions)
        seen.append((guider._step, predictions["pred_cond"], predictions.get("pred_uncond"), output.pred))
        return output

    guider.forward = record
    return seen


def guided(tiny_pipelines, guidance: list[str]):
    """tiny_wan21's frames under a guidance config, and what its guider saw and returned at every step."""
    cfg, backbone, pipe, layout, kwargs = setup(tiny_pipelines, "tiny_wan21", *guidance)
    guider = make_guider(cfg.guidance)
    seen = recording(guider)
    frames, _ = frames_and_record(pipe, kwargs, layout, OwnedLoop(backbone, guider))
    return frames, seen, kwargs["guidance_scale"]


def test_cfg_zero_star_and_apg_differ_from_cfg_and_follow_their_papers_math(tiny_pipelines):
    cfg_frames, cfg_seen, scale = guided(tiny_pipelines, ["guidance=cfg"])
    zero_frames, zero_seen, _ = guided(tiny_pipelines, ["guidance=cfg_zero_star"])
    apg_frames, apg_seen, _ = guided(tiny_pipelines, ["guidance=apg", "guidance.params.eta=0"])
    assert not np.array_equal(zero_frames, cfg_frames) and not np.array_equal(apg_frames, cfg_frames)
    for seen in (zero_seen, apg_seen):  # the same first step's predictions: cond and uncond reach the guider unswapped
        assert [entry[0] for entry in seen] == list(range(STEPS))
        assert torch.equal(seen[0][1], cfg_seen[0][1]) and torch.equal(seen[0][2], cfg_seen[0][2])
    for step, cond, uncond, pred in cfg_seen:
        assert torch.equal(pred, uncond + scale * (cond - uncond))
    # CFG-Zero*: a zero prediction at the first step, then the uncond prediction scaled by its projection on cond
    assert torch.equal(zero_seen[0][3], torch.zeros_like(zero_seen[0][1]))
    for step, cond, uncond, pred in zero_seen[1:]:
        c, u = cond.flatten(1).double(), uncond.flatten(1).double()
        alpha = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).view(-1, *(1,) * (cond.dim() - 1))
        expected = alpha * uncond.double() + scale * (cond.double() - alpha * uncond.double())
        torch.testing.assert_close(pred.double(), expected, rtol=1e-5, atol=1e-5)
        assert (pred - (uncond + scale * (cond - uncond))).abs().max() > 1e-3  # not CFG's
    # APG with eta 0: only the part of the (norm-capped) update orthogonal to the cond prediction
    for step, cond, uncond, pred in apg_seen:
        diff = (cond - uncond).double()
        diff = diff * torch.clamp(15.0 / diff.flatten(1).norm(dim=1), max=1.0).view(-1, *(1,) * (cond.dim() - 1))
        unit = cond.double() / cond.double().flatten(1).norm(dim=1).view(-1, *(1,) * (cond.dim() - 1))
        parallel = (diff * unit).flatten(1).sum(1).view(-1, *(1,) * (cond.dim() - 1)) * unit
        torch.testing.assert_close(pred.double(), uncond.double() + scale * (diff - parallel), rtol=1e-5, atol=1e-5)
        assert (pred - (uncond + scale * (cond - uncond))).abs().max() > 1e-3
