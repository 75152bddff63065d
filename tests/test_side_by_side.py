"""Side-by-side comparison frames (stas.video), on arrays: latent-chunk boundary marks, the frame index, the
difference panel, one height for all panels, labels that stay inside their panel, different frame counts.
The CLI around them: tests/rundir/test_untrusted_run_dirs.py (test_side_by_side_*)."""

import numpy as np
import pytest
from PIL import ImageFont

from stas.errors import UserError
from stas.video import (INFO_BAR, LABEL_BAR, LATENT_INSIDE, LATENT_START, Panel, comparison_panels, difference,
                        fit_text, latent_starts, side_by_side)


def clip(frames=17, height=16, width=24, value=None, seed=0):
    if value is not None:
        return np.full((frames, height, width, 3), value, dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def latent_row_colour(canvas, rows, right):
    """Per frame, the colour of the latent-frame row at a panel's right edge (text starts at its left)."""
    y = LABEL_BAR + rows + INFO_BAR + INFO_BAR // 2
    return [tuple(int(c) for c in canvas[t, y, right]) for t in range(len(canvas))]


@pytest.mark.parametrize("compression, starts", [(4, [0, 1, 5, 9, 13]), (3, [0, 1, 4, 7, 10, 13, 16]),
                                                 (1, list(range(17)))])
def test_latent_starts_are_frame_zero_then_every_chunk(compression, starts):
    assert [t for t, start in enumerate(latent_starts(17, compression)) if start] == starts


def test_boundary_marks_are_drawn_at_exactly_the_frames_that_start_a_latent_frame():
    """Two panels of different backbones (compression 4, and a made-up 3) in one video: each panel's latent row is
    amber at exactly its own chunk starts."""
    canvas = side_by_side([Panel(clip(), "c4", 4), Panel(clip(seed=1), "c3", 3)], gap=4)
    first = latent_row_colour(canvas, 16, 24 - 2)
    second = latent_row_colour(canvas, 16, 24 + 4 + 24 - 2)
    assert [t for t, colour in enumerate(first) if colour == LATENT_START] == [0, 1, 5, 9, 13]
    assert [t for t, colour in enumerate(second) if colour == LATENT_START] == [0, 1, 4, 7, 10, 13, 16]
    assert {colour for colour in first + second} == {LATENT_START, LATENT_INSIDE}


def test_every_frame_shows_its_index():
    """The panels are the same in every frame: only the frame index can tell the frames' info rows apart."""
    frames = 12
    canvas = side_by_side([Panel(clip(frames, value=90), "same", 1), Panel(clip(frames, value=90), "same", 1)])
    index_rows = canvas[:, LABEL_BAR + 16 : LABEL_BAR + 16 + INFO_BAR]
    assert len({row.tobytes() for row in index_rows}) == frames
    assert len({frame[:LABEL_BAR + 16].tobytes() for frame in canvas}) == 1  # labels and panels: unchanged


def test_difference_panel_is_the_amplified_absolute_difference():
    a = np.zeros((2, 2, 3, 3), dtype=np.uint8)
    b = a.copy()
    a[0, 0, 0] = (10, 200, 0)
    b[0, 0, 0] = (30, 100, 70)  # |b - a| = 20, 100, 70; x4 = 80, 400 -> 255, 280 -> 255
    b[1, 1, 2] = (1, 0, 0)
    expected = np.zeros_like(a)
    expected[0, 0, 0] = (80, 255, 255)
    expected[1, 1, 2] = (4, 0, 0)
    assert np.array_equal(difference(a, b, 4), expected)
    assert np.array_equal(difference(b, a, 4), expected)  # absolute
    assert np.array_equal(difference(a, b, 0.5), np.round(np.abs(b.astype(float) - a) * 0.5).astype(np.uint8))
    panels = comparison_panels([a, b], ["vanilla", "steered"], [4, 4], diff_gain=4)
    assert [panel.label for panel in panels] == ["vanilla", "steered", "x4 |steered - vanilla|"]
    assert np.array_equal(panels[2].frames, expected)
    assert [panel.label for panel in comparison_panels([a, b, b], ["tiny_wan21 Vanilla", "tiny_wan21 +STAS",
                                                                   "tiny_cogvideox +STAS"], [4, 4, 4], diff_gain=0.5)][3:] \
        == ["x0.5 |+STAS - Vanilla|", "x0.5 |tiny_cogvideox +STAS - tiny_wan21 Vanilla|"]  # the shared model: once
    canvas = side_by_side(panels, gap=2)
    assert np.array_equal(canvas[:, LABEL_BAR : LABEL_BAR + 2, 3 + 2 + 3 + 2 : 3 + 2 + 3 + 2 + 3], expected)


def test_difference_panel_is_black_when_the_videos_are_equal():
    video = clip()
    panels = comparison_panels([video, video.copy()], ["a", "b"], [4, 4], diff_gain=255)
    assert panels[2].frames.shape == video.shape and not panels[2].frames.any()
    with pytest.raises(UserError, match="one aspect ratio: scaled to one height they are 24x16 and 16x16"):
        comparison_panels([video, clip(width=16)], ["a", "b"], [4, 4], diff_gain=4)
    assert len(comparison_panels([video, clip(width=16)], ["a", "b"], [4, 4])) == 2  # without it: fine


def test_panels_are_scaled_to_one_height_keeping_their_aspect():
    tall, small, square = clip(height=64, width=96), clip(height=32, width=48, seed=1), clip(height=48, width=48)
    panels = comparison_panels([tall, small, square], ["a", "b", "c"], [4, 4, 4])
    assert [panel.frames.shape[1:3] for panel in panels] == [(64, 96), (64, 96), (64, 64)]
    assert np.array_equal(panels[0].frames, tall)  # the tallest is not resampled
    assert abs(panels[1].frames.astype(float).mean() - small.mean()) < 3  # the same picture, larger
    assert [p.frames.shape[1:3] for p in comparison_panels([tall, small], ["a", "b"], [4, 4], height=16)] == [
        (16, 24), (16, 24)]
    canvas = side_by_side(panels, gap=4)
    assert canvas.shape == (17, LABEL_BAR + 64 + 2 * INFO_BAR, 96 + 4 + 96 + 4 + 64, 3)
    assert canvas.shape[1] % 2 == 0 and canvas.shape[2] % 2 == 0  # H.264 yuv420p


def test_long_labels_are_cut_to_their_panel():
    font = ImageFont.load_default()
    label = "tiny_wan21 +stas_paper (alpha=1.5, window=all, targets=first_frame+boundary) " * 3
    cut = fit_text(label, 36, font)
    assert cut.endswith("...") and label.startswith(cut[:-3]) and font.getlength(cut) <= 36
    assert fit_text("short", 200, font) == "short" and fit_text(label, 2, font) == ""
    canvas = side_by_side([Panel(clip(width=40, value=0), label, 4), Panel(clip(width=200, value=0), "", 4)], gap=6)
    bar = canvas[0, :LABEL_BAR]
    assert bar[:, :40].any()  # the label is there
    assert not bar[:, 40:].any()  # and stops at its panel: the gap and the next panel's (empty) label stay black


def test_videos_of_different_lengths_are_cut_to_the_shortest():
    long, short = clip(frames=17), clip(frames=9, seed=1)
    panels = comparison_panels([long, short], ["a", "b"], [4, 4], diff_gain=4)
    assert [len(panel.frames) for panel in panels] == [9, 9, 9]
    assert np.array_equal(panels[0].frames, long[:9])
    canvas = side_by_side(panels)
    assert len(canvas) == 9 and np.array_equal(canvas[:, LABEL_BAR : LABEL_BAR + 16, :24], long[:9])
