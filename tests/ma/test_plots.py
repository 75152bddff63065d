"""The analysis figures (stas.ma.plots) on small synthetic stats / summary dicts: one shared colour scale for the
ratio heatmaps (log when the ratios span decades, linear from 0 otherwise), a log axis for the channel peaks, and
every figure saying which blocks / steps it shows and what it averages over."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.colors import LogNorm

from stas.ma.plots import (plot_channels, plot_profile, plot_ratios, plot_tokens, ratio_norm, region_means,
                           write_plots)

LAYERS, STEPS, BRANCHES, PROMPTS, DIM = [0, 1], [0, 1, 2], ["cond", "uncond"], ["a cat", "a dog"], 32
FRAMES, HEIGHT, WIDTH = 3, 3, 4
TOKENS = FRAMES * HEIGHT * WIDTH
MASSIVE, WEAK, NON_MA = [5, 17], [3, 9], [20, 21]


def variant_tensors(first: float, boundary: float, interior: float, seed: int) -> dict:
    """The ma_stats.pt tensors plots read, with region means of the given sizes (noise of 0.1 %)."""
    generator = torch.Generator().manual_seed(seed)
    n, layers, steps, branches = len(PROMPTS), len(LAYERS), len(STEPS), len(BRANCHES)
    means = torch.tensor([first, boundary, interior]).expand(n, layers, steps, branches, 3)
    means = means * (1 + 1e-3 * torch.randn(n, layers, steps, branches, 3, generator=generator))
    regions = torch.stack([means, means * 1.5], dim=-1)  # (N, L, T, B, R, mean|max)
    peaks = torch.rand(layers, steps, branches, DIM, generator=generator) + 0.5
    peaks[..., MASSIVE] = 80.0
    peaks[..., 1] = 0.01  # a channel far below the rest: only a log axis shows it
    return {"regions": regions, "peaks_max": peaks, "thresholds": torch.full((n, layers, steps, branches), 20.0),
            "tokens_mean": torch.rand(1, branches, TOKENS, generator=generator)}


def synthetic(variants: dict[str, tuple[float, float, float]]):
    """(stats, summary) holding only what stas.ma.plots reads."""
    stats = {"meta": {"profile": [[1, 0]]},
             "variants": {name: variant_tensors(*sizes, seed=s) for s, (name, sizes) in enumerate(variants.items())}}
    summary = {
        "model": "synthetic", "prompts": PROMPTS, "layers": LAYERS, "steps": STEPS, "num_steps": 4,
        "branches": BRANCHES, "layout": {"frames": FRAMES, "height": HEIGHT, "width": WIDTH,
                                         "tokens_per_frame": HEIGHT * WIDTH},
        "regions": {"boundary_width": 1, "boundary_unit": "rows"},
        "detection": {"rule": "mean_abs", "ratio": 20.0, "floor": 0.0},
        "results": {name: {"layers": {str(layer): {"massive": MASSIVE, "weak": WEAK, "non_ma": NON_MA}
                                      for layer in LAYERS},
                           "profiles": [{"profile": [1.0] * (HEIGHT * WIDTH), "period": HEIGHT * WIDTH}]}
                    for name in variants},
    }
    return stats, summary


def heatmaps(fig):
    return [image for ax in fig.axes for image in ax.images]


def figure_text(fig) -> str:
    texts = [fig.get_suptitle()] + [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_title(loc) for loc in ("left", "center", "right")]
        texts += [ax.get_xlabel(), ax.get_ylabel()] + [t.get_text() for t in ax.texts]
    return "\n".join(texts)


def test_ratio_heatmaps_share_one_log_scale_when_the_ratios_span_decades():
    stats, summary = synthetic({"vanilla": (300.0, 3.0, 1.0), "steered": (300.0, 300.0, 1.0)})
    fig = plot_ratios(stats, summary)
    images = heatmaps(fig)
    assert len(images) == 4  # 2 variants x (first_frame / boundary, boundary / interior)
    assert len({id(image.norm) for image in images}) == 1  # one norm object, so one scale
    assert {image.get_clim() for image in images} == {images[0].get_clim()}
    assert isinstance(images[0].norm, LogNorm)
    low, high = images[0].get_clim()
    assert low == pytest.approx(1.0, rel=0.01) and high == pytest.approx(300.0, rel=0.01)  # the whole range, 1 included
    colorbars = [ax for ax in fig.axes if ax.get_ylabel().startswith("ratio of mean MA magnitudes")]
    assert len(colorbars) == 1  # one labelled colour bar for all panels


def test_ratio_heatmaps_are_linear_from_zero_when_the_ratios_hardly_vary():
    # ratios 1.00 .. 1.02 with 0.1 % noise: autoscaled, this noise filled the whole colour range
    stats, summary = synthetic({"vanilla": (1.02, 1.01, 1.0), "steered": (1.0, 1.0, 1.0)})
    images = heatmaps(plot_ratios(stats, summary))
    assert len({image.get_clim() for image in images}) == 1
    assert not isinstance(images[0].norm, LogNorm)
    low, high = images[0].get_clim()
    assert low == 0.0 and high == pytest.approx(1.02, rel=0.01)
    # the first/interior cell of vanilla (1.02) and of steered (1.00) get nearly the same colour
    assert abs(images[0].norm(1.02) - images[0].norm(1.0)) < 0.03


def test_ratio_norm_rules():
    assert isinstance(ratio_norm(np.array([0.5, 2.0, 40.0])), LogNorm)
    assert not isinstance(ratio_norm(np.array([2.0, 19.0])), LogNorm)  # less than a decade
    linear = ratio_norm(np.array([np.nan, np.inf, 0.2, 0.4]))  # all below 1: the scale still reaches 1
    assert (linear.vmin, linear.vmax) == (0.0, 1.0)
    empty = ratio_norm(np.array([np.nan]))
    assert (empty.vmin, empty.vmax) == (0.0, 1.0)


def test_region_means_average_prompts_and_branches_with_mas():
    regions = torch.zeros(2, 1, 1, 2, 3, 2)
    regions[..., 0] = torch.arange(4.0).reshape(2, 1, 1, 2, 1)  # prompts x branches: 0, 1, 2, 3
    regions[..., 1] = regions[..., 0]  # the observation with means 0 has no MA (every max 0): left out
    assert region_means(regions).shape == (1, 1, 3)
    assert region_means(regions)[0, 0].tolist() == [2.0, 2.0, 2.0]


def test_channel_peaks_are_on_a_log_axis_with_the_classes_marked():
    stats, summary = synthetic({"vanilla": (3.0, 2.0, 1.0)})
    fig = plot_channels(stats, summary, 1)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert ax.get_ylim()[0] < 0.01  # the weakest channel (0.01) is inside the axis
    labels = ax.get_legend_handles_labels()[1]
    for kind, channels in (("massive", MASSIVE), ("weak", WEAK), ("non-MA", NON_MA)):
        assert f"{kind} ({len(channels)})" in labels
    marked = {label: collection.get_offsets()[:, 0].tolist()
              for collection, label in zip(ax.collections, ["massive", "weak", "non_ma"])}
    assert marked == {"massive": MASSIVE, "weak": WEAK, "non_ma": NON_MA}


@pytest.mark.parametrize("make", [lambda s, m: plot_tokens(s, m, 0), plot_ratios, lambda s, m: plot_channels(s, m, 1),
                                  plot_profile], ids=["tokens", "ratios", "channels", "profile"])
def test_every_figure_says_what_it_averages_and_which_block_and_step(make):
    stats, summary = synthetic({"vanilla": (3.0, 2.0, 1.0), "steered": (3.0, 3.0, 1.0)})
    text = figure_text(make(stats, summary))
    assert "2 prompts" in text and "CFG branches cond + uncond" in text
    assert "block" in text and "step" in text
    assert "mean over" in text or "max over" in text
    summary["prompts"] = ["a cat", "a cat"]
    summary["branches"] = ["cond"]
    text = figure_text(make(stats, summary))
    assert "2 videos of 1 prompts" in text and "CFG branch cond only" in text


def test_block_and_steps_are_named_in_the_ratio_and_channel_titles():
    stats, summary = synthetic({"vanilla": (3.0, 2.0, 1.0)})
    assert "blocks 0-1 x steps 0-2 of 4" in plot_ratios(stats, summary).get_suptitle()
    assert "block 1, steps 0-2 of 4" in plot_channels(stats, summary, 1).get_suptitle()
    assert "block 1, step 0" in plot_tokens(stats, summary, 0).get_suptitle()


def test_write_plots_writes_every_figure(tmp_path):
    stats, summary = synthetic({"vanilla": (300.0, 3.0, 1.0), "steered": (3.0, 3.0, 1.0)})
    written = write_plots(stats, summary, tmp_path, ["tokens", "ratios", "channels", "profile"])
    assert sorted(p.name for p in written) == ["ma_channels_L1.png", "ma_profile.png", "ma_ratios.png",
                                               "ma_tokens_L1_s0.png"]
    for path in written:
        assert matplotlib.image.imread(path)[..., :3].std() > 0.05
