"""Wan2.1 and Wan2.2 (diffusers WanPipeline / WanTransformer3DModel / AutoencoderKLWan)."""

from __future__ import annotations

from stas.backbones.base import DTYPES, Backbone, register_family


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

    def pretrained_components(self, diffusers, model_cfg, load_kwargs: dict) -> dict:
        # Wan's VAE is published for float32 decoding; bf16 decoding visibly degrades frames.
        vae_dtype = DTYPES[model_cfg.vae_dtype or "float32"]
        kwargs = {key: value for key, value in load_kwargs.items() if key != "torch_dtype"}
        return {"vae": diffusers.AutoencoderKLWan.from_pretrained(model_cfg.hub_id, subfolder="vae",
                                                                  torch_dtype=vae_dtype, **kwargs)}

    def tiny_vae(self, diffusers, tiny):
        return diffusers.AutoencoderKLWan(
            base_dim=tiny.vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        vae = self.tiny_vae(diffusers, tiny)
        transformer = diffusers.WanTransformer3DModel(
            patch_size=self.patch, num_attention_heads=tiny.num_heads, attention_head_dim=tiny.head_dim,
            in_channels=self.latent_channels, out_channels=self.latent_channels, text_dim=tiny.text_dim, freq_dim=32,
            ffn_dim=tiny.ffn_dim, num_layers=tiny.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        )
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=model_cfg.flow_shift or 3.0
        )
        return vae, transformer, scheduler

    def tiny_pipeline(self, diffusers, components: dict):
        return diffusers.WanPipeline(**components, expand_timesteps=self.expand_timesteps)

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        return transformer_config["text_dim"]


@register_family("wan22")
class Wan22(Wan21):
    """Wan2.2-TI2V: a residual VAE compressing 16x in space, and a timestep per token."""

    spatial_compression = 16
    expand_timesteps = True
    latent_channels = 48

    def tiny_vae(self, diffusers, tiny):
        # The Wan2.2 residual VAE: 48 latent channels, 2x2 pixel patchify before the 8x convolutional stack.
        return diffusers.AutoencoderKLWan(
            base_dim=tiny.vae_base_dim, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        )
