"""The `Backbone` base class: everything steering, analysis and generation need to know about a model.

One subclass per diffusers family (stas/backbones/families/) sets the family's facts as class attributes and
overrides the methods where the family differs, so no code outside stas/backbones compares family names: where the
transformer blocks are, how the VAE compresses time and space, the patch size, how classifier-free guidance calls
the transformer, what a block returns, the pipeline's sampling arguments and load options, and its tiny twin.
An instance adds one model's name and sizes (from its conf/model/*.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from stas.errors import UserError
from stas.registry import registrar

CFG_BRANCHES = ("cond", "uncond")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# family name -> Backbone subclass, filled by @register_family in the modules of stas/backbones/families/.
FAMILIES: dict[str, type["Backbone"]] = {}


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
    temporal_compression: ClassVar[int]
    spatial_compression: ClassVar[int]
    patch: ClassVar[tuple[int, int, int]]  # (time, height, width) patch of the transformer
    cfg_layout: ClassVar[str]  # "two_pass": cond call then uncond call per step; "batched": one call on [uncond, cond]
    block_returns_tuple: ClassVar[bool]  # the block returns (video tokens, text tokens) instead of the video tokens
    text_tokens: ClassVar[str]  # how text enters the blocks; steering and capture only ever see the video tokens
    latents_frame_axis: ClassVar[int]  # axis of the latent frames in the latents a transformer call receives
    expand_timesteps: ClassVar[bool] = False  # a timestep per token (Wan2.2-TI2V)

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
        for field, value, step in (("height", height, self.pixels_per_token[0]), ("width", width, self.pixels_per_token[1])):
            if value < step or value % step:
                problems.append(f"{field}={value} must be a positive multiple of {step} for {self.name} "
                                f"({self.spatial_compression}x VAE x patch {self.patch[1]})")
        return problems

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        problems = self.video_problems(height, width, num_frames)
        if problems:
            raise BackboneError("; ".join(problems))
        frames = (num_frames - 1) // self.temporal_compression + 1
        return frames // self.patch[0], height // self.pixels_per_token[0], width // self.pixels_per_token[1]

    def grid_of_latents(self, latents: torch.Tensor) -> tuple[int, int, int]:
        """(frames, height, width) token grid of the latents a transformer call receives."""
        frames, (height, width) = latents.shape[self.latents_frame_axis], latents.shape[-2:]
        return frames // self.patch[0], height // self.patch[1], width // self.patch[2]

    # ------------------------------------------------------------------------------------ blocks and CFG calls

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def video_tokens(self, block_output):
        """The (B, S, D) video-token hidden states inside a block's output."""
        return block_output[0] if self.block_returns_tuple else block_output

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether the family's pipeline runs classifier-free guidance at this guidance scale."""
        return guidance_scale > 1.0

    def calls_per_step(self, do_cfg: bool) -> int:
        return 2 if do_cfg and self.cfg_layout == "two_pass" else 1

    def branch_rows(self, branch: str, call_in_step: int, batch: int, do_cfg: bool) -> slice | None:
        """Rows of a transformer call's batch that belong to `branch`, or None when the call has none of them.

        Two-pass CFG calls the transformer with the cond batch, then the uncond batch; batched CFG calls it once on
        torch.cat([uncond, cond]). Without CFG every call is cond.
        """
        if not do_cfg:
            return slice(0, batch) if branch == "cond" else None
        if self.cfg_layout == "two_pass":
            return slice(0, batch) if CFG_BRANCHES[call_in_step] == branch else None
        half = batch // 2
        return slice(half, batch) if branch == "cond" else slice(0, half)

    # --------------------------------------------------------------------------------------- the pipeline call

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

    # ----------------------------------------------------------------------------------------------- tiny twin

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        """(vae, transformer, scheduler) of the family's tiny twin at the sizes of `model.tiny`."""
        raise NotImplementedError(f"{type(self).__name__} has no tiny twin")

    def tiny_pipeline(self, diffusers, components: dict):
        """The family's pipeline around tiny components (tokenizer, text_encoder, vae, transformer, scheduler)."""
        return getattr(diffusers, self.pipeline)(**components)

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
