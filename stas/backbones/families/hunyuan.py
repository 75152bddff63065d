"""HunyuanVideo (diffusers HunyuanVideoPipeline / HunyuanVideoTransformer3DModel / AutoencoderKLHunyuanVideo).

Two block lists run one after the other: `transformer_blocks` (double-stream: video and text kept as two streams)
and `single_transformer_blocks` (single-stream: diffusers 0.42 concatenates [video, text] inside the block and splits
them again on return). Both take and return (video tokens, text tokens), so stas sees one list of blocks, the double
ones first: with HunyuanVideo's 20 + 40, layer indices 0-19 are the double-stream blocks and 20-59 the single-stream
ones (steer.layers, analysis, plant layers all count over both).

The checkpoint is guidance-distilled: `guidance_scale` enters the transformer as an embedding (its `guidance`
input), one transformer call per step. Two-branch classifier-free guidance runs only with `true_cfg_scale > 1` and
a negative prompt (cond call, then uncond call), so every CFG decision here (branches, NFE, steered branches)
follows true_cfg_scale, and the guider guides at true_cfg_scale.
"""

from __future__ import annotations

import re

import torch

from stas.backbones.base import Backbone, DenoisingRun, Expert, register_family

# Llama 3's pre-tokenizer pattern (its tokenizer.json), in Python's `re` (no \p classes): words with one leading
# non-letter, 1-3 digits, punctuation runs with a leading space, newlines, spaces.
LLAMA3_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+"
                      r"|\s+(?!\S)|\s+")


@register_family("hunyuanvideo")
class HunyuanVideo(Backbone):
    pipeline = "HunyuanVideoPipeline"
    transformer_class = "HunyuanVideoTransformer3DModel"
    blocks_attr = "transformer_blocks"
    single_blocks_attr = "single_transformer_blocks"
    temporal_compression = 4
    spatial_compression = 8
    patch = (1, 2, 2)
    cfg_layout = "two_pass"
    block_returns_tuple = True
    text_tokens = ("separate stream (encoder_hidden_states) in the double-stream blocks; in the single-stream blocks "
                   "concatenated after the video tokens inside the block and split off on return")
    latents_frame_axis = 2  # latents are (B, C, F, H, W)
    joint_attention = True  # both kinds of blocks' attention returns (video, text)
    flow_shift_key = "shift"  # FlowMatchEulerDiscreteScheduler's
    takes_true_cfg = True

    # ------------------------------------------------------------------------------- true CFG, not guidance_scale

    def uses_cfg(self, kwargs: dict) -> bool:
        # HunyuanVideoPipeline.__call__: do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        return kwargs.get("true_cfg_scale", 1.0) > 1.0 and kwargs.get("negative_prompt") is not None

    def cfg_settings(self, model_cfg) -> str:
        return (f"model.true_cfg_scale={model_cfg.true_cfg_scale!r}: two-branch CFG needs > 1; "
                f"model.guidance_scale={model_cfg.guidance_scale!r} is the distilled guidance embedding, one branch")

    def pipeline_call_cfg(self, pipe) -> None:
        return None  # HunyuanVideoPipeline keeps true_cfg_scale and the negative prompt to its __call__

    def pipeline_kwargs(self, model_cfg) -> dict:
        return {**super().pipeline_kwargs(model_cfg), "true_cfg_scale": model_cfg.true_cfg_scale}

    # ----------------------------------------------------- HunyuanVideoPipeline.__call__'s parts, for stas.loop

    def denoising_run(self, pipe, args: dict) -> DenoisingRun:
        import numpy as np
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import retrieve_timesteps

        device, do_cfg, dtype = pipe._execution_device, self.uses_cfg(args), pipe.transformer.dtype
        embeds, pooled, mask = self.encoded(pipe, args["prompt"], args, device, dtype)
        negative = self.encoded(pipe, args["negative_prompt"], args, device, dtype) if do_cfg else (None,) * 3
        steps = args["num_inference_steps"]
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas)
        latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, args["height"], args["width"],
                                       args["num_frames"], torch.float32, device, args["generator"])
        pipe.scheduler.set_begin_index(0)
        run = DenoisingRun(pipe, args, device, embeds, negative[0], timesteps, latents, do_cfg)
        run.extra.update(pooled=(pooled, negative[1]), mask=(mask, negative[2]))
        # the distilled guidance, embedded: one value per row of a call
        run.call_inputs["guidance"] = torch.tensor([args["guidance_scale"]], dtype=dtype, device=device) * 1000.0
        return run

    def encoded(self, pipe, prompt, args: dict, device, dtype) -> tuple:
        """(Llama embeddings, CLIP pooled embedding, attention mask) of a prompt, in the transformer's dtype."""
        embeds, pooled, mask = pipe.encode_prompt(prompt=prompt, num_videos_per_prompt=1, device=device,
                                                  max_sequence_length=args["max_sequence_length"])
        return embeds.to(dtype), pooled.to(dtype), mask.to(dtype)

    def branch_inputs(self, run: DenoisingRun) -> dict:
        return {**super().branch_inputs(run), "pooled_projections": run.extra["pooled"],
                "encoder_attention_mask": run.extra["mask"]}

    def step_expert(self, run: DenoisingRun, step: int, t) -> Expert:
        return Expert("transformer", run.pipe.transformer, run.args["true_cfg_scale"])

    def call_inputs(self, run: DenoisingRun, t, rows: int) -> dict:
        latents = run.latents.to(run.pipe.transformer.dtype)
        hidden = torch.cat([latents] * rows) if rows > 1 else latents
        return {"hidden_states": hidden, "timestep": t.expand(rows).to(run.latents.dtype),
                "guidance": run.call_inputs["guidance"].expand(rows)}

    def decode_latents(self, run: DenoisingRun):
        vae = run.pipe.vae
        video = vae.decode(run.latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return run.pipe.video_processor.postprocess_video(video, output_type=run.args["output_type"])

    # -------------------------------------------------------------------------------------------- tiny twin

    def tiny_components(self, diffusers, tiny, model_cfg) -> tuple:
        vae = diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=4, block_out_channels=(tiny.vae_base_dim,) * 4, layers_per_block=1, norm_num_groups=2,
        )
        hidden = tiny.num_heads * tiny.head_dim
        third = tiny.head_dim // 4 // 2 * 2  # RoPE over (time, height, width): even parts summing to head_dim
        transformer = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=tiny.num_heads, attention_head_dim=tiny.head_dim,
            num_layers=tiny.num_layers, num_single_layers=tiny.num_single_layers, num_refiner_layers=1,
            mlp_ratio=tiny.ffn_dim / hidden, text_embed_dim=tiny.text_dim, pooled_projection_dim=tiny.text_dim,
            rope_axes_dim=(tiny.head_dim - 2 * third, third, third),
        )
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=model_cfg.flow_shift or 7.0)
        return vae, transformer, scheduler

    def tiny_text_components(self, tiny, model_cfg) -> dict:
        """A 2-layer LlamaModel (the pipeline reads the hidden state 3 from the top) and a 1-layer CLIPTextModel.

        The Llama tokenizer splits Llama 3's special tokens and the words of the pipeline's prompt template as whole
        tokens (the template split with Llama 3's pre-tokenizer pattern) and anything else into characters, so the
        template's system part is 95 tokens with the BOS token, as with Llama 3: the pipeline's crop_start (95) cuts
        it off exactly and the prompt's own tokens reach the transformer, on the real code path."""
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
        from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

        from stas.backbones.tiny import build_tokenizer

        specials = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
        template = re.split("|".join(map(re.escape, ("{}", *specials))), DEFAULT_PROMPT_TEMPLATE["template"])
        words = [word for part in template for word in re.findall(LLAMA3_PRETOKENIZE, part)]
        crop = DEFAULT_PROMPT_TEMPLATE["crop_start"]
        tokenizer = build_tokenizer(model_cfg.max_sequence_length + crop, words, specials, bos="<|begin_of_text|>")
        llama = LlamaModel(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=tiny.text_dim, intermediate_size=2 * tiny.text_dim,
            num_hidden_layers=2, num_attention_heads=tiny.text_dim // 8, num_key_value_heads=tiny.text_dim // 8,
            max_position_embeddings=model_cfg.max_sequence_length + crop, pad_token_id=0))
        clip_tokenizer = build_tokenizer(77)  # the pipeline's CLIP length
        # pooled at </s> (eos_token_id 1), as CLIP pools at its EOS token
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=tiny.text_dim, intermediate_size=2 * tiny.text_dim,
            num_hidden_layers=1, num_attention_heads=tiny.text_dim // 8, max_position_embeddings=77,
            projection_dim=tiny.text_dim, pad_token_id=0, bos_token_id=None, eos_token_id=1))
        return dict(tokenizer=tokenizer, text_encoder=llama.eval(), tokenizer_2=clip_tokenizer,
                    text_encoder_2=clip.eval())

    @classmethod
    def text_dim_of(cls, transformer_config: dict) -> int:
        return transformer_config["text_embed_dim"]

