"""CogVideoX (diffusers CogVideoXPipeline / CogVideoXTransformer3DModel / AutoencoderKLCogVideoX)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import torch

from stas.backbones.base import Backbone, DenoisingRun, Expert, register_family


@register_family("cogvideox")
class CogVideoX(Backbone):
    pipeline = "CogVideoXPipeline"
    transformer_class = "CogVideoXTransformer3DModel"
    blocks_attr = "transformer_blocks"
    temporal_compression = 4
    spatial_compression = 8
    patch = (1, 2, 2)
    cfg_layout = "batched"
    block_returns_tuple = True
    text_tokens = "separate stream (encoder_hidden_states), joined with video tokens only inside attention"
    latents_frame_axis = 1  # latents are (B, F, C, H, W)
    joint_attention = True

    def pipeline_kwargs(self, model_cfg) -> dict:
        return {**super().pipeline_kwargs(model_cfg), "use_dynamic_cfg": model_cfg.use_dynamic_cfg}

    @classmethod
    def describes(cls, pipe) -> bool:
        """A CogVideoXPipeline whose transformer has this family's temporal patch (1.0: none; 1.5: 2)."""
        return super().describes(pipe) and (pipe.transformer.config.patch_size_t or 1) == cls.patch[0]

    def transformer_inputs(self, transformer, height: int, width: int, latent_frames: int, device) -> dict:
        from diffusers import CogVideoXPipeline

        # The pipeline's own RoPE tables, from the parts of the pipeline it reads.
        owner = SimpleNamespace(vae_scale_factor_spatial=self.spatial_compression, transformer=transformer)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(owner, height, width, latent_frames, device)
        return {"image_rotary_emb": rotary}

    # -------------------------------------------------------- CogVideoXPipeline.__call__'s parts, for stas.loop

    def denoising_run(self, pipe, args: dict) -> DenoisingRun:
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import retrieve_timesteps

        device, do_cfg = pipe._execution_device, self.uses_cfg(args)
        embeds, negative = self.encode_prompt(pipe, args, do_cfg, device)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, args["num_inference_steps"], device)
        frames, config = args["num_frames"], pipe.transformer.config
        latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
        # CogVideoX 1.5 pads the latent frames to a multiple of its temporal patch (and drops them before decoding)
        padding = (-latent_frames) % config.patch_size_t if config.patch_size_t is not None else 0
        latents = pipe.prepare_latents(1, config.in_channels, frames + padding * pipe.vae_scale_factor_temporal,
                                       args["height"], args["width"], embeds.dtype, device, args["generator"])
        run = DenoisingRun(pipe, args, device, embeds, negative, timesteps, latents, do_cfg)
        run.extra.update(padding=padding, old_pred=None,
                         step_kwargs=pipe.prepare_extra_step_kwargs(args["generator"], args.get("eta", 0.0)))
        run.call_inputs["image_rotary_emb"] = (
            pipe._prepare_rotary_positional_embeddings(args["height"], args["width"], latents.size(1), device)
            if config.use_rotary_positional_embeddings else None)
        return run

    def step_expert(self, run: DenoisingRun, step: int, t) -> Expert:
        expert = super().step_expert(run, step, t)
        if not run.args.get("use_dynamic_cfg"):
            return expert
        n, scale = run.num_steps, expert.guidance_scale  # the pipeline's cosine ramp of the scale over the steps
        return replace(expert, guidance_scale=1 + scale * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2))

    def call_inputs(self, run: DenoisingRun, t, rows: int) -> dict:
        hidden = torch.cat([run.latents] * rows) if rows > 1 else run.latents
        hidden = run.pipe.scheduler.scale_model_input(hidden, t)
        return {"hidden_states": hidden, "timestep": t.expand(hidden.shape[0]), **run.call_inputs}

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    def scheduler_step(self, run: DenoisingRun, noise: torch.Tensor, step: int, t) -> torch.Tensor:
        from diffusers import CogVideoXDPMScheduler

        scheduler, kwargs = run.pipe.scheduler, run.extra["step_kwargs"]
        if isinstance(scheduler, CogVideoXDPMScheduler):
            previous = run.timesteps[step - 1] if step > 0 else None
            latents, run.extra["old_pred"] = scheduler.step(noise, run.extra["old_pred"], t, previous, run.latents,
                                                            **kwargs, return_dict=False)
        else:
            latents = scheduler.step(noise, t, run.latents, **kwargs, return_dict=False)[0]
        return latents.to(run.embeds.dtype)

    def decode_latents(self, run: DenoisingRun):
        video = run.pipe.decode_latents(run.latents[:, run.extra["padding"]:])
        return run.pipe.video_processor.postprocess_video(video=video, output_type=run.args["output_type"])

    # -------------------------------------------------------------------------------------------- tiny twin

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        vae = diffusers.AutoencoderKLCogVideoX(
            in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(tiny.vae_base_dim,) * 4, latent_channels=4,
            layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        )
        transformer = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=tiny.num_heads, attention_head_dim=tiny.head_dim, in_channels=4, out_channels=4,
            time_embed_dim=8, text_embed_dim=tiny.text_dim, num_layers=tiny.num_layers,
            sample_height=model_cfg.height // 8, sample_width=model_cfg.width // 8, sample_frames=model_cfg.num_frames,
            patch_size=2, temporal_compression_ratio=4, max_text_seq_length=model_cfg.max_sequence_length,
            use_rotary_positional_embeddings=True, patch_size_t=self.patch[0] if self.patch[0] > 1 else None,
        )
        return vae, transformer, diffusers.CogVideoXDDIMScheduler()

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        return transformer_config["text_embed_dim"]

    @classmethod
    def transformer_config_for_video(cls, transformer_config: dict, frames: int, height: int, width: int) -> dict:
        # CogVideoX's positional embeddings are sized for one video size.
        return {**transformer_config, "sample_frames": frames, "sample_height": height // cls.spatial_compression,
                "sample_width": width // cls.spatial_compression}


@register_family("cogvideox15")
class CogVideoX15(CogVideoX):
    """CogVideoX 1.5: a token spans 2 latent frames (patch_size_t=2). The pipeline pads the latent frames at the
    front to a multiple of 2 with frames of noise it drops before decoding (pipeline_cogvideox.py, "For CogVideoX
    1.5"): with an odd number of latent frames (81 pixel frames: 21), temporal token 0 holds a padding frame and latent
    frame 0 (pixel frame 0 alone), and temporal token k >= 1 latent frames 2k-1 and 2k (pixel frames 8k-7 .. 8k);
    with an even number (85 pixel frames: 22) token 0 holds latent frames 0 and 1 (pixel frames 0-4). So STAS's
    "first frame" is temporal token 0, the token holding pixel frame 0, and "boundary" the first and last token rows
    of every later temporal token, each a chunk of 8 pixel frames (README, "Backbones")."""

    patch = (2, 2, 2)

    def padding_frames(self, num_frames: int) -> int:
        """Latent frames of noise the pipeline puts in front of a video of `num_frames` pixel frames."""
        latent_frames = (num_frames - 1) // self.temporal_compression + 1
        return -latent_frames % self.patch[0]

    def latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        _, rows, columns = super().latent_grid(height, width, num_frames)  # the size checks
        latent_frames = (num_frames - 1) // self.temporal_compression + 1
        return (latent_frames + self.padding_frames(num_frames)) // self.patch[0], rows, columns
