"""Figures of a massive-activation analysis (matplotlib, Agg, PNG), from ma_stats.pt and ma_summary.json data.

  tokens    ma_tokens_L{block}_s{step}.png  MA magnitude of every token along the sequence, latent frames marked,
            first-frame / boundary / interior tokens coloured (the paper's figure); one per profile pair
  ratios    ma_ratios.png                   block x step heatmaps of first/boundary and boundary/interior on ONE
                                            colour scale for every panel and variant: logarithmic when the ratios span
                                            more than a decade, else linear from 0 (so noise around 1 stays noise)
  channels  ma_channels_L{block}.png        peak |value| of every channel on a log axis, massive / weak / non-MA marked
  profile   ma_profile.png                  MA magnitude by position inside a latent frame, with its period
With steering on, every figure shows the steered variant next to (below) the vanilla one. Every figure says which
blocks and steps it shows and what it averages (or maximises) over: prompts, CFG branches, tokens, frames.
What is plotted comes from the `stats` tensors and the summary's descriptive keys (model, layers, steps, branches,
prompts, layout, regions, detection, the channel classes, the profiles); no verdict of the summary is re-plotted.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from stas.ma.capture import REGION_NAMES
from stas.core.layout import TokenLayout
from stas.ma.hierarchy import MEAN, region_table
from stas.rundir import atomic_write_bytes

REGION_COLORS = {"first_frame": "tab:red", "boundary": "tab:orange", "interior": "tab:blue"}
CLASS_COLORS = {"massive": "tab:red", "weak": "tab:orange", "non_ma": "tab:green"}
CLASS_LABELS = {"massive": "massive", "weak": "weak", "non_ma": "non-MA"}
MAX_TICKS = 16
LOG_SPAN = 10.0  # ratios whose largest / smallest positive value exceeds this get a logarithmic colour scale
ANNOTATE_CELLS = 80  # heatmap panels with at most this many cells print their values
RATIO_LABEL = "ratio of mean MA magnitudes\nof adjacent regions (white line: 1)"


def save_figure(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _layout(summary: dict) -> TokenLayout:
    return TokenLayout(*(summary["layout"][k] for k in ("frames", "height", "width")))


def _region_masks(summary: dict) -> dict[str, np.ndarray]:
    layout, regions = _layout(summary), summary["regions"]
    return {name: layout.mask(name, regions["boundary_width"], regions["boundary_unit"]).numpy()
            for name in REGION_NAMES}


def _variant_axes(fig: Figure, variants: list[str], columns: int = 1, **kwargs) -> np.ndarray:
    return fig.subplots(len(variants), columns, squeeze=False, **kwargs)


def _spans(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for index in sorted(indices):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _prompts(stats: dict, summary: dict) -> str:
    """'2 prompts', or '6 videos of 3 prompts' with several samples per prompt (counted from the tensors)."""
    first = next(iter(stats["variants"].values()))
    videos = int(first["regions"].shape[0])
    unique = len(set(summary["prompts"]))
    return f"{videos} prompt{'s' * (videos != 1)}" if unique == videos else f"{videos} videos of {unique} prompts"


def _branches(summary: dict) -> str:
    branches = list(summary["branches"])
    if len(branches) == 1:
        return f"CFG branch {branches[0]} only"
    return "CFG branches " + " + ".join(branches)


def _steps(summary: dict) -> str:
    return f"steps {_spans(summary['steps'])} of {summary['num_steps']}"


def region_means(regions: torch.Tensor) -> torch.Tensor:
    """(N, L, T, B, R, 2) region statistics of ma_stats.pt -> (L, T, R): the region means (MA magnitude averaged
    over the region's tokens), averaged over the prompts (N) and CFG branches (B) with MAs (as the verdict does)."""
    return region_table(regions)[..., MEAN]


def ratio_norm(values: np.ndarray) -> Normalize:
    """The one colour scale of the ratio heatmaps: LogNorm over [min(smallest positive, 1), max(largest, 1)] when
    the finite positive ratios span more than LOG_SPAN, else linear from 0 to max(largest, 1). Both contain 1 (the
    region as large as interior), and a linear scale starts at 0, so that +-1 % around a value looks like +-1 %."""
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    top = max(float(finite.max()), 1.0) if finite.size else 1.0
    if positive.size and float(positive.max()) / float(positive.min()) > LOG_SPAN:
        return LogNorm(vmin=min(float(positive.min()), 1.0), vmax=top)
    return Normalize(vmin=0.0, vmax=top)


def plot_tokens(stats: dict, summary: dict, pair: int) -> Figure:
    layer, step = stats["meta"]["profile"][pair]
    layout, masks = _layout(summary), _region_masks(summary)
    variants = list(stats["variants"])
    fig = Figure(figsize=(12, 1.0 + 2.6 * len(variants)), layout="constrained")
    axes = _variant_axes(fig, variants, sharex=True, sharey=True)[:, 0]
    x = np.arange(layout.num_tokens)
    marker = float(np.clip(6000 / layout.num_tokens, 0.5, 14))
    centres = [start + layout.tokens_per_frame / 2 for start in layout.frame_starts()]
    every = max(1, len(centres) // MAX_TICKS + (len(centres) % MAX_TICKS > 0))
    for ax, name in zip(axes, variants):
        tokens = stats["variants"][name]["tokens_mean"][pair].nanmean(dim=0).numpy()
        ax.plot(x, tokens, color="0.8", linewidth=0.5, zorder=1)
        for region, color in REGION_COLORS.items():
            ax.scatter(x[masks[region]], tokens[masks[region]], s=marker, color=color, linewidths=0,
                       label=region.replace("_", " "), zorder=2)
        for start in layout.frame_starts()[1:]:
            ax.axvline(start - 0.5, color="black", linestyle="--", linewidth=0.6, alpha=0.6)
        ax.set_ylabel("MA magnitude")
        ax.set_title(name, loc="left", fontsize=10)
        ax.set_xticks(centres[::every], [str(f) for f in range(layout.frames)][::every])
        ax.set_xlim(-0.5, layout.num_tokens - 0.5)
    axes[0].legend(loc="upper right", markerscale=max(1.0, 30 / marker) ** 0.5, fontsize=8)
    axes[-1].set_xlabel(f"latent frame (tokens in frame-major order, {layout.tokens_per_frame} per frame; "
                        "dashed: frame starts)")
    fig.suptitle(f"{summary['model']}: largest |value| over the MA channels per token, block {layer}, step {step}\n"
                 f"mean over {_prompts(stats, summary)} and {_branches(summary)}", fontsize=11)
    return fig


def plot_ratios(stats: dict, summary: dict) -> Figure:
    layers, steps = summary["layers"], summary["steps"]
    variants = list(stats["variants"])
    means = {name: region_means(stats["variants"][name]["regions"]) for name in variants}  # (L, T, R)
    first, boundary, interior = (REGION_NAMES.index(r) for r in ("first_frame", "boundary", "interior"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {name: {"first_frame / boundary": (m[..., first] / m[..., boundary]).numpy(),
                         "boundary / interior": (m[..., boundary] / m[..., interior]).numpy()}
                  for name, m in means.items()}
    norm = ratio_norm(np.stack([panel for name in variants for panel in ratios[name].values()]))
    logarithmic = isinstance(norm, LogNorm)
    fig = Figure(figsize=(min(16.0, max(10.0, 3 + 0.36 * len(steps))),
                         1.8 + (1.2 + 0.16 * min(len(layers), 30)) * len(variants)),
                 layout="constrained")
    axes = _variant_axes(fig, variants, columns=2)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.85")
    image = None
    for column, key in enumerate(("first_frame / boundary", "boundary / interior")):  # the verdict's two ratios
        for row, name in enumerate(variants):
            ax = axes[row, column]
            data = np.ma.masked_invalid(ratios[name][key])
            if logarithmic:
                data = np.ma.masked_less_equal(data, 0)
            image = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            if data.size <= ANNOTATE_CELLS:
                for (i, j), value in np.ndenumerate(ratios[name][key]):
                    if np.isfinite(value):
                        shade = float(norm(value)) if not (logarithmic and value <= 0) else 0.0
                        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7,
                                color="black" if shade > 0.5 else "white")
            _index_ticks(ax.set_xticks, steps)
            _index_ticks(ax.set_yticks, layers)
            ax.set_xlabel("denoising step")
            ax.set_ylabel("block")
            ax.set_title(f"{name}: {key}", fontsize=10)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label=RATIO_LABEL)
    bar.ax.axhline(1.0, color="white", linewidth=1.2)
    scale = (f"log colour scale (ratios span {norm.vmin:.3g}-{norm.vmax:.3g})" if logarithmic
             else f"linear colour scale from 0 to {norm.vmax:.3g}")
    fig.suptitle(f"{summary['model']}: MA magnitude ratios, blocks {_spans(layers)} x {_steps(summary)}\n"
                 f"region mean over its tokens, then mean over {_prompts(stats, summary)} and {_branches(summary)}\n"
                 f"one {scale} for every panel; grey: undefined (no MA channel detected or a region mean of 0)", fontsize=10)
    return fig


def _index_ticks(set_ticks, indices: list[int]) -> None:
    every = max(1, -(-len(indices) // MAX_TICKS))
    positions = list(range(0, len(indices), every))
    set_ticks(positions, [str(indices[p]) for p in positions])


def plot_channels(stats: dict, summary: dict, layer: int) -> Figure:
    slot = summary["layers"].index(layer)
    variants = list(stats["variants"])
    detection = summary["detection"]
    rule = f"{detection['rule']}: max({detection['ratio']:g} x scale, {detection['floor']:g})"
    fig = Figure(figsize=(12, 1.0 + 2.6 * len(variants)), layout="constrained")
    axes = _variant_axes(fig, variants, sharex=True)[:, 0]
    for ax, name in zip(axes, variants):
        peaks = stats["variants"][name]["peaks_max"][slot].amax(dim=(0, 1)).numpy()
        entry = summary["results"][name]["layers"][str(layer)]
        colors = np.array(["0.6"] * peaks.size, dtype=object)
        for kind, color in CLASS_COLORS.items():
            colors[entry[kind]] = color
        ax.bar(np.arange(peaks.size), peaks, width=1.0, color=list(colors), linewidth=0)
        for kind, color in CLASS_COLORS.items():  # markers on top: a 1-channel bar is too thin to see
            marked = np.asarray(entry[kind], dtype=int)
            ax.scatter(marked, peaks[marked], s=22, color=color, edgecolors="black", linewidths=0.4, zorder=3,
                       label=f"{CLASS_LABELS[kind]} ({len(marked)})")
        median = float(np.median(peaks))
        threshold = float(stats["variants"][name]["thresholds"][:, slot].mean())
        ax.axhline(median, color="black", linestyle=":", linewidth=0.8, label=f"median peak {median:.3g}")
        ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8,
                   label=f"detection threshold {threshold:.3g} (mean; {rule})")
        for channel in entry["massive"]:
            ax.annotate(str(channel), (channel, peaks[channel]), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8, color=CLASS_COLORS["massive"])
        ax.set_yscale("log")
        positive = peaks[peaks > 0]
        if positive.size:
            ax.set_ylim(positive.min() / 2, max(positive.max(), threshold) * 3)
        ax.set_ylabel("peak |value| (log)")
        ax.set_title(name, loc="left", fontsize=10)
        ax.legend(loc="upper right", fontsize=8, ncols=2)
    axes[-1].set_xlabel("channel (grey: unclassified channels; coloured bars and markers: the classes of "
                        "ma_summary.json)")
    axes[-1].set_xlim(-0.5, len(peaks) - 0.5)
    fig.suptitle(f"{summary['model']}: channel peaks of block {layer}, {_steps(summary)}\n"
                 f"peak = largest |value| over the video tokens, then max over {_prompts(stats, summary)}, the "
                 f"captured steps and {_branches(summary)}", fontsize=11)
    return fig


def plot_profile(stats: dict, summary: dict) -> Figure:
    layout = _layout(summary)
    regions = summary["regions"]
    span = layout.boundary_span(regions["boundary_width"], regions["boundary_unit"])
    pairs = stats["meta"]["profile"]
    columns = min(2, len(pairs))
    rows = -(-len(pairs) // columns)
    fig = Figure(figsize=(6.5 * columns, 0.6 + 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    positions = np.arange(layout.tokens_per_frame)
    for p, (layer, step) in enumerate(pairs):
        ax = axes[p]
        ax.axvspan(-0.5, span - 0.5, color=REGION_COLORS["boundary"], alpha=0.15, linewidth=0)
        ax.axvspan(layout.tokens_per_frame - span - 0.5, layout.tokens_per_frame - 0.5,
                   color=REGION_COLORS["boundary"], alpha=0.15, linewidth=0, label="boundary positions")
        notes = []
        for name, result in summary["results"].items():
            entry = result["profiles"][p]
            ax.plot(positions, entry["profile"], marker="." if layout.tokens_per_frame <= 200 else None,
                    linewidth=1.0, label=name)
            notes.append(f"{name}: period {entry['period']}")
        ax.set_title(f"block {layer}, step {step}: " + ", ".join(notes)
                     + f" (tokens per frame {layout.tokens_per_frame})", fontsize=9)
        ax.set_xlabel(f"position inside a latent frame (row-major, {layout.width} per row)")
        ax.set_ylabel("MA magnitude")
        ax.set_xlim(-0.5, layout.tokens_per_frame - 0.5)
        ax.legend(fontsize=8, loc="upper center")
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    frames = f"latent frames 1..{layout.frames - 1}" if layout.frames > 1 else "latent frame 0"
    fig.suptitle(f"{summary['model']}: within-frame MA profile at the block/step pairs of the panels\n"
                 f"mean over {frames}, {_prompts(stats, summary)} and {_branches(summary)}", fontsize=11)
    return fig


def write_plots(stats: dict, summary: dict, run_dir: Path, which: list[str]) -> list[Path]:
    """The selected figures as PNGs in `run_dir` (see the module docstring); returns their paths."""
    run_dir = Path(run_dir)
    written = []
    pairs = stats["meta"]["profile"]
    if "tokens" in which:
        for p, (layer, step) in enumerate(pairs):
            written.append(save_figure(plot_tokens(stats, summary, p), run_dir / f"ma_tokens_L{layer}_s{step}.png"))
    if "ratios" in which:
        written.append(save_figure(plot_ratios(stats, summary), run_dir / "ma_ratios.png"))
    if "channels" in which:
        for layer in sorted({layer for layer, _ in pairs}):
            written.append(save_figure(plot_channels(stats, summary, layer), run_dir / f"ma_channels_L{layer}.png"))
    if "profile" in which:
        written.append(save_figure(plot_profile(stats, summary), run_dir / "ma_profile.png"))
    return written
