"""Figures of a massive-activation analysis (matplotlib, Agg, PNG), from ma_stats.pt and ma_summary.json data.

  tokens    ma_tokens_L{block}_s{step}.png  MA magnitude of every token along the sequence, latent frames marked,
            first-frame / boundary / interior tokens coloured (the paper's figure); one per profile pair
  ratios    ma_ratios.png                   block x step heatmaps of first/boundary and boundary/interior
  channels  ma_channels_L{block}.png        peak |value| of every channel, massive / weak / non-MA coloured
  profile   ma_profile.png                  MA magnitude by position inside a latent frame, with its period
With steering on, every figure shows the steered variant next to (below) the vanilla one.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from stas.ma.capture import REGION_NAMES
from stas.core.layout import TokenLayout
from stas.ma.hierarchy import MEAN, region_table
from stas.rundir import atomic_write_bytes

REGION_COLORS = {"first_frame": "tab:red", "boundary": "tab:orange", "interior": "tab:blue"}
CLASS_COLORS = {"massive": "tab:red", "weak": "tab:orange", "non_ma": "tab:green"}
MAX_TICKS = 16


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
    fig.suptitle(f"{summary['model']}: largest |value| over the MA channels per token, block {layer}, step {step}")
    return fig


def plot_ratios(stats: dict, summary: dict) -> Figure:
    layers, steps = summary["layers"], summary["steps"]
    variants = list(stats["variants"])
    tables = {name: region_table(stats["variants"][name]["regions"])[..., MEAN] for name in variants}  # (L, T, R)
    ratios = {name: {"first_frame / boundary": t[..., 0] / t[..., 1], "boundary / interior": t[..., 1] / t[..., 2]}
              for name, t in tables.items()}  # the two ratios of the hierarchy verdict
    fig = Figure(figsize=(min(16.0, max(9.0, 3 + 0.36 * len(steps))),
                         1.2 + (1.2 + 0.16 * min(len(layers), 30)) * len(variants)),
                 layout="constrained")
    axes = _variant_axes(fig, variants, columns=2)
    for column, key in enumerate(("first_frame / boundary", "boundary / interior")):
        values = torch.stack([ratios[name][key] for name in variants])
        finite = values[torch.isfinite(values)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        if vmax - vmin < 0.01:  # a constant map: a readable colour bar around the value
            vmin, vmax = vmin - 0.5, vmax + 0.5
        for row, name in enumerate(variants):
            ax = axes[row, column]
            data = ratios[name][key].numpy()
            image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                              interpolation="nearest")
            fig.colorbar(image, ax=ax, shrink=0.9)
            if data.size <= 80:
                middle = (vmin + vmax) / 2
                for (i, j), value in np.ndenumerate(data):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                            color="black" if value > middle else "white")
            _index_ticks(ax.set_xticks, steps)
            _index_ticks(ax.set_yticks, layers)
            ax.set_xlabel("denoising step")
            ax.set_ylabel("block")
            ax.set_title(f"{name}: {key}", fontsize=10)
    fig.suptitle(f"{summary['model']}: MA magnitude ratios (region means over tokens, then over the prompts and "
                 "CFG branches with MAs; blank: no MA channel detected)")
    return fig


def _index_ticks(set_ticks, indices: list[int]) -> None:
    every = max(1, -(-len(indices) // MAX_TICKS))
    positions = list(range(0, len(indices), every))
    set_ticks(positions, [str(indices[p]) for p in positions])


def plot_channels(stats: dict, summary: dict, layer: int) -> Figure:
    slot = summary["layers"].index(layer)
    variants = list(stats["variants"])
    ratio = summary["detection"]["ratio"]
    fig = Figure(figsize=(12, 0.8 + 2.6 * len(variants)), layout="constrained")
    axes = _variant_axes(fig, variants, sharex=True)[:, 0]
    for ax, name in zip(axes, variants):
        peaks = stats["variants"][name]["peaks_max"][slot].amax(dim=(0, 1)).numpy()
        entry = summary["results"][name]["layers"][str(layer)]
        colors = np.array(["0.6"] * peaks.size, dtype=object)
        for kind, color in CLASS_COLORS.items():
            colors[entry[kind]] = color
        ax.bar(np.arange(peaks.size), peaks, width=1.0, color=list(colors), linewidth=0)
        median = float(np.median(peaks))
        ax.axhline(median, color="black", linestyle=":", linewidth=0.8, label=f"median peak {median:.3g}")
        ax.axhline(ratio * median, color="black", linestyle="--", linewidth=0.8, label=f"{ratio:g} x median")
        for channel in entry["massive"]:
            ax.annotate(str(channel), (channel, peaks[channel]), textcoords="offset points", xytext=(0, 2),
                        ha="center", fontsize=8, color=CLASS_COLORS["massive"])
        for kind, color in CLASS_COLORS.items():
            ax.bar([0], [0], color=color, label=f"{kind} ({len(entry[kind])})")
        ax.set_ylabel("peak |value|")
        ax.set_title(name, loc="left", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("channel")
    axes[-1].set_xlim(-0.5, len(peaks) - 0.5)
    fig.suptitle(f"{summary['model']}: channel peaks of block {layer} (max over prompts, captured steps, branches)")
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
            p_value = "" if entry["null_p"] is None else f" (null p={entry['null_p']:.2g})"
            notes.append(f"{name}: period {entry['period']}{p_value}")
        ax.set_title(f"block {layer}, step {step}: " + ", ".join(notes)
                     + f" (tokens per frame {layout.tokens_per_frame})", fontsize=9)
        ax.set_xlabel(f"position inside a latent frame (row-major, {layout.width} per row)")
        ax.set_ylabel("MA magnitude")
        ax.set_xlim(-0.5, layout.tokens_per_frame - 0.5)
        ax.legend(fontsize=8, loc="upper center")
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    fig.suptitle(f"{summary['model']}: within-frame MA profile (mean over latent frames 1..{layout.frames - 1})")
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
