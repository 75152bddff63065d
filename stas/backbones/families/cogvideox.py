"""CogVideoX (diffusers CogVideoXPipeline / CogVideoXTransformer3DModel / AutoencoderKLCogVideoX)."""

from __future__ import annotations

from types import SimpleNamespace

from stas.backbones.base import Backbone, register_family


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

    def pipeline_kwargs(self, model_cfg) -> dict:
        return {**super().pipeline_kwargs(model_cfg), "use_dynamic_cfg": model_cfg.use_dynamic_cfg}

    def transformer_inputs(self, transformer, height: int, width: int, latent_frames: int, device) -> dict:
        from diffusers import CogVideoXPipeline

        # The pipeline's own RoPE tables, from the parts of the pipeline it reads.
        owner = SimpleNamespace(vae_scale_factor_spatial=self.spatial_compression, transformer=transformer)
        rotary = CogVideoXPipeline._prepare_rotary_positional_embeddings(owner, height, width, latent_frames, device)
        return {"image_rotary_emb": rotary}

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
            use_rotary_positional_embeddings=True,
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
