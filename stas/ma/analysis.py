"""A massive-activation analysis run: sample every prompt with capture hooks, then write stats, summary,
calibration and plots into the run directory (and log them). The CLI is stas.analyze; see docs/analysis.md.

With steering enabled (steer=stas, ...) every prompt is sampled twice with the same seed, vanilla and steered,
and every output holds both variants.
"""

from __future__ import annotations

import io
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from stas.backbones import Backbone, load_pipeline
from stas.backbones.parallel import is_leader
from stas.core.massive import Detection
from stas.ma.capture import REGION_NAMES, STATS, MACapture
from stas.core.selection import analysis_selection
from stas.generation import make_loop, make_steerer, run_items, run_pipeline
from stas.core.layout import TokenLayout
from stas.ma.plots import write_plots
from stas.ma.hierarchy import PAIR_LABELS
from stas.ma.stats import MAStats, calibration, summarise
from stas.rundir import atomic_write_bytes, atomic_write_json, atomic_write_text

STATS_FILE = "ma_stats.pt"
SUMMARY_FILE = "ma_summary.json"  # written last: its presence marks a complete analysis run
DIMS_FILE = "ma_dims.yaml"


@dataclass
class AnalysisResult:
    run_dir: Path
    summary: dict
    plots: list[Path]
    capture_bytes: int

    def __str__(self) -> str:
        lines = []
        for name, result in self.summary["results"].items():
            periods = ", ".join(f"block {p['layer']} step {p['step']}: {p['period']} (p={_number(p['null_p'])})"
                                for p in result["profiles"])
            channels = result["stability"]["channels_in_every_layer"]
            lines.append(f"  {name}: MA channels in every block {channels}; {hierarchy_line(result['hierarchy'])}; "
                         f"period {periods} (tokens per frame {self.summary['layout']['tokens_per_frame']})")
            lines.append(f"    {margins_line(result['layers'], self.summary['detection'])}")
        experts = self.summary.get("experts", {})
        if len(experts) > 1:  # Wan2.2-A14B: which expert ran each captured step
            lines.append("  experts: " + "; ".join(f"{name} steps {_steps(steps)}" for name, steps in experts.items()))
        return "\n".join([*lines, f"  outputs: {self.run_dir} ({SUMMARY_FILE}, {DIMS_FILE}, {STATS_FILE}, "
                                  f"{len(self.plots)} plot(s)); capture buffers {self.capture_bytes} bytes"])


def _steps(steps: list[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if steps and steps == list(range(steps[0], steps[-1] + 1)) else str(steps)


def _number(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def margins_line(layers: dict, detection: dict, shown: int = 4) -> str:
    """Each block's MA channels with their smallest margin over the detection threshold (peak / threshold over the
    captured steps and branches): near 1 a selection is fragile. The first and last `shown` blocks when many."""
    def block(layer: str) -> str:
        entry = layers[layer]
        listed = [c for c in entry["channels"] if c["channel"] in entry["massive"]]
        return f"{layer}: " + (", ".join(f"{c['channel']} x{_number(c['margin_min'], '.2f')}" for c in listed) or "none")

    names = list(layers)
    picked = names if len(names) <= 2 * shown else [*names[:shown], "...", *names[-shown:]]
    rule = f"{detection['rule']}, {detection['ratio']:g} x scale, floor {detection['floor']:g}"
    return (f"margins over the threshold ({rule}; min over steps): "
            + "; ".join(name if name == "..." else block(name) for name in picked))


def hierarchy_line(hierarchy: dict) -> str:
    """e.g. 'hierarchy: holds (first/boundary 2.00 [1.98, 2.01], boundary/interior 4.91 [4.80, 5.02], ...; 3 prompt(s),
    32 (block, step) entries, 2 without MAs)', and the reason unless it holds."""
    ratios = ", ".join(f"{PAIR_LABELS[name]} {_number(pair['ratio'], '.2f')} [{_number(pair['ci'][0], '.2f')}, "
                       f"{_number(pair['ci'][1], '.2f')}]" for name, pair in hierarchy["ratios"].items())
    counts = hierarchy["counts"]
    line = (f"hierarchy: {hierarchy['verdict']} ({ratios}; {counts['prompts']} prompt(s), {counts['entries']} "
            f"(block, step) entries, {counts['entries_without_ma']} without MAs)")
    return line if hierarchy["verdict"] == "holds" else f"{line}: {hierarchy['reason']}"


def analyze(cfg, run_dir: Path, backbone: Backbone, logger, pipe=None) -> AnalysisResult:
    """Capture, reduce and report every prompt of `cfg` (vanilla, and steered when cfg.steer is enabled)."""
    run_dir = Path(run_dir)
    selection = analysis_selection(cfg.analysis, backbone.num_layers, cfg.model.steps)
    items = run_items(cfg)
    steerer, loop = make_steerer(cfg, backbone), make_loop(cfg, backbone)
    if pipe is None:
        pipe = load_pipeline(cfg.model, backbone)
        pipe.set_progress_bar_config(disable=not cfg.progress, leave=False, desc="denoising steps")
    layout = TokenLayout.for_video(backbone, cfg.model.height, cfg.model.width, cfg.model.num_frames)
    kwargs = {**backbone.pipeline_kwargs(cfg.model), "output_type": "latent"}  # activations only: skip the VAE
    detection = Detection.of(cfg.detect)
    capture = MACapture(backbone, selection, detection, cfg.steer.boundary_width, cfg.steer.boundary_unit)
    variants = {"vanilla": None} if steerer is None else {"vanilla": None, "steered": steerer}
    experts = {}  # the expert transformer of each captured step (Wan2.2-A14B: transformer, then transformer_2)
    capture.tracker.listeners.append(lambda: experts.setdefault(capture.tracker.step, capture.tracker.expert))
    accumulated = {}
    for name, variant_steerer in variants.items():
        accumulated[name] = MAStats(detection.max_dims)
        with ExitStack() as stack:
            if variant_steerer is not None:
                stack.enter_context(variant_steerer.attach(backbone.experts(pipe)))
            stack.enter_context(capture.attach(backbone.experts(pipe)))  # after steering: sees the steered outputs
            for item in tqdm(items, desc=f"prompts ({name})", disable=not cfg.progress):
                capture.begin(layout, cfg.model.steps, backbone.uses_cfg(kwargs))
                run_pipeline(pipe, item, kwargs, variant_steerer, layout, loop)
                accumulated[name].add(capture.read())
    stats = {
        "meta": {
            "model": cfg.model.name, "family": backbone.family,
            "steer": cfg.steer.name if cfg.steer.enabled else "none",
            "prompts": [item.prompt for item in items], "seeds": [item.seed for item in items],
            **({"images": [item.image_fields() for item in items]} if any(item.image for item in items) else {}),
            "layers": list(selection.layers), "steps": list(selection.steps), "num_steps": cfg.model.steps,
            "experts": [experts.get(step, "transformer") for step in selection.steps],
            "profile": [list(pair) for pair in selection.profile], "branches": list(capture.branches),
            "layout": {"frames": layout.frames, "height": layout.height, "width": layout.width},
            "boundary_width": cfg.steer.boundary_width, "boundary_unit": cfg.steer.boundary_unit,
            "detection": {"rule": detection.rule, "ratio": detection.ratio, "floor": detection.floor,
                          "max_dims": detection.max_dims},
            "verdict": {"min_effect": cfg.analysis.min_effect, "resamples": cfg.analysis.resamples,
                        "confidence": cfg.analysis.confidence, "min_prompts": cfg.analysis.min_prompts},
            "regions": list(REGION_NAMES), "region_stats": list(STATS),
        },
        "variants": {name: acc.tensors() for name, acc in accumulated.items()},
    }
    summary = summarise(stats, cfg.analysis.min_frequency, cfg.analysis.weak, cfg.analysis.non_ma)
    if not is_leader():  # model.parallel under torchrun: every rank holds the same statistics, rank 0 writes them
        return AnalysisResult(run_dir, summary, [], capture.buffer_bytes())
    plots = write_outputs(run_dir, stats, summary, list(cfg.analysis.plots))
    log_analysis(logger, summary, plots)
    return AnalysisResult(run_dir, summary, plots, capture.buffer_bytes())


def write_outputs(run_dir: Path, stats: dict, summary: dict, plots: list[str]) -> list[Path]:
    """ma_stats.pt, ma_dims.yaml, the plots, then ma_summary.json; every file is replaced atomically."""
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    atomic_write_bytes(run_dir / STATS_FILE, buffer.getvalue())
    atomic_write_text(run_dir / DIMS_FILE, yaml.safe_dump(calibration(summary), sort_keys=False))
    written = write_plots(stats, summary, run_dir, plots)
    atomic_write_json(run_dir / SUMMARY_FILE, summary)
    return written


def log_analysis(logger, summary: dict, plots: list[Path]) -> None:
    for path in plots:
        logger.log_image(f"analysis/{path.stem}", path)
    rows, totals = [], {}
    for name, result in summary["results"].items():
        for layer, entry in result["layers"].items():
            for channel in entry["channels"]:
                kind = "massive" if channel["channel"] in entry["massive"] else "weak"
                rows.append({"variant": name, "layer": int(layer), "kind": kind, **channel})
        hierarchy = result["hierarchy"]
        totals[f"{name}/hierarchy"] = hierarchy["verdict"]
        for pair, values in hierarchy["ratios"].items():
            totals[f"{name}/{pair}"] = values["ratio"]
            totals[f"{name}/{pair}_ci"] = values["ci"]
            totals[f"{name}/{pair}_verdict"] = values["verdict"]
        totals[f"{name}/entries_without_ma"] = hierarchy["counts"]["entries_without_ma"]
        totals[f"{name}/channels_in_every_layer"] = result["stability"]["channels_in_every_layer"]
        for profile in result["profiles"]:
            pair = f"L{profile['layer']}_s{profile['step']}"
            totals[f"{name}/period_{pair}"] = profile["period"]
            totals[f"{name}/period_null_p_{pair}"] = profile["null_p"]
            totals[f"{name}/period_evidence_{pair}"] = profile["period_evidence"]
    logger.log_table("ma_channels", rows)
    logger.summary(totals)
