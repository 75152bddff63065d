"""Host-side statistics of captured massive activations: accumulation over prompts, summary, calibration (the
region statistics, hierarchy verdict and period test are stas.ma.hierarchy).

Everything here works on the CPU tensors of `ma_stats.pt` (the dict `stats_file` builds), so a summary or a
calibration can be recomputed from a saved run without sampling again. Vocabulary:
  observation  one (prompt, step, CFG branch) hidden state of a block
  massive      detected massive (peak > the observation's threshold, stas.core.massive), among the top max_dims
  margin       a channel's peak / the threshold: how far above (> 1) or below the detection line it sits
  frequency    fraction of a block's observations in which a channel is massive
"""

from __future__ import annotations

import itertools
import math

import torch

from stas.ma.capture import CaptureReadout
from stas.core.layout import TokenLayout
from stas.core.massive import top_massive_channels
from stas.ma.hierarchy import (VerdictSettings, captured, hierarchy_verdict, region_entry, region_table,
                               sequence_period, with_ma, within_frame_profile)


class MAStats:
    """One variant's (vanilla or steered) capture readouts, accumulated over prompts.

    Kept per prompt: the ranked channels and thresholds of every observation and the region statistics (small).
    Kept as running aggregates: channel peaks (max and mean over prompts) and per-token magnitudes (mean).
    """

    def __init__(self, max_dims: int):
        self.max_dims = max_dims
        self.count = 0
        self.peaks_max = self.peaks_sum = self.tokens_sum = None
        self.top_channels, self.top_massive, self.thresholds, self.regions = [], [], [], []

    def add(self, readout: CaptureReadout) -> None:
        peaks = readout.peaks
        channels, is_massive = top_massive_channels(peaks, readout.thresholds, self.max_dims)
        self.top_channels.append(channels.to(torch.int32))
        self.top_massive.append(is_massive)
        self.thresholds.append(readout.thresholds)
        self.regions.append(readout.regions)
        if self.count == 0:
            self.peaks_max, self.peaks_sum, self.tokens_sum = peaks.clone(), peaks.clone(), readout.tokens.clone()
        else:
            torch.maximum(self.peaks_max, peaks, out=self.peaks_max)
            self.peaks_sum += peaks
            self.tokens_sum += readout.tokens
        self.count += 1

    def tensors(self) -> dict:
        peaks_mean = self.peaks_sum / self.count
        thresholds = torch.stack(self.thresholds)
        return {
            "peaks_max": self.peaks_max,  # (L, T, B, D) channel peak, max over prompts
            "peaks_mean": peaks_mean,  # (L, T, B, D) channel peak, mean over prompts
            "margin": peaks_mean / thresholds.mean(dim=0)[..., None],  # (L, T, B, D) over prompts: peak / threshold
            "thresholds": thresholds,  # (N, L, T, B) detection threshold per observation
            "top_channels": torch.stack(self.top_channels),  # (N, L, T, B, max_dims) ranked channels
            "top_massive": torch.stack(self.top_massive),  # (N, L, T, B, max_dims) which of them are massive
            "regions": torch.stack(self.regions),  # (N, L, T, B, 3 regions, mean|max) MA magnitude
            "tokens_mean": self.tokens_sum / self.count,  # (P, B, S) per-token MA magnitude, mean over prompts
        }


# ----------------------------------------------------------------------------------------------------- channels


def massive_frequency(top_channels: torch.Tensor, top_massive: torch.Tensor, hidden_dim: int) -> torch.Tensor:
    """(D,) fraction of the observations (all leading dims) in which each channel is massive."""
    observations = top_channels[..., 0].numel()
    counts = torch.bincount(top_channels[top_massive].long(), minlength=hidden_dim)
    return counts.double() / observations


def classify_channels(layer_peaks: torch.Tensor, frequency: torch.Tensor, min_frequency: float,
                      weak: int, non_ma: int) -> dict[str, list[int]]:
    """A block's massive, weak and non-MA channels (each list sorted by channel index).

    massive: massive in >= min_frequency of the observations; weak: the next `weak` channels by mean peak that
    do not qualify; non_ma: the `non_ma` other channels whose mean peak is nearest the median channel peak.
    """
    massive = sorted(torch.nonzero(frequency >= min_frequency).flatten().tolist())
    ranked = torch.argsort(layer_peaks, descending=True, stable=True).tolist()
    weak_channels = [c for c in ranked if c not in massive][:weak]
    taken = set(massive) | set(weak_channels)
    distance = (layer_peaks - layer_peaks.median()).abs()
    ordinary = [c for c in torch.argsort(distance, stable=True).tolist() if c not in taken][:non_ma]
    return {"massive": massive, "weak": sorted(weak_channels), "non_ma": sorted(ordinary)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_pairwise_jaccard(sets: list[set]) -> float | None:
    pairs = list(itertools.combinations(sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else None


def massive_sets_by(top_channels, top_massive, dim: int, min_frequency: float, hidden_dim: int) -> list[set]:
    """For each index along `dim`, the channels massive in >= min_frequency of that group's observations."""
    return [set(torch.nonzero(massive_frequency(c, m, hidden_dim) >= min_frequency).flatten().tolist())
            for c, m in zip(top_channels.unbind(dim), top_massive.unbind(dim))]


# ------------------------------------------------------------------------------------------------------ summary


def summarise_variant(tensors: dict, meta: dict, min_frequency: float, weak: int, non_ma: int,
                      settings: VerdictSettings = VerdictSettings()) -> dict:
    layout = TokenLayout(**meta["layout"])
    layers, steps = meta["layers"], meta["steps"]
    entries, layer_sets, prompt_stability, step_stability = layer_entries(tensors, layers, min_frequency, weak,
                                                                          non_ma)
    regions = region_entries(tensors["regions"], layers, steps)
    profiles = []
    for p, (layer, step) in enumerate(meta["profile"]):
        tokens = tensors["tokens_mean"][p].nanmean(dim=0)  # over branches
        profiles.append({"layer": layer, "step": step, **sequence_period(tokens, layout, settings),
                         "profile": within_frame_profile(tokens, layout).tolist()})

    result = {
        "layers": entries,
        "regions": regions,
        "hierarchy": hierarchy_verdict(tensors["regions"], meta["prompts"], steps, settings),
        "profiles": profiles,
        "stability": {
            "prompts": _mean(prompt_stability),
            "steps": _mean(step_stability),
            "layers": mean_pairwise_jaccard(layer_sets),
            "channels_in_every_layer": sorted(set.intersection(*layer_sets)) if layer_sets else [],
        },
    }
    experts = step_experts(meta)
    if len(experts) > 1:  # each expert transformer's own channels, from the captured steps it ran
        result["experts"] = {name: {"steps": expert_steps, "layers": layer_entries(
            at_steps(tensors, [steps.index(step) for step in expert_steps]), layers, min_frequency, weak, non_ma)[0]}
            for name, expert_steps in experts.items()}
    return result


def step_experts(meta: dict) -> dict[str, list[int]]:
    """{expert transformer: the captured steps it ran} (meta "experts": the expert of each captured step; a run
    without it had one transformer)."""
    names = meta.get("experts") or ["transformer"] * len(meta["steps"])
    return {name: [step for step, owner in zip(meta["steps"], names) if owner == name] for name in dict.fromkeys(names)}


def at_steps(tensors: dict, slots: list[int]) -> dict:
    """The channel tensors of a variant (MAStats.tensors) at some captured step slots only."""
    index = torch.tensor(slots, dtype=torch.long)
    return {**{key: tensors[key][:, index] for key in ("peaks_mean", "peaks_max", "margin")},
            **{key: tensors[key][:, :, index] for key in ("thresholds", "top_channels", "top_massive")}}


def layer_entries(tensors: dict, layers: list[int], min_frequency: float, weak: int, non_ma: int) -> tuple:
    """Each block's classified channels (the summary's `layers`), with the channel sets the stability reads."""
    hidden_dim = tensors["peaks_mean"].shape[-1]
    top, massive = tensors["top_channels"], tensors["top_massive"]
    entries, layer_sets, prompt_stability, step_stability = {}, [], [], []
    for i, layer in enumerate(layers):
        frequency = massive_frequency(top[:, i], massive[:, i], hidden_dim)
        layer_peaks = tensors["peaks_mean"][i].mean(dim=(0, 1))
        classes = classify_channels(layer_peaks, frequency, min_frequency, weak, non_ma)
        peak_max = tensors["peaks_max"][i].amax(dim=(0, 1))
        margins = tensors["margin"][i].flatten(0, 1)  # (steps x branches, D)
        listed = classes["massive"] + [c for c in classes["weak"] if c not in classes["massive"]]
        entries[str(layer)] = {
            **classes,
            "median_peak": layer_peaks.median().item(),
            "threshold": tensors["thresholds"][:, i].mean().item(),
            "channels": [{"channel": c, "peak": peak_max[c].item(), "mean_peak": layer_peaks[c].item(),
                          "margin": margins[:, c].median().item(), "margin_min": margins[:, c].min().item(),
                          "frequency": frequency[c].item()}
                         for c in sorted(listed, key=lambda c: -layer_peaks[c].item())],
        }
        layer_sets.append(set(classes["massive"]))
        if top.shape[0] > 1:
            prompt_stability.append(mean_pairwise_jaccard(
                massive_sets_by(top[:, i], massive[:, i], 0, min_frequency, hidden_dim)))
        if top.shape[2] > 1:
            step_stability.append(mean_pairwise_jaccard(
                massive_sets_by(top[:, i], massive[:, i], 1, min_frequency, hidden_dim)))
    return entries, layer_sets, prompt_stability, step_stability


def region_entries(regions: torch.Tensor, layers: list[int], steps: list[int]) -> dict:
    """regions.<block>.<step> of the summary (stas.ma.hierarchy.region_entry) from (N, L, T, B, R, 2)."""
    table = region_table(regions)  # (L, T, R, 2)
    observations, has = captured(regions).sum(dim=(0, 3)), with_ma(regions).sum(dim=(0, 3))  # (L, T)
    return {str(layer): {str(step): region_entry(table[i, j], int(observations[i, j]), int(has[i, j]))
                         for j, step in enumerate(steps)} for i, layer in enumerate(layers)}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None


SUMMARY_KEYS = ("model", "family", "steer", "variants", "prompts", "layers", "steps", "num_steps", "branches",
                "layout", "regions", "detection", "hierarchy", "results", "experts")
OPTIONAL_SUMMARY_KEYS = ("experts",)  # summaries written before experts (2026-11-26) lack them
VARIANT_KEYS = ("layers", "regions", "hierarchy", "profiles", "stability")


def summarise(stats: dict, min_frequency: float, weak: int, non_ma: int,
              settings: VerdictSettings | None = None) -> dict:
    """ma_summary.json from the dict saved in ma_stats.pt (keys: SUMMARY_KEYS; per variant: VARIANT_KEYS).

    settings: how the hierarchy and period verdicts decide; None: those the run used (meta "verdict"), or the
    defaults for a file without them. The top-level `hierarchy` is the vanilla variant's verdict (the paper's
    claim is about the unsteered model) without its per-step breakdown; every variant's is in its results."""
    stats = upgrade_stats(stats)
    meta = stats["meta"]
    if settings is None:
        settings = VerdictSettings(**meta.get("verdict", {}))
    results = {name: summarise_variant(tensors, meta, min_frequency, weak, non_ma, settings)
               for name, tensors in stats["variants"].items()}
    headline = next(iter(results))  # vanilla: always sampled first
    summary = {
        "model": meta["model"], "family": meta["family"], "steer": meta["steer"],
        "variants": list(stats["variants"]), "prompts": meta["prompts"], "layers": meta["layers"],
        "steps": meta["steps"], "num_steps": meta["num_steps"], "branches": meta["branches"],
        "layout": {**meta["layout"], "tokens_per_frame": TokenLayout(**meta["layout"]).tokens_per_frame},
        "regions": {"boundary_width": meta["boundary_width"], "boundary_unit": meta["boundary_unit"]},
        "detection": {**meta["detection"], "min_frequency": min_frequency},
        "hierarchy": {"variant": headline, **{key: value for key, value in results[headline]["hierarchy"].items()
                                              if key != "by_step"}},
        "results": results,
        "experts": step_experts(meta),  # {expert transformer: the captured steps it ran}
    }
    return json_safe(summary)


def upgrade_stats(stats: dict) -> dict:
    """An ma_stats.pt from before the `detect` group (2026-11-26) in today's keys: it detected with the channel-peak
    rule, ratio x the median channel peak (`medians`), so its thresholds are ratio x medians."""
    meta = stats["meta"]
    if "detection" in meta or "ratio" not in meta:
        return stats
    ratio = float(meta["ratio"])
    variants = {}
    for name, tensors in stats["variants"].items():
        thresholds = ratio * tensors["medians"]
        variants[name] = {**{k: v for k, v in tensors.items() if k not in ("medians", "peak_ratio")},
                          "thresholds": thresholds,
                          "margin": tensors["peaks_mean"] / thresholds.mean(dim=0)[..., None]}
    detection = {"rule": "channel_peak", "ratio": ratio, "floor": 0.0, "max_dims": meta["max_dims"]}
    return {**stats, "meta": {**meta, "detection": detection}, "variants": variants}


def calibration(summary: dict) -> dict:
    """ma_dims.yaml (what `steer.dims=calibrated` reads) from the vanilla variant of a summary; with several expert
    transformers also each expert's own channels (`experts`), which steering then uses per expert."""
    vanilla = summary["results"]["vanilla"]

    def classes(layers: dict) -> dict:
        return {int(layer): {kind: entry[kind] for kind in ("massive", "weak", "non_ma")}
                for layer, entry in layers.items()}

    experts = {name: {"steps": entry["steps"], "layers": classes(entry["layers"])}
               for name, entry in vanilla.get("experts", {}).items()}
    return {
        "model": summary["model"],
        "layers": classes(vanilla["layers"]),
        **({"experts": experts} if experts else {}),
        "source": "stas.analyze",
        "detection": summary["detection"],
        "prompts": len(summary["prompts"]),
        "steps": summary["steps"],
    }


def json_safe(value):
    """NaN and infinities become None (JSON has no such numbers); floats keep 6 significant digits."""
    if isinstance(value, dict):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value
