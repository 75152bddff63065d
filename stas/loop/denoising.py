"""stas's own denoising loop: the family pipeline's `__call__` rebuilt from the pipeline's own parts, with guidance
by a diffusers guider (`diffusers.guiders`) and every transformer call announced to the hooks.

The family's backbone supplies each part as its pipeline computes it (stas.backbones: `denoising_run` encodes the
prompt, sets the timesteps, prepares the latents and per-video inputs such as CogVideoX's RoPE tables, and the inputs
that differ by branch beyond the text, such as LTX's text masks; `step_expert` picks the transformer and the step's
guidance scale, e.g. CogVideoX's dynamic CFG; `call_inputs` the call's latents and timesteps, e.g. Wan2.2's per-token
timesteps; `scheduler_step`; `decode`). This module only orders them: per step
the guider prepares its branches (cond, uncond, ...), the family groups them into transformer calls the way its
pipeline does (Wan: one call per branch; CogVideoX: one call on [uncond, cond]), each call runs inside a
`DenoisingCall` announcement (step, the branch of every row, the expert), and the guider combines the predictions.

With `ClassifierFreeGuidance` this is `pipe(...)` bit for bit (tests/test_owned_loop.py): the guider computes
`uncond + scale * (cond - uncond)` in the same operations and order as both pipelines.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from stas.backbones import Backbone, BackboneError, DenoisingRun, Expert
from stas.core.layout import TokenLayout
from stas.loop.guidance import skipped_layers
from stas.methods.hooks import DenoisingCall, announced


@dataclass
class DenoiseOutput:
    """What a pipeline returns: `frames[0]` is the video (the latents with output_type="latent"); `nfe` the
    network function evaluations it took: one per guider branch and step (a batched [uncond, cond] call is two)."""

    frames: Any
    nfe: int = 0


@dataclass
class OwnedLoop:
    """`denoise` for one backbone and guider, called like a pipeline: loop(pipe, prompt=..., generator=..., ...).
    `changes`: Methods that change the transformer for every video (a guidance's, e.g. Enhance-A-Video)."""

    backbone: Backbone
    guider: Any
    changes: tuple = ()
    nfe: int = 0  # of the last call

    def __call__(self, pipe, **args) -> DenoiseOutput:
        with ExitStack() as stack:
            for change in self.changes:
                stack.enter_context(change.attach(self.backbone.experts(pipe)))
                layout = TokenLayout.for_video(self.backbone, args["height"], args["width"], args["num_frames"])
                change.begin(layout, args["num_inference_steps"], self.backbone.uses_cfg(args))
            output = denoise(pipe, self.backbone, self.guider, **args)
        self.nfe = output.nfe
        return output

    def record(self) -> dict | None:
        """What the guidance's changes did in the last video (None without any)."""
        return self.changes[0].record() if self.changes else None

    def steps_matching_nfe(self, steps: int, do_cfg: bool) -> int:
        """The most steps whose NFE under this guider is at most plain CFG's at `steps` (CFG: 2 a step, 1 without):
        the guider's own count of branches per step, so a method that pays an extra pass in part of the steps
        (skip-layer, perturbed-attention guidance) gets fewer steps, and one that pays none the same."""
        budget = steps * (2 if do_cfg else 1)
        best = 1
        for candidate in range(1, budget + 1):
            if branches_per_video(self.guider, candidate, do_cfg) <= budget:
                best = candidate
        return best


def branches_per_video(guider, steps: int, do_cfg: bool) -> int:
    """The transformer passes (NFE) of a video of `steps` steps under `guider`, counted as the loop calls it."""
    decide_cfg(guider, do_cfg)
    total = 0
    for step in range(steps):
        guider.set_state(step, steps, None)
        total += guider.num_conditions
    return total


def decide_cfg(guider, do_cfg: bool) -> None:
    """The pipelines decide CFG once per video (guidance_scale > 1); the guider then guides at each step's scale."""
    if do_cfg:
        guider.enable()
    else:
        guider.disable()


def denoise(pipe, backbone: Backbone, guider, **args) -> DenoiseOutput:
    """One video from `pipe`'s parts, guided by `guider`; `args` are the pipeline call's arguments (prompt,
    generator, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, max_sequence_length,
    output_type and the family's own, e.g. use_dynamic_cfg; `image`, a PIL image, for an image-to-video backbone)."""
    if args.get("image") is not None and not backbone.takes_image:
        raise BackboneError(f"{backbone.name} generates from text only: it takes no image")
    run = backbone.denoising_run(pipe, args)
    decide_cfg(guider, run.do_cfg)
    if skipped_layers(guider):  # the guider hooks blocks for its perturbed pass (diffusers' layer-skip hooks)
        backbone.place_layer_skips(guider, pipe.transformer)  # every expert has the same blocks
        for expert in backbone.experts(pipe).values():
            backbone.register_layer_skip(expert)
    nfe = 0
    with pipe.progress_bar(total=run.num_steps) as progress:
        for step, t in enumerate(run.timesteps):
            run.latents, evaluations = denoising_step(run, backbone, guider, step, t)
            nfe += evaluations
            progress.update()
    frames = backbone.decode(run)
    pipe.maybe_free_model_hooks()
    return DenoiseOutput(frames, nfe)


def denoising_step(run: DenoisingRun, backbone: Backbone, guider, step: int, t) -> tuple[torch.Tensor, int]:
    """The latents after one step (the guider's branches through the transformer, guided, then the scheduler) and
    the branches evaluated."""
    expert = backbone.step_expert(run, step, t)
    guider.guidance_scale = expert.guidance_scale
    guider.set_state(step, run.num_steps, t)
    batches = guider.prepare_inputs(backbone.branch_inputs(run))
    by_branch = {branch_of(guider, batch): batch for batch in batches}
    calls = backbone.cfg_calls(tuple(by_branch))
    for index, branches in enumerate(calls):
        announcement = DenoisingCall(step, index, calls, expert.name)
        with prepared(guider, expert.module, branches):
            predictions = predict(run, backbone, expert, t, announcement, [by_branch[b] for b in branches])
        for branch, prediction in zip(branches, predictions):
            by_branch[branch].noise_pred = prediction
    return backbone.scheduler_step(run, guider(batches).pred, step, t), len(batches)


def predict(run: DenoisingRun, backbone: Backbone, expert: Expert, t, call: DenoisingCall, batches) -> tuple:
    """One transformer call on the branches `batches` stacked in rows: each branch's prediction."""
    branch_inputs = {key: [getattr(batch, key) for batch in batches] for key in backbone.branch_inputs(run)}
    inputs = {**backbone.call_inputs(run, t, len(batches)),
              **{key: torch.cat(values) if len(values) > 1 else values[0] for key, values in branch_inputs.items()}}
    with backbone.call_context(run, expert, call.branches, call.step), announced(expert.module, call):
        output = expert.module(**inputs, attention_kwargs=None, return_dict=False)[0]
    return backbone.prediction(output).chunk(len(batches))


@contextmanager
def prepared(guider, module, branches: tuple[str, ...]):
    """The guider's changes to the model for a call (diffusers' `prepare_models` / `cleanup_models`: skip-layer and
    perturbed-attention guidance hook the blocks for their perturbed pass). The guiders count these calls to know
    which branch comes next, as diffusers' modular pipelines call them once per branch in the guider's order:
    `Backbone.cfg_calls` keeps that order for every branch a guider perturbs (it comes last, in a call of its own)."""
    for _ in branches:
        guider.prepare_models(module)
    try:
        yield
    finally:
        for _ in branches:
            guider.cleanup_models(module)


def branch_of(guider, batch) -> str:
    """A guider batch's branch: its prediction name without "pred_" (pred_cond -> cond, pred_uncond -> uncond)."""
    return getattr(batch, guider._identifier_key).removeprefix("pred_")
