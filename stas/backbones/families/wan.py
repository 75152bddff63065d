"""Wan2.1 and Wan2.2 (diffusers WanPipeline / WanTransformer3DModel / AutoencoderKLWan)."""

from __future__ import annotations

import torch

from stas.backbones.base import DTYPES, Backbone, BackboneError, DenoisingRun, Expert, register_family


@register_family("wan21")
class Wan21(Backbone):
    pipeline = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    blocks_attr = "blocks"
    temporal_compression = 4
    spatial_compression = 8
    patch = (1, 2, 2)
    cfg_layout = "two_pass"
    block_returns_tuple = False
    text_tokens = "cross-attention only (encoder_hidden_states), never in the block output"
    latents_frame_axis = 2  # latents are (B, C, F, H, W)
    latent_channels = 16
    takes_experts = True  # WanPipeline's transformer_2 below boundary_ratio (Wan2.2-T2V-A14B)
    # WanTransformer3DModel._cp_plan (diffusers 0.42.1): blocks.0's hidden_states split on dim 1 (and the RoPE tables,
    # Wan2.2's per-token timesteps with them), gathered at proj_out; the text is not split.
    context_parallel_split = "blocks.0"

    def experts(self, pipe) -> dict[str, torch.nn.Module]:
        """transformer (high noise) and, when the pipeline has one, transformer_2 (low noise, below boundary_ratio)."""
        second = getattr(pipe, "transformer_2", None)
        return {**super().experts(pipe), **({"transformer_2": second} if second is not None else {})}

    def pipeline_kwargs(self, model_cfg) -> dict:
        kwargs = super().pipeline_kwargs(model_cfg)
        scale_2 = getattr(model_cfg, "guidance_scale_2", None)
        return kwargs if scale_2 is None else {**kwargs, "guidance_scale_2": scale_2}

    def pretrained_components(self, diffusers, model_cfg, load_kwargs: dict) -> dict:
        # Wan's VAE is published for float32 decoding; bf16 decoding visibly degrades frames.
        vae_dtype = DTYPES[model_cfg.vae_dtype or "float32"]
        kwargs = {key: value for key, value in load_kwargs.items() if key != "torch_dtype"}
        vae = diffusers.AutoencoderKLWan.from_pretrained(model_cfg.hub_id, subfolder="vae", torch_dtype=vae_dtype,
                                                         **kwargs)
        # Wan2.2-A14B: the switch to transformer_2 as the model config gives it (the checkpoint's own otherwise)
        boundary = getattr(model_cfg, "boundary_ratio", None)
        return {"vae": vae, **({} if boundary is None else {"boundary_ratio": float(boundary)})}

    # ------------------------------------------------------------ WanPipeline.__call__'s parts, for stas.loop

    def denoising_run(self, pipe, args: dict) -> DenoisingRun:
        device, do_cfg = pipe._execution_device, self.uses_cfg(args)
        embeds, negative = self.encode_prompt(pipe, args, do_cfg, device)
        dtype = pipe.transformer.dtype
        embeds, negative = embeds.to(dtype), None if negative is None else negative.to(dtype)
        pipe.scheduler.set_timesteps(args["num_inference_steps"], device=device)
        if args.get("image") is not None:
            return self.image_run(pipe, args, device, embeds, negative, do_cfg)
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, args["height"], args["width"],
                                       args["num_frames"], torch.float32, device, args["generator"])
        pipe.scheduler.set_begin_index(0)
        run = DenoisingRun(pipe, args, device, embeds, negative, pipe.scheduler.timesteps, latents, do_cfg)
        if pipe.config.expand_timesteps:  # Wan2.2-TI2V: a timestep per token (of the first latent channel, patch 2)
            run.extra["token_mask"] = torch.ones(latents.shape, dtype=torch.float32, device=device)[0][0][:, ::2, ::2]
        return run

    def image_run(self, pipe, args: dict, device, embeds, negative, do_cfg: bool) -> DenoisingRun:
        """WanImageToVideoPipeline.__call__'s preparation with expand_timesteps (Wan2.2-TI2V): the image, resized to
        the video, is VAE-encoded (argmax) and normalised into `condition`; `first_frame_mask` is 0 on latent frame 0
        and 1 elsewhere. Every transformer call sees latent frame 0 as the encoded image at timestep 0 (call_inputs),
        and the returned latents have it put back (decode); the scheduler steps the latents as they come."""
        from diffusers import WanImageToVideoPipeline

        if not pipe.config.expand_timesteps:  # Wan2.1-I2V's conditioning (mask channels, CLIP image) is another
            raise BackboneError(f"{self.name}: image conditioning needs a WanPipeline with expand_timesteps")
        image = pipe.video_processor.preprocess(args["image"], height=args["height"], width=args["width"])
        # The I2V pipeline's own prepare_latents on this WanPipeline: it reads only the VAE and the config that the
        # two Wan pipelines share, and draws the noise as WanPipeline.prepare_latents does.
        latents, condition, first_frame_mask = WanImageToVideoPipeline.prepare_latents(
            pipe, image.to(device, dtype=torch.float32), 1, pipe.vae.config.z_dim, args["height"], args["width"],
            args["num_frames"], torch.float32, device, args["generator"])
        run = DenoisingRun(pipe, args, device, embeds, negative, pipe.scheduler.timesteps, latents, do_cfg)
        run.extra.update(condition=condition, first_frame_mask=first_frame_mask,
                         token_mask=first_frame_mask[0][0][:, ::2, ::2])
        return run

    def conditioned(self, run: DenoisingRun) -> torch.Tensor:
        """The latents with latent frame 0 the encoded image (image-to-video), as the I2V pipeline mixes them."""
        if "condition" not in run.extra:
            return run.latents
        mask = run.extra["first_frame_mask"]
        return (1 - mask) * run.extra["condition"] + mask * run.latents

    def step_expert(self, run: DenoisingRun, step: int, t) -> Expert:
        # Wan2.2-A14B: the low-noise expert (transformer_2, guidance_scale_2) below the boundary timestep.
        pipe, boundary = run.pipe, run.pipe.config.boundary_ratio
        if boundary is None or t >= boundary * pipe.scheduler.config.num_train_timesteps:
            return super().step_expert(run, step, t)
        scale = run.args.get("guidance_scale_2")
        return Expert("transformer_2", pipe.transformer_2, run.args["guidance_scale"] if scale is None else scale)

    def call_inputs(self, run: DenoisingRun, t, rows: int) -> dict:
        latents = self.conditioned(run).to(run.pipe.transformer.dtype)
        hidden = torch.cat([latents] * rows) if rows > 1 else latents
        if "token_mask" in run.extra:
            timestep = (run.extra["token_mask"] * t).flatten().unsqueeze(0).expand(hidden.shape[0], -1)
        else:
            timestep = t.expand(hidden.shape[0])
        return {"hidden_states": hidden, "timestep": timestep, **run.call_inputs}

    def cache_context_kwargs(self, run: DenoisingRun, step: int) -> dict:
        return {"step_index": step, "sigma": float(run.pipe.scheduler.sigmas[step]),
                "num_inference_steps": len(run.timesteps)}

    def decode(self, run: DenoisingRun):
        run.latents = self.conditioned(run)
        return super().decode(run)

    def decode_latents(self, run: DenoisingRun):
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = run.pipe.vae
        latents = run.latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return run.pipe.video_processor.postprocess_video(video, output_type=run.args["output_type"])

    # -------------------------------------------------------------------------------------------- tiny twin

    def tiny_vae(self, diffusers, tiny):
        return diffusers.AutoencoderKLWan(
            base_dim=tiny.vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )

    def tiny_transformer(self, diffusers, tiny):
        return diffusers.WanTransformer3DModel(
            patch_size=self.patch, num_attention_heads=tiny.num_heads, attention_head_dim=tiny.head_dim,
            in_channels=self.latent_channels, out_channels=self.latent_channels, text_dim=tiny.text_dim, freq_dim=32,
            ffn_dim=tiny.ffn_dim, num_layers=tiny.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        )

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        vae = self.tiny_vae(diffusers, tiny)
        transformer = self.tiny_transformer(diffusers, tiny)
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=model_cfg.flow_shift or 3.0
        )
        return vae, transformer, scheduler

    def tiny_pipeline(self, diffusers, components: dict):
        return diffusers.WanPipeline(**components, expand_timesteps=self.expand_timesteps)

    def tiny_expert_components(self, diffusers, tiny, model_cfg) -> dict:
        # Wan2.2-A14B's twin: a second transformer of the same sizes (its own random weights), below boundary_ratio.
        if getattr(model_cfg, "boundary_ratio", None) is None:
            return {}
        return {"transformer_2": self.tiny_transformer(diffusers, tiny), "boundary_ratio": model_cfg.boundary_ratio}

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        return transformer_config["text_dim"]


@register_family("wan22")
class Wan22(Wan21):
    """Wan2.2-TI2V: a residual VAE compressing 16x in space, and a timestep per token."""

    spatial_compression = 16
    expand_timesteps = True
    takes_image = True  # WanImageToVideoPipeline's expand_timesteps conditioning (Wan21.image_run)
    latent_channels = 48

    @classmethod
    def describes(cls, pipe) -> bool:
        """A WanPipeline with expand_timesteps, or a user's WanImageToVideoPipeline of Wan2.2-TI2V (stas.apply_stas):
        the same transformer, token grid and two-pass CFG."""
        import diffusers

        return super().describes(pipe) or (isinstance(pipe, diffusers.WanImageToVideoPipeline)
                                            and bool(getattr(pipe.config, "expand_timesteps", False)))

    def tiny_vae(self, diffusers, tiny):
        # The Wan2.2 residual VAE: 48 latent channels, 2x2 pixel patchify before the 8x convolutional stack.
        return diffusers.AutoencoderKLWan(
            base_dim=tiny.vae_base_dim, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        )
