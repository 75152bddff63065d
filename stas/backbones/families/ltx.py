"""LTX-Video (diffusers LTXPipeline / LTXVideoTransformer3DModel / AutoencoderKLLTXVideo).

The VAE compresses 8x in time and 32x in space and the transformer's patch is 1 x 1 x 1, so a token is one latent
position: latent frame 0 holds pixel frame 0 alone (the causal VAE), latent frame k >= 1 pixel frames 8k-7 .. 8k.
The pipeline hands the transformer its latents packed, (B, frames x rows x columns, C) in frame-major order
(`LTXPipeline._pack_latents`), with the latent grid as the call's `num_frames`, `height` and `width`: the grid of a
call comes from those, not from the latents' shape. CFG is one batched call on [uncond, cond], and the T5 text
embeddings come with a mask per branch (`encoder_attention_mask`).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from stas.backbones.base import Backbone, BackboneError, DenoisingRun, register_family

GRID_ARGUMENTS = ("num_frames", "height", "width")  # the latent grid of an LTX transformer call


@register_family("ltx")
class LTXVideo(Backbone):
    pipeline = "LTXPipeline"
    transformer_class = "LTXVideoTransformer3DModel"
    blocks_attr = "transformer_blocks"
    temporal_compression = 8
    spatial_compression = 32
    patch = (1, 1, 1)
    cfg_layout = "batched"
    block_returns_tuple = False
    text_tokens = ("cross-attention only (encoder_hidden_states, masked by encoder_attention_mask), never in the block "
                   "output")
    latents_frame_axis = 2  # unpacked latents are (B, C, F, H, W); a transformer call gets them packed (B, S, C)
    min_steps = 2  # FlowMatchEulerDiscreteScheduler with shift_terminal (Lightricks/LTX-Video's config)
    # diffusers' _cp_plan for LTX splits the transformer's own inputs and its RoPE tables, not a block's input as
    # stas's context parallelism expects (stas.backbones.parallel): not supported yet.
    context_parallel_split = None

    def grid_of_call(self, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        from diffusers import LTXVideoTransformer3DModel

        call = inspect.signature(LTXVideoTransformer3DModel.forward).bind(None, *args, **kwargs).arguments
        grid = tuple(call.get(name) for name in GRID_ARGUMENTS)
        if None in grid:
            raise BackboneError(f"{self.name}: an LTX transformer call without {', '.join(GRID_ARGUMENTS)} "
                                "(video_coords alone): its token grid is unknown, so stas cannot tell first-frame and "
                                "boundary tokens")
        return tuple(int(size) for size in grid)  # patch 1: a token per latent position

    def vae_compression_of(self, pipe) -> tuple[int, int]:
        return (getattr(pipe, "vae_temporal_compression_ratio", None),
                getattr(pipe, "vae_spatial_compression_ratio", None))

    def self_attentions(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        # LTXAttention has no is_cross_attention: attn1 is the block's self-attention, attn2 its cross-attention.
        return [block.attn1 for block in self.blocks(transformer)]

    def register_layer_skip(self, transformer: torch.nn.Module) -> None:
        # diffusers' layer-skip hooks (skip-layer, perturbed-attention guidance) tell self- from cross-attention by
        # `is_cross_attention`, which LTXAttention lacks (diffusers 0.42.1)
        for block in self.blocks(transformer):
            block.attn1.is_cross_attention, block.attn2.is_cross_attention = False, True
        super().register_layer_skip(transformer)

    def pipeline_kwargs(self, model_cfg) -> dict:
        # The pipeline's frame_rate sets the time scale of its RoPE (rope_interpolation_scale): the video's fps.
        return {**super().pipeline_kwargs(model_cfg), "frame_rate": model_cfg.fps}

    # ----------------------------------------------------------- LTXPipeline.__call__'s parts, for stas.loop

    def denoising_run(self, pipe, args: dict) -> DenoisingRun:
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift, retrieve_timesteps

        device, do_cfg = pipe._execution_device, self.uses_cfg(args)
        embeds, mask, negative, negative_mask = self.encode_prompt(pipe, args, do_cfg, device)
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, args["height"], args["width"],
                                       args["num_frames"], torch.float32, device, args["generator"])
        temporal, spatial = self.vae_compression_of(pipe)
        grid = ((args["num_frames"] - 1) // temporal + 1, args["height"] // spatial, args["width"] // spatial)
        steps, config = args["num_inference_steps"], pipe.scheduler.config
        # the pipeline's timestep shift for this many tokens
        mu = calculate_shift(int(np.prod(grid)), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps),
                                          mu=mu)
        run = DenoisingRun(pipe, args, device, embeds, negative, timesteps, latents, do_cfg)
        run.call_inputs.update(zip(GRID_ARGUMENTS, grid), rope_interpolation_scale=(
            temporal / args["frame_rate"], spatial, spatial))
        run.extra["text_masks"] = (mask, negative_mask)
        run.extra["grid"] = grid
        return run

    def branch_inputs(self, run: DenoisingRun) -> dict:
        return {**super().branch_inputs(run), "encoder_attention_mask": run.extra["text_masks"]}

    def call_inputs(self, run: DenoisingRun, t, rows: int) -> dict:
        hidden = torch.cat([run.latents] * rows) if rows > 1 else run.latents
        hidden = hidden.to(run.embeds.dtype)
        return {"hidden_states": hidden, "timestep": t.expand(hidden.shape[0]), **run.call_inputs}

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    def decode_latents(self, run: DenoisingRun):
        from diffusers.utils.torch_utils import randn_tensor

        pipe, vae = run.pipe, run.pipe.vae
        latents = pipe._unpack_latents(run.latents, *run.extra["grid"], pipe.transformer_spatial_patch_size,
                                       pipe.transformer_temporal_patch_size)
        latents = pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(run.embeds.dtype)
        timestep = None
        if vae.config.timestep_conditioning:  # LTX-Video >= 0.9.1: the VAE decodes at a timestep, noise mixed in
            noise = randn_tensor(latents.shape, generator=run.args["generator"], device=run.device,
                                 dtype=latents.dtype)
            decode_timestep = run.args.get("decode_timestep", 0.0)  # the pipeline's defaults
            noise_scale = run.args.get("decode_noise_scale")
            noise_scale = decode_timestep if noise_scale is None else noise_scale
            timestep = torch.tensor([decode_timestep], device=run.device, dtype=latents.dtype)
            noise_scale = torch.tensor([noise_scale], device=run.device, dtype=latents.dtype)[:, None, None, None, None]
            latents = (1 - noise_scale) * latents + noise_scale * noise
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type=run.args["output_type"])

    # -------------------------------------------------------------------------------------------- tiny twin

    def tiny_vae(self, diffusers, tiny, timestep_conditioning: bool = False):
        """The published VAE's compression at toy width: a 4 x 4 pixel patch, then 3 of 4 blocks halving time and
        space (8x time, 32x space)."""
        return diffusers.AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(tiny.vae_base_dim,) * 4,
            decoder_block_out_channels=(tiny.vae_base_dim,) * 4, layers_per_block=(1,) * 5,
            decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False), patch_size=4, patch_size_t=1,
            timestep_conditioning=timestep_conditioning,
        )

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        transformer = diffusers.LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=tiny.num_heads, attention_head_dim=tiny.head_dim,
            cross_attention_dim=tiny.num_heads * tiny.head_dim, num_layers=tiny.num_layers,
            caption_channels=tiny.text_dim,
        )
        # Lightricks/LTX-Video's scheduler config: the shift grows with the token count (the pipeline's mu)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096, shift_terminal=0.1,
        )
        return self.tiny_vae(diffusers, tiny), transformer, scheduler

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        return transformer_config["caption_channels"]
