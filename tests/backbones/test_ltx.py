"""LTX-Video (family ltx: latents packed (B, S, C), 8x time, 32x space, patch 1): the token grid the transformer
really sees, verified by planting a value in the latents at a known (latent frame, row, column), packing them as the
pipeline does and finding the token of the real transformer's input projection it lands on, and the RoPE position
the transformer gives that token; the grid of a call; bad sizes; and the twin tiny_ltx generating (as `pipe(...)`
does, bit for bit, also with a timestep-conditioned VAE) and analyzing (steering bit for bit with its pipeline, and
its steered tokens: tests/test_owned_loop.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stas.backbones import BackboneError, backbone_of_pipeline, get_backbone
from stas.backbones.loading import check_pipeline_matches
from stas.config import ConfigError, load_group_option, validate
from stas.core.layout import TokenLayout
from stas.loop import denoise, make_guider
from stas.prompts import Item

from conftest import compose, landing_tokens

TWIN = "tiny_ltx"
ITEM = Item(0, "a red fox runs through fresh snow", 0, 3)
CHANNELS = 128  # latent channels of the published VAE


def projection_transformer():
    """A real LTXVideoTransformer3DModel with the published latent channels and patch 1, at a small width: its input
    projection and RoPE are all the token order and positions depend on."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    return LTXVideoTransformer3DModel(in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2,
                                      attention_head_dim=8, cross_attention_dim=16, num_layers=1,
                                      caption_channels=8).eval()


def packed_projection(transformer):
    """The transformer's input projection of unpacked latents (B, C, F, H, W), packed as LTXPipeline packs them."""
    from diffusers import LTXPipeline

    def projected(video):
        packed = LTXPipeline._pack_latents(video, transformer.config.patch_size, transformer.config.patch_size_t)
        return transformer.proj_in(packed)

    return projected


@pytest.mark.parametrize("model", ["ltx_video", TWIN])
def test_a_planted_latent_lands_on_the_token_the_layout_gives(model):
    cfg = load_group_option("model", model)
    backbone = get_backbone(model)
    layout = TokenLayout.for_video(backbone, cfg.height, cfg.width, cfg.num_frames)
    frames, rows, columns = (cfg.num_frames - 1) // 8 + 1, cfg.height // 32, cfg.width // 32
    assert (layout.frames, layout.height, layout.width) == (frames, rows, columns)  # a token per latent position
    transformer = projection_transformer()
    latents = torch.randn(1, CHANNELS, frames, rows, columns, generator=torch.Generator().manual_seed(0))
    assert backbone.grid_of_latents(latents) == (frames, rows, columns)
    positions = transformer.rope._prepare_video_coords(1, frames, rows, columns, None, torch.device("cpu"))[0]
    first, boundary = layout.mask("first_frame"), layout.mask("boundary", 1, "rows")
    for frame, row, column in [(0, 0, 0), (0, rows - 1, columns - 1), (1, 2, 3), (frames - 1, rows // 2, 1),
                               (frames // 2, 0, columns // 2), (frames - 1, rows - 1, 0)]:
        token = (frame * rows + row) * columns + column
        assert landing_tokens(packed_projection(transformer), latents, (frame, row, column), frame_axis=2) == [token]
        assert positions[token].tolist() == [frame, row, column]  # where the transformer's RoPE puts it
        # latent frame 0 (pixel frame 0 alone) is the first-frame tokens; a later frame's first and last rows are
        # boundary tokens
        assert bool(first[token]) == (frame == 0)
        assert bool(boundary[token]) == (frame > 0 and row in (0, rows - 1))


def test_the_published_grid():
    backbone = get_backbone("ltx_video")
    assert backbone.latent_grid(480, 704, 161) == (21, 15, 22)
    assert backbone.latent_grid(512, 768, 121) == (16, 16, 24)
    assert backbone.pixels_per_token == (32, 32)


@pytest.mark.parametrize("overrides,message", [
    (["model.num_frames=160"], r"model.num_frames=160 must be 8k\+1 \(e.g. 33\) for a VAE compressing time 8x"),
    (["model.num_frames=17"], None),
    (["model.width=700"], r"model.width=700 must be a positive multiple of 32 for ltx_video \(32x VAE x patch 1\)"),
    (["model.height=488"], r"model.height=488 must be a positive multiple of 32"),
    (["model.steps=1"], r"model.steps=1 is too few for family ltx: its pipeline's scheduler needs at least 2 steps"),
    (["model.steps=2"], None),
])
def test_sizes_and_steps_are_checked_with_a_clear_error(overrides, message):
    cfg = compose(["model=ltx_video", "logger=none", *overrides])
    if message is None:
        assert validate(cfg).family == "ltx"
        return
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_the_grid_of_a_call_comes_from_its_arguments_not_the_packed_latents():
    backbone = get_backbone(TWIN)
    packed = torch.zeros(2, 60, 8)
    inputs = {"hidden_states": packed, "encoder_hidden_states": torch.zeros(2, 4, 32), "timestep": torch.zeros(2),
              "encoder_attention_mask": torch.ones(2, 4)}
    assert backbone.grid_of_call((), {**inputs, "num_frames": 3, "height": 4, "width": 5}) == (3, 4, 5)
    assert backbone.grid_of_call((*inputs.values(), 3, 5, 4), {}) == (3, 5, 4)  # positional, as forward orders them
    with pytest.raises(BackboneError, match=r"tiny_ltx: an LTX transformer call without num_frames, height, width"):
        backbone.grid_of_call((), {**inputs, "video_coords": torch.zeros(2, 3, 60)})


def test_the_twin_is_recognised_as_ltx_and_its_transformer_gets_packed_latents(tiny_pipelines):
    _, backbone, pipe = tiny_pipelines[TWIN]
    assert backbone_of_pipeline(pipe).family == "ltx"
    assert (pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio) == (8, 32)
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(kwargs["hidden_states"].shape),
                                                  backbone.grid_of_call(args, kwargs))), with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(prompt=ITEM.prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                 height=128, width=160, num_frames=17, output_type="latent")
    finally:
        handle.remove()
    # one call a step on [uncond, cond]; 3 x 4 x 5 tokens of 8 latent channels
    assert seen == [((2, 60, 8), (3, 4, 5))] * 2
    assert TokenLayout.for_video(backbone, 128, 160, 17) == TokenLayout(3, 4, 5)


def test_a_checkpoint_is_checked_against_its_config_with_the_pipelines_own_vae_ratios(tiny_pipelines):
    """LTXPipeline has vae_temporal/spatial_compression_ratio, not vae_scale_factor_*: the load check reads those,
    and only the block count of the twin differs from ltx_video's config."""
    _, _, pipe = tiny_pipelines[TWIN]
    check_pipeline_matches(pipe, get_backbone(TWIN))
    with pytest.raises(BackboneError, match=r"^model 'ltx_video' does not match its checkpoint: "
                                            r"num_layers: config says 28, checkpoint has 2$"):
        check_pipeline_matches(pipe, get_backbone("ltx_video"))
    wan = tiny_pipelines["tiny_wan21"][2]
    with pytest.raises(BackboneError, match=r"pipeline: config says LTXPipeline, checkpoint has WanPipeline; .*"
                                            r"vae temporal compression: config says 8, checkpoint has None"):
        check_pipeline_matches(wan, get_backbone(TWIN))


@pytest.mark.parametrize("cfg_on", [True, False], ids=["cfg", "no_cfg"])
def test_a_timestep_conditioned_vae_decodes_bit_for_bit(tiny_pipelines, cfg_on):
    """LTX-Video >= 0.9.1 decodes at a timestep with noise mixed in (drawn from the call's generator)."""
    import diffusers

    cfg, backbone, twin = tiny_pipelines[TWIN]
    torch.manual_seed(1)
    vae = backbone.tiny_vae(diffusers, cfg.model.tiny, timestep_conditioning=True)
    pipe = diffusers.LTXPipeline(scheduler=twin.scheduler, vae=vae, text_encoder=twin.text_encoder,
                                 tokenizer=twin.tokenizer, transformer=twin.transformer)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**backbone.pipeline_kwargs(cfg.model), "num_inference_steps": 2, "decode_timestep": 0.05,
              "decode_noise_scale": 0.025, "guidance_scale": 3.0 if cfg_on else 1.0}
    with torch.inference_mode():
        expected = pipe(prompt=ITEM.prompt, generator=torch.Generator().manual_seed(3), **kwargs).frames
        frames = denoise(pipe, backbone, make_guider(compose([f"model={TWIN}"]).guidance), prompt=ITEM.prompt,
                         generator=torch.Generator().manual_seed(3), **kwargs).frames
        plain = denoise(pipe, backbone, make_guider(compose([f"model={TWIN}"]).guidance), prompt=ITEM.prompt,
                        generator=torch.Generator().manual_seed(3), **{**kwargs, "decode_noise_scale": 0.0}).frames
    assert np.array_equal(frames, expected)
    assert not np.array_equal(plain, expected)  # the noise scale reached the decoder
