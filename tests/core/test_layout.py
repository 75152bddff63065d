import pytest
import torch

from stas.config import load_group_option
from stas.backbones import get_backbone
from stas.core.layout import LayoutError, TokenLayout

REAL = {  # model: latent grid at its default size
    "wan21_1.3b": (21, 30, 52),
    "wan22_5b": (31, 22, 40),
    "cogvideox5b": (13, 30, 45),
    "cogvideox2b": (13, 30, 45),
    "wan21_14b": (21, 45, 80),
    "wan22_a14b": (21, 45, 80),
    "cogvideox15_5b": (11, 48, 85),  # 21 latent frames padded at the front to 22, two a token
    "hunyuanvideo": (33, 45, 80),  # 720x1280x129
    "ltx_video": (21, 15, 22),  # 161x480x704: 8x time, 32x space, a token per latent position
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_for_video_matches_the_published_token_counts(name):
    model = load_group_option("model", name)
    layout = TokenLayout.for_video(get_backbone(name), model.height, model.width, model.num_frames)
    assert (layout.frames, layout.height, layout.width) == REAL[name]
    assert layout.num_tokens == REAL[name][0] * REAL[name][1] * REAL[name][2]


def test_wan21_example_from_the_issue():
    layout = TokenLayout.for_video(get_backbone("wan21_1.3b"), 480, 832, 81)
    assert (layout.frames, layout.height, layout.width, layout.num_tokens) == (21, 30, 52, 32760)


def _expected(layout, width, unit):
    """Reference masks written index by index from the definition (frame-major order)."""
    span = width if unit == "tokens" else width * layout.width
    first, boundary, interior = (torch.zeros(layout.num_tokens, dtype=torch.bool) for _ in range(3))
    for f in range(layout.frames):
        for h in range(layout.height):
            for w in range(layout.width):
                i = f * layout.height * layout.width + h * layout.width + w
                pos = h * layout.width + w
                if f == 0:
                    first[i] = True
                elif pos < span or pos >= layout.tokens_per_frame - span:
                    boundary[i] = True
                else:
                    interior[i] = True
    return first, boundary, interior


@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("unit,width", [("tokens", 1), ("tokens", 7), ("rows", 1), ("rows", 2)])
def test_masks_of_the_real_backbones(name, unit, width):
    model = load_group_option("model", name)
    layout = TokenLayout.for_video(get_backbone(name), model.height, model.width, model.num_frames)
    first, boundary, interior = _expected(layout, width, unit)
    assert torch.equal(layout.mask("first_frame"), first)
    assert torch.equal(layout.mask("boundary", width, unit), boundary)
    assert torch.equal(layout.mask("interior", width, unit), interior)
    assert layout.mask("all").all()
    assert torch.equal(layout.mask("first_frame+boundary", width, unit), first | boundary)
    # the three regions partition the sequence
    assert torch.equal(first.int() + boundary.int() + interior.int(), torch.ones(layout.num_tokens, dtype=torch.int))
    assert torch.equal(layout.indices("boundary", width, unit), boundary.nonzero().squeeze(1))


def test_row_boundary_counts():
    layout = TokenLayout(3, 4, 6)
    assert int(layout.mask("boundary", 1, "rows").sum()) == 2 * 2 * 6
    assert int(layout.mask("boundary", 2, "tokens").sum()) == 2 * 2 * 2


def test_mask_is_a_copy_callers_may_modify():
    layout = TokenLayout(2, 2, 4)
    mask = layout.mask("first_frame")
    mask[:] = False
    assert layout.mask("first_frame").sum() == 8


@pytest.mark.parametrize("target,width,unit,match", [
    ("nope", 1, "tokens", "unknown target 'nope'"),
    ("first_frame+edge", 1, "tokens", "unknown target 'edge'"),
    ("boundary", 2, "rows", "leaves no interior"),
    ("boundary", 12, "tokens", "leaves no interior"),
    ("boundary", 1, "columns", "not one of tokens, rows"),
])
def test_bad_masks(target, width, unit, match):
    with pytest.raises(LayoutError, match=match):
        TokenLayout(3, 4, 6).mask(target, width, unit)
