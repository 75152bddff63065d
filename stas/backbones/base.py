"""The `Backbone` base class: everything steering, analysis and generation need to know about a model.

One subclass per diffusers family (stas/backbones/families/) sets the family's facts as class attributes and
overrides the methods where the family differs, so no code outside stas/backbones compares family names: where the
transformer blocks are, how the VAE compresses time and space, the patch size, how classifier-free guidance calls
the transformer, what a block returns, the pipeline's sampling arguments and load options, and its tiny twin.
An instance adds one model's name and sizes (from its conf/model/*.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from stas.errors import UserError
from stas.registry import registrar

CFG_BRANCHES = ("cond", "uncond")
BATCHED_ORDER = ("uncond", "cond")  # the rows of a batched CFG call, as CogVideoX's pipeline stacks them
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# family name -> Backbone subclass, filled by @register_family in the modules of stas/backbones/families/.
FAMILIES: dict[str, type["Backbone"]] = {}


@dataclass
class DenoisingRun:
    """One video in stas's own denoising loop (stas.loop): what the family's pipeline computes before its loop, and
    the latents the loop advances. `args` are the pipeline call's arguments (prompt, generator, height, ...)."""

    pipe: Any
    args: dict
    device: torch.device
    embeds: torch.Tensor  # the prompt's text embeddings
    negative_embeds: torch.Tensor | None  # None without CFG
    timesteps: torch.Tensor
    latents: torch.Tensor
    do_cfg: bool
    call_inputs: dict = field(default_factory=dict)  # transformer keywords computed once per video (RoPE tables)
    extra: dict = field(default_factory=dict)  # the family's own loop state (scheduler step arguments, ...)

    @property
    def num_steps(self) -> int:
        return self.args["num_inference_steps"]


@dataclass(frozen=True)
class Expert:
    """The transformer that denoises a step, and the guidance scale the pipeline uses with it at that step."""

    name: str
    module: torch.nn.Module
    guidance_scale: float


class BackboneError(UserError, RuntimeError):
    """A backbone that cannot be described or loaded; the message says what to do."""


# Class decorator: `@register_family("wan21")` makes a Backbone subclass the family of `model.family=wan21`.
register_family = registrar(FAMILIES, "backbone family", "family")


@dataclass(frozen=True)
class Backbone:
    """One model: its family's facts (class attributes) plus its own name and sizes."""

    name: str
    num_layers: int
    hidden_dim: int

    family: ClassVar[str]  # set by @register_family
    pipeline: ClassVar[str]  # diffusers pipeline class
    transformer_class: ClassVar[str]  # diffusers transformer class
    blocks_attr: ClassVar[str]  # attribute of the transformer holding the block list
    # A second block list that runs after blocks_attr's (HunyuanVideo's single-stream blocks): `blocks` lists both,
    # the first list's blocks first. None: one list.
    single_blocks_attr: ClassVar[str | None] = None
    temporal_compression: ClassVar[int]
    spatial_compression: ClassVar[int]
    patch: ClassVar[tuple[int, int, int]]  # (time, height, width) patch of the transformer
    cfg_layout: ClassVar[str]  # "two_pass": cond call then uncond call per step; "batched": one call on [uncond, cond]
    block_returns_tuple: ClassVar[bool]  # the block returns (video tokens, text tokens) instead of the video tokens
    text_tokens: ClassVar[str]  # how text enters the blocks; steering and capture only ever see the video tokens
    latents_frame_axis: ClassVar[int]  # axis of the latent frames in the (unpacked) latents of a video
    expand_timesteps: ClassVar[bool] = False  # a timestep per token (Wan2.2-TI2V)
    takes_image: ClassVar[bool] = False  # image-to-video: a prompt may start from an image (args["image"] in the loop)
    # Self-attention runs on [text, video] tokens and returns (video, text) (joint attention, CogVideoX) instead of
    # running on and returning the video tokens only.
    joint_attention: ClassVar[bool] = False
    # The pipeline can hand the low-noise steps to a second expert transformer (model.boundary_ratio,
    # model.guidance_scale_2: Wan2.2-A14B's transformer_2).
    takes_experts: ClassVar[bool] = False
    # The pipeline takes `true_cfg_scale` (model.true_cfg_scale): a guidance-distilled model whose CFG branches it
    # decides instead of guidance_scale (HunyuanVideo).
    takes_true_cfg: ClassVar[bool] = False
    # The fewest denoising steps the family's pipeline can take (LTX's scheduler stretches its sigmas towards a
    # terminal shift, which divides 0 by 0 for a single step).
    min_steps: ClassVar[int] = 1
    # The module whose hidden_states input diffusers' `_cp_plan` splits across context-parallel ranks (dim 1, the
    # flattened video tokens, in contiguous equal chunks; gathered after the blocks): every block then sees one
    # rank's chunk (stas.backbones.parallel). None: the family cannot run context-parallel (model.parallel).
    context_parallel_split: ClassVar[str | None] = None
    # The key of the pipeline scheduler's config that model.flow_shift sets (UniPC: flow_shift; FlowMatchEuler: shift).
    flow_shift_key: ClassVar[str] = "flow_shift"

    # ------------------------------------------------------------------------------------------- the token grid

    @property
    def pixels_per_token(self) -> tuple[int, int]:
        return self.spatial_compression * self.patch[1], self.spatial_compression * self.patch[2]

    def video_problems(self, height: int, width: int, num_frames: int) -> list[str]:
        """Why this backbone cannot take a video of this size (empty when it can)."""
        problems = []
        tc = self.temporal_compression
        if num_frames < 1 or (num_frames - 1) % tc:
            problems.append(f"num_frames={num_frames} must be {tc}k+1 (e.g. {tc * 4 + 1}) for a VAE compressing time {tc}x")
        for name, value, step in (("height", height, self.pixels_per_token[0]), ("width", width, self.pixels_per_token[1])):
            if value < step or value % step:
                problems.append(f"{name}={value} must be a positive multiple of {step} for {self.name} "
                                f"({self.spatial_compression}x VAE x patch {self.patch[1]})")
        return problems

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        problems = self.video_problems(height, width, num_frames)
        if problems:
            raise BackboneError("; ".join(problems))
        frames = (num_frames - 1) // self.temporal_compression + 1
        return frames // self.patch[0], height // self.pixels_per_token[0], width // self.pixels_per_token[1]

    def grid_of_latents(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) token grid of a video's latents (B, C, F, H, W) or (B, F, C, H, W)."""
        frames, (height, width) = latents.shape[self.latents_frame_axis], latents.shape[-2:]
        return frames // self.patch[0], height // self.patch[1], width // self.patch[2]

    def grid_of_call(self, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(frames, height, width) token grid of a transformer call, from its inputs (a forward pre-hook's)."""
        return self.grid_of_latents(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    # ------------------------------------------------------------------------------------ blocks and CFG calls

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        """The blocks in the order they run: layer indices (steer.layers, analysis) count over all of them."""
        if self.single_blocks_attr is None:
            return getattr(transformer, self.blocks_attr)
        return torch.nn.ModuleList([*getattr(transformer, self.blocks_attr),
                                    *getattr(transformer, self.single_blocks_attr)])

    def experts(self, pipe) -> dict[str, torch.nn.Module]:
        """{name: transformer} of every expert transformer of a pipeline, in the order they denoise (the names are
        those `step_expert` gives): steering and capture hook them all. One for most families."""
        return {"transformer": pipe.transformer}

    def video_tokens(self, block_output):
        """The (B, S, D) video-token hidden states inside a block's output."""
        return block_output[0] if self.block_returns_tuple else block_output

    def uses_cfg(self, kwargs: dict) -> bool:
        """Whether the family's pipeline runs classifier-free guidance (two branches) for these pipeline call
        arguments (`pipeline_kwargs`): guidance_scale > 1, unless the family says otherwise (HunyuanVideo)."""
        return kwargs["guidance_scale"] > 1.0

    def pipeline_call_cfg(self, pipe) -> bool | None:
        """Whether a user's pipeline call in progress runs CFG (stas.apply_stas), from what the pipeline records of
        the call; None: it records nothing that tells (a two-pass family only: the call's second transformer call
        tells, at the first one's timestep for the uncond branch)."""
        return self.uses_cfg({"guidance_scale": pipe.guidance_scale})

    def cfg_settings(self, model_cfg) -> str:
        """The model config's settings that decide CFG, for messages."""
        return f"model.guidance_scale={model_cfg.guidance_scale!r}: CFG needs > 1"

    def cfg_calls(self, branches: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """The transformer calls of one denoising step for these guidance branches (in the guider's order), each
        as the branches of its batch's rows in row order (equal chunks): how the family's pipeline batches them.

        Two-pass CFG calls the transformer with the cond batch, then the uncond batch; batched CFG calls it once on
        torch.cat([uncond, cond]). Without CFG the one call is cond. A branch beyond CFG's (a guider's perturbed
        pass, e.g. skip-layer guidance's cond_skip) is a call of its own after them in both layouts: the guider
        changes the model for it (diffusers' `prepare_models`), which cannot happen for some rows of a batch."""
        if self.cfg_layout == "two_pass":
            return tuple((branch,) for branch in branches)
        batched = tuple(branch for branch in BATCHED_ORDER if branch in branches)
        extra = tuple((branch,) for branch in branches if branch not in BATCHED_ORDER)
        return ((batched,) if batched else ()) + extra

    def pipeline_cfg_calls(self, do_cfg: bool) -> tuple[tuple[str, ...], ...]:
        """The transformer calls of one step of the family's own pipeline (`pipe(...)`): plain CFG or none."""
        return self.cfg_calls(CFG_BRANCHES if do_cfg else CFG_BRANCHES[:1])

    # ------------------------------------------------------------------------------------------ self-attention

    def self_attentions(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks' self-attention modules (diffusers' attention classes, not cross-attention), in block order."""
        from diffusers.hooks._common import _ATTENTION_CLASSES

        return [module for block in self.blocks(transformer) for module in block.modules()
                if isinstance(module, _ATTENTION_CLASSES) and not module.is_cross_attention]

    def attention_video_output(self, output):
        """The video tokens of a self-attention module's output."""
        return output[0] if self.joint_attention else output

    def with_attention_video_output(self, output, video: torch.Tensor):
        """A self-attention module's output with its video tokens replaced."""
        return (video, *output[1:]) if self.joint_attention else video

    def register_layer_skip(self, transformer: torch.nn.Module) -> None:
        """Register the family's attention processors with diffusers' layer-skip hooks (skip-layer and perturbed-
        attention guidance look a processor up to know what a skipped attention returns): diffusers 0.42 lists
        neither WanAttnProcessor nor CogVideoXAttnProcessor2_0. A skipped self-attention returns its input."""
        from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry

        def skipped(module, *args, **kwargs):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if not self.joint_attention:
                return hidden_states
            return hidden_states, kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]

        for module in self.self_attentions(transformer):
            processor = type(module.processor)
            try:
                AttentionProcessorRegistry.get(processor)
            except ValueError:  # not registered
                AttentionProcessorRegistry.register(processor, AttentionProcessorMetadata(skip_processor_output_fn=skipped))

    def place_layer_skips(self, guider, transformer: torch.nn.Module) -> None:
        """Name the block list of each of the guider's layer skips (diffusers' LayerSkipConfig, built with
        fqn='auto' and indices over stas's one list of blocks, `blocks`): an index past the first list lands in the
        second (HunyuanVideo's single-stream blocks), so one config may become two. diffusers' 'auto' would take
        whichever list name it finds first in a set, not stable between runs for a model with two lists."""
        lists = [(name, len(getattr(transformer, name))) for name in (self.blocks_attr, self.single_blocks_attr)
                 if name is not None]
        placed = []
        for config in guider.skip_layer_config:
            if config.fqn != "auto":  # placed already (the guider serves every video of a run)
                placed.append(config)
                continue
            start = 0
            for name, count in lists:
                indices = [index - start for index in config.indices if start <= index < start + count]
                if indices:
                    placed.append(replace(config, indices=indices, fqn=name))
                start += count
        guider.skip_layer_config = placed
        # the guider names one hook per config when it is built; the names must follow the configs
        guider._skip_layer_hook_names = [f"SkipLayerGuidance_{index}" for index in range(len(placed))]

    # --------------------------------------------------------------------------------------- the pipeline call

    def vae_compression_of(self, pipe) -> tuple[int, int]:
        """(time, space) compression of a loaded pipeline's VAE, as the pipeline reads it (None where a pipeline of
        another family names it otherwise: the load check then reports the wrong pipeline)."""
        return getattr(pipe, "vae_scale_factor_temporal", None), getattr(pipe, "vae_scale_factor_spatial", None)

    def pipeline_kwargs(self, model_cfg) -> dict:
        """The sampling arguments of every pipeline call of a run (prompt and generator come per video)."""
        return dict(
            negative_prompt=model_cfg.negative_prompt,
            height=model_cfg.height,
            width=model_cfg.width,
            num_frames=model_cfg.num_frames,
            num_inference_steps=model_cfg.steps,
            guidance_scale=model_cfg.guidance_scale,
            max_sequence_length=model_cfg.max_sequence_length,
            output_type="np",
        )

    def pretrained_components(self, diffusers, model_cfg, load_kwargs: dict) -> dict:
        """Components to load apart from the pipeline's own from_pretrained (e.g. in another dtype)."""
        return {}

    def transformer_inputs(self, transformer, height: int, width: int, latent_frames: int, device) -> dict:
        """Keyword inputs of a transformer call that the pipeline computes once per video (beyond latents,
        timestep and text), for loops that call the transformer without the pipeline."""
        return {}

    # ------------------------------------------------- the parts of stas's own denoising loop (stas.loop)
    # Each is the family pipeline's own code for that part (`__call__` of WanPipeline, CogVideoXPipeline), calling the
    # pipeline's own methods, so that stas.loop with plain CFG gives `pipe(...)`'s frames bit for bit.

    def denoising_run(self, pipe, args: dict) -> DenoisingRun:
        """Prompt encoding, timesteps, initial latents and per-video transformer inputs, as the pipeline does."""
        raise NotImplementedError(f"{type(self).__name__} has no denoising loop")

    def encode_prompt(self, pipe, args: dict, do_cfg: bool, device) -> tuple:
        return pipe.encode_prompt(prompt=args["prompt"], negative_prompt=args.get("negative_prompt"),
                                  do_classifier_free_guidance=do_cfg, num_videos_per_prompt=1,
                                  max_sequence_length=args["max_sequence_length"], device=device)

    def branch_inputs(self, run: DenoisingRun) -> dict:
        """{transformer keyword: (cond value, uncond value)}: the inputs that differ between guidance branches, for
        the guider to hand out per branch (None for uncond without CFG)."""
        return {"encoder_hidden_states": (run.embeds, run.negative_embeds)}

    def step_expert(self, run: DenoisingRun, step: int, t) -> Expert:
        """Which transformer denoises this step, with which guidance scale."""
        return Expert("transformer", run.pipe.transformer, run.args["guidance_scale"])

    def call_inputs(self, run: DenoisingRun, t, rows: int) -> dict:
        """hidden_states, timestep and the per-video inputs of a transformer call whose batch stacks `rows`
        copies of the latents (one per guidance branch in the call)."""
        raise NotImplementedError(f"{type(self).__name__} has no denoising loop")

    def call_context(self, run: DenoisingRun, expert: Expert, branches: tuple[str, ...], step: int):
        """diffusers' cache context of a transformer call, named as the pipeline names it ("cond", "uncond",
        "cond_uncond" for a batched call)."""
        order = {branch: n for n, branch in enumerate(CFG_BRANCHES)}
        name = "_".join(sorted(branches, key=lambda branch: order.get(branch, len(order))))
        return expert.module.cache_context(name, **self.cache_context_kwargs(run, step))

    def cache_context_kwargs(self, run: DenoisingRun, step: int) -> dict:
        return {}

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The transformer's output as the pipeline guides it (e.g. in float32)."""
        return output

    def scheduler_step(self, run: DenoisingRun, noise: torch.Tensor, step: int, t) -> torch.Tensor:
        """The next latents."""
        return run.pipe.scheduler.step(noise, t, run.latents, return_dict=False)[0]

    def decode(self, run: DenoisingRun):
        """The frames as the pipeline returns them for args["output_type"] (the latents for "latent")."""
        return run.latents if run.args["output_type"] == "latent" else self.decode_latents(run)

    def decode_latents(self, run: DenoisingRun):
        raise NotImplementedError(f"{type(self).__name__} has no denoising loop")

    # ----------------------------------------------------------------------------------------------- tiny twin

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        """(vae, transformer, scheduler) of the family's tiny twin at the sizes of `model.tiny`."""
        raise NotImplementedError(f"{type(self).__name__} has no tiny twin")

    def tiny_text_components(self, tiny, model_cfg) -> dict | None:
        """The twin's tokenizers and text encoders as pipeline components; None: stas.backbones.tiny's T5 pair."""
        return None

    def tiny_pipeline(self, diffusers, components: dict):
        """The family's pipeline around tiny components (tokenizer, text_encoder, vae, transformer, scheduler)."""
        return getattr(diffusers, self.pipeline)(**components)

    def tiny_expert_components(self, diffusers, tiny, model_cfg) -> dict:
        """More pipeline components of a twin with several experts (a second transformer and its switch)."""
        return {}

    # ------------------------------------------------------------------- pipelines built outside stas

    @classmethod
    def describes(cls, pipe) -> bool:
        """Whether a diffusers pipeline (built by a user script) is of this family (stas.apply_stas)."""
        import diffusers

        return (isinstance(pipe, getattr(diffusers, cls.pipeline))
                and bool(getattr(pipe.config, "expand_timesteps", False)) == cls.expand_timesteps)

    def hidden_dim_of(self, transformer) -> int:
        """The width of the transformer's hidden states (the channels steering and analysis see)."""
        return int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)

    # ---------------------------------------------------------------- transformer configs (benchmarks, tests)

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        """The text-embedding width a transformer of this config takes."""
        raise NotImplementedError

    @classmethod
    def transformer_config_for_video(cls, transformer_config: dict, frames: int, height: int, width: int) -> dict:
        """The transformer config adapted to a video size (families with size-dependent embeddings)."""
        return transformer_config
