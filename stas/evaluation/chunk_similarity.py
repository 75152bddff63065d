"""Frame-pair similarity along the video, two runs against each other (vanilla vs steered), latent chunks marked.

The figure the chunk-boundary claim needs: for every consecutive video frame pair (t, t+1), the cosine similarity of
the frames' features (pixel, DINO or CLIP: stas.evaluation.features), averaged over the videos the two runs share
(same prompt and seed), with the latent-chunk boundaries of the backbone's VAE marked. If steering smooths the
transitions between latent chunks, the steered curve rises at the boundary pairs more than inside the chunks.

Run directories are untrusted input: they are read through the checked readers (identity, item manifest, video
paths inside videos/), and anything unexpected is a UserError naming the file. The temporal compression comes from
the backbone of the run's model (stas.backbones.get_backbone), not from a family name.

Outputs (`write_chunk_similarity`): chunk_similarity.png (top: the two runs' mean per pair with a band; bottom: the
paired difference b - a) and chunk_similarity.csv (one row per run, video and frame pair).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from stas.backbones import BackboneError, get_backbone, resolve_device
from stas.errors import UserError
from stas.evaluation.features import FrameFeatures, make_features
from stas.evaluation.runner import manifest_video, read_video
from stas.evaluation.schema import EvalConfig
from stas.evaluation.similarity import chunk_of, cross_chunk, frame_pair_similarity
from stas.rundir import IDENTITY_FILE, atomic_write_bytes, atomic_write_text, check_writable, load_identity, read_manifest

FEATURES = ("pixel", "dino", "clip")
BANDS = {"bootstrap": "95% bootstrap interval of the mean over videos", "minmax": "min-max over videos"}
PNG_FILE, CSV_FILE = "chunk_similarity.png", "chunk_similarity.csv"
CSV_COLUMNS = ("run", "label", "prompt", "seed", "video", "frame", "next_frame", "chunk", "next_chunk",
               "cross_chunk", "features", "similarity")


@dataclass
class RunVideos:
    """One run directory's generated videos, keyed by (prompt, seed), and what the figure says about the run."""

    path: Path
    label: str
    model: str
    temporal_compression: int
    videos: dict[tuple[str, int], Path]


def read_run(run_dir: Path) -> RunVideos:
    """The run's identity, its backbone's temporal compression and its videos on disk (UserError when `run_dir` is
    not a stas.run directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory (give the run directories of two stas.run runs)")
    identity = load_identity(run_dir)
    model, steer = identity.get("model"), identity.get("steer")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(steer, dict)
            and isinstance(steer.get("enabled"), bool)):
        raise UserError(f"{run_dir / IDENTITY_FILE} lacks model.name or steer.enabled: is it a stas.run identity?")
    try:
        compression = get_backbone(model["name"]).temporal_compression
    except BackboneError as err:
        raise UserError(f"{run_dir / IDENTITY_FILE}: model.name={model['name']!r}: {err}") from None
    label = f"steered ({steer.get('name')})" if steer["enabled"] else "vanilla"
    videos = {}
    for row in read_manifest(run_dir):
        path = manifest_video(run_dir, row)
        if path.is_file():
            videos.setdefault((row["prompt"], row["seed"]), path)
    if not videos:
        raise UserError(f"{run_dir} holds none of its videos yet: generate them first (python -m stas.run)")
    return RunVideos(run_dir, label, model["name"], compression, videos)


def feature_extractor(name: str, device: str = "auto", batch_size: int = 32, pixel_size: int = 32,
                      checkpoint: str | None = None, random_weights: bool = False) -> FrameFeatures:
    """The frame features the evaluator `name` uses, with the options of its `eval` node (WeightsMissing when DINO
    or CLIP weights are not here; `random_weights` for tests)."""
    if name not in FEATURES:
        raise UserError(f"features {name!r} is not one of {', '.join(FEATURES)}")
    options = OmegaConf.structured(EvalConfig)
    options.device, options.batch_size, options.pixel.size = device, batch_size, pixel_size
    if name != "pixel":
        options[name].checkpoint, options[name].random_weights = checkpoint, random_weights
    return make_features(name, options, resolve_device(device, "--device"))


@dataclass
class ChunkSimilarity:
    """Per-pair similarities of the videos two runs share: a and b are (videos, frames - 1)."""

    runs: tuple[RunVideos, RunVideos]
    keys: list[tuple[str, int]]
    a: np.ndarray
    b: np.ndarray
    temporal_compression: int
    features: str
    note: str = ""

    @property
    def cross(self) -> list[bool]:
        return cross_chunk(self.a.shape[1] + 1, self.temporal_compression)


def chunk_similarity(run_a: Path, run_b: Path, features: FrameFeatures, name: str,
                     limit: int | None = None) -> ChunkSimilarity:
    """Per-pair similarity of every video the two runs share (same prompt and seed), in run a's order."""
    runs = (read_run(run_a), read_run(run_b))
    if runs[0].temporal_compression != runs[1].temporal_compression:
        raise UserError(f"the runs' backbones chunk time differently ({runs[0].model}: "
                        f"{runs[0].temporal_compression}, {runs[1].model}: {runs[1].temporal_compression}): "
                        "compare runs of one model")
    keys = [key for key in runs[0].videos if key in runs[1].videos][:limit]
    if not keys:
        raise UserError(f"{runs[0].path} and {runs[1].path} share no generated video of the same prompt and seed: "
                        "compare runs of the same prompts and seeds")
    series: list[list[np.ndarray]] = [[], []]
    for key in keys:
        for side, run in enumerate(runs):
            try:
                frames = read_video(run.videos[key])
            except ValueError as err:
                raise UserError(f"{run.videos[key]}: {err}") from None
            series[side].append(frame_pair_similarity(features(frames)).numpy())
    lengths = {len(s) for side in series for s in side}
    if len(lengths) != 1:
        raise UserError(f"the videos of {runs[0].path} and {runs[1].path} have different frame counts "
                        f"({', '.join(str(n + 1) for n in sorted(lengths))}): compare runs of one video length")
    return ChunkSimilarity(runs, keys, np.stack(series[0]), np.stack(series[1]), runs[0].temporal_compression, name,
                           features.note)


def band(values: np.ndarray, kind: str = "bootstrap", resamples: int = 2000,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, low, high) over the videos (axis 0) of `values` (videos, pairs): a percentile 95% bootstrap interval
    of the mean (videos resampled), or the min and max over the videos."""
    if kind not in BANDS:
        raise UserError(f"band {kind!r} is not one of {', '.join(BANDS)}")
    mean = values.mean(axis=0)
    if kind == "minmax":
        return mean, values.min(axis=0), values.max(axis=0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.shape[0], size=(resamples, values.shape[0]))
    means = values[picks].mean(axis=1)  # (resamples, pairs)
    return mean, np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def plot_chunk_similarity(result: ChunkSimilarity, band_kind: str = "bootstrap") -> Figure:
    frames = result.a.shape[1] + 1
    x = np.arange(frames - 1) + 0.5  # pair (t, t+1) sits between frames t and t+1
    cross = np.array(result.cross)
    fig = Figure(figsize=(max(9.0, min(18.0, 0.12 * frames + 6)), 7.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    curves = [(result.runs[0].label, result.a, "tab:blue"), (result.runs[1].label, result.b, "tab:red"),
              (f"{result.runs[1].label} - {result.runs[0].label}", result.b - result.a, "black")]
    for ax, (label, values, color) in zip([top, top, bottom], curves):
        mean, low, high = band(values, band_kind)
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        ax.plot(x, mean, color=color, linewidth=1.2, label=label)
        ax.scatter(x[cross], mean[cross], s=36, color=color, edgecolors="black", zorder=3)
        ax.scatter(x[~cross], mean[~cross], s=10, color=color, zorder=3)
    for ax in (top, bottom):
        for position in x[cross]:
            ax.axvline(position, color="0.4", linestyle="--", linewidth=0.8)
    bottom.axhline(0.0, color="0.5", linewidth=0.8)
    top.plot([], [], color="0.4", linestyle="--", linewidth=0.8, label="latent-chunk boundary (cross-chunk pair, "
                                                                          "large markers)")
    top.set_ylabel(f"cos similarity of frames t, t+1\n({result.features} features)")
    bottom.set_ylabel("paired difference")
    bottom.set_xlabel(f"video frame (pairs between frames; latent chunks of {result.temporal_compression} frames after "
                      "frame 0)")
    bottom.set_xlim(0, frames - 1)
    top.legend(fontsize=8, loc="best")
    bottom.legend(fontsize=8, loc="best")
    runs = result.runs
    note = f"; {result.note}" if result.note else ""
    fig.suptitle(f"{runs[0].model}: frame-pair similarity along the video, {runs[0].label} (run {runs[0].path.name}) vs "
                 f"{runs[1].label} (run {runs[1].path.name})\n"
                 f"mean over {len(result.keys)} video(s) paired by prompt and seed; band: {BANDS[band_kind]}{note}",
                 fontsize=10)
    return fig


def csv_text(result: ChunkSimilarity) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    c = result.temporal_compression
    for run, values in zip(result.runs, (result.a, result.b)):
        for (prompt, seed), row in zip(result.keys, values):
            for t, (similarity, crosses) in enumerate(zip(row, result.cross)):
                writer.writerow([str(run.path), run.label, prompt, seed, run.videos[(prompt, seed)].name, t, t + 1,
                                 chunk_of(t, c), chunk_of(t + 1, c), int(crosses), result.features,
                                 f"{similarity:.6f}"])
    return out.getvalue()


def write_chunk_similarity(result: ChunkSimilarity, out: Path, band_kind: str = "bootstrap") -> list[Path]:
    """chunk_similarity.png and chunk_similarity.csv in `out` (written atomically); returns their paths."""
    out = Path(out)
    check_writable(out)
    buffer = io.BytesIO()
    plot_chunk_similarity(result, band_kind).savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(out / PNG_FILE, buffer.getvalue())
    atomic_write_text(out / CSV_FILE, csv_text(result))
    return [out / PNG_FILE, out / CSV_FILE]


def summary_lines(result: ChunkSimilarity) -> list[str]:
    """Mean similarity inside chunks and across chunk boundaries, per run (what the figure shows, in numbers)."""
    cross = np.array(result.cross)
    lines = []
    for run, values in zip(result.runs, (result.a, result.b)):
        intra = f"{values[:, ~cross].mean():.4f}" if (~cross).any() else "n/a"
        lines.append(f"{run.label:<24} intra-chunk {intra}  cross-chunk {values[:, cross].mean():.4f}  "
                     f"({run.path})")
    return lines
