"""CogVideoX 1.5 (family cogvideox15: patch_size_t=2, latent frames padded at the front): the token grid the
transformer really sees, verified by planting a value in the latents at a known (latent frame, row, column) and
finding the token of the real transformer's patch embedding it lands on, at the published size and the twin's; the
regions it falls in; bad sizes; and the twin tiny_cogvideox15 generating (as `pipe(...)` does, bit for bit),
analyzing (steering bit for bit with its pipeline, and its steered tokens: tests/test_owned_loop.py)."""

from __future__ import annotations

import pytest
import torch

from stas.backbones import backbone_of_pipeline, get_backbone
from stas.config import ConfigError, load_group_option, validate
from stas.core.layout import TokenLayout
from stas.prompts import Item

from conftest import build_twin, compose, landing_tokens

TWIN = "tiny_cogvideox15"
ITEM = Item(0, "a red fox runs through fresh snow", 0, 3)


def embed_transformer(height: int, width: int, frames: int):
    """A real CogVideoXTransformer3DModel with CogVideoX 1.5's patching (2 x 2 x 2, RoPE, 16 latent channels) at a
    small width; its patch embedding is all the token order depends on."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=8,
        text_embed_dim=8, num_layers=1, sample_height=height // 8, sample_width=width // 8, sample_frames=frames,
        patch_size=2, patch_size_t=2, use_rotary_positional_embeddings=True, max_text_seq_length=4).eval()


@pytest.mark.parametrize("model", ["cogvideox15_5b", TWIN])
def test_a_planted_latent_lands_on_the_token_the_layout_gives(model):
    cfg = load_group_option("model", model)
    backbone = get_backbone(model)
    height, width, frames = cfg.height, cfg.width, cfg.num_frames
    layout = TokenLayout.for_video(backbone, height, width, frames)
    padding = backbone.padding_frames(frames)
    latent_frames = (frames - 1) // 4 + 1
    transformer = embed_transformer(height, width, frames)
    text = torch.zeros(1, 4, 8)

    def embed(video):  # the patch embedding's video tokens (the 4 text tokens come first)
        return transformer.patch_embed(text, video)[:, 4:]

    # the latents the pipeline gives the transformer: the padding frames in front
    latents = torch.randn(1, latent_frames + padding, 16, height // 8, width // 8,
                          generator=torch.Generator().manual_seed(0))
    assert backbone.grid_of_latents(latents) == (layout.frames, layout.height, layout.width)
    first = layout.mask("first_frame")
    boundary = layout.mask("boundary", 1, "rows")
    rows, columns = height // 8, width // 8
    for frame, row, column in [(0, 0, 0), (0, rows - 1, columns - 1), (1, 3, 5), (latent_frames - 1, rows // 2, 1),
                               (2, 0, columns // 2), (latent_frames - 1, rows - 1, 0)]:
        padded = frame + padding  # the video's latent frame `frame` in the padded latents
        token = ((padded // 2) * layout.height + row // 2) * layout.width + column // 2
        assert landing_tokens(embed, latents, (padded, row, column), frame_axis=1) == [token]
        # pixel frame 0 (latent frame 0) is in the first-frame tokens; a later token's first and last token rows
        # are boundary tokens
        assert bool(first[token]) == (padded // 2 == 0)
        assert bool(boundary[token]) == (padded // 2 > 0 and row // 2 in (0, layout.height - 1))
    if padding:  # the padding frame shares temporal token 0 with latent frame 0
        assert landing_tokens(embed, latents, (0, 0, 0), frame_axis=1) == [0]


def test_the_published_grid_and_padding():
    backbone = get_backbone("cogvideox15_5b")
    assert backbone.latent_grid(768, 1360, 81) == (11, 48, 85)  # 21 latent frames, padded to 22
    assert backbone.padding_frames(81) == 1 and backbone.padding_frames(85) == 0
    assert backbone.latent_grid(768, 1360, 85) == (11, 48, 85)  # 22 latent frames, no padding
    assert backbone.latent_grid(768, 1360, 89) == (12, 48, 85)  # 23 latent frames, padded to 24
    assert get_backbone("cogvideox5b").latent_grid(480, 720, 49) == (13, 30, 45)  # 1.0: no temporal patch


@pytest.mark.parametrize("overrides,message", [
    (["model.num_frames=80"], r"model.num_frames=80 must be 4k\+1 \(e.g. 17\) for a VAE compressing time 4x"),
    (["model.width=1352"], r"model.width=1352 must be a positive multiple of 16 for cogvideox15_5b"),
    (["model.height=760"], r"model.height=760 must be a positive multiple of 16"),
])
def test_bad_sizes_get_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(["model=cogvideox15_5b", "logger=none", *overrides]))


@pytest.fixture(scope="module")
def twin():
    return build_twin(TWIN)[1:]


def test_the_twin_is_recognised_as_cogvideox15_and_its_pipeline_pads(twin):
    backbone, pipe = twin
    assert backbone_of_pipeline(pipe).family == "cogvideox15" and pipe.transformer.config.patch_size_t == 2
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(prompt=ITEM.prompt, generator=torch.Generator().manual_seed(0), num_inference_steps=1,
                 height=64, width=96, num_frames=17, output_type="latent")
    finally:
        handle.remove()
    assert seen[0][1] == 6  # 5 latent frames, one padding frame in front
    assert TokenLayout.for_video(backbone, 64, 96, 17) == TokenLayout(3, 4, 6)
