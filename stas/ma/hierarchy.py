"""Where massive activations sit among the token regions, as evidence that can say no: region statistics, the
hierarchy verdict (first frame > boundary > interior) and the period of the per-token pattern against a null.

Pure functions over the CPU tensors of ma_stats.pt; docs/analysis.md ("The hierarchy verdict", "The period and its
null") explains the choices. Vocabulary (as in stas.ma.stats):
  observation  one (sample, block, step, CFG branch) hidden state: `regions[n, l, t, b]`
  with MAs     an observation in which some channel qualified as massive, i.e. some token has a positive MA
               magnitude (a token's MA magnitude is 0 when no channel of its hidden state qualified)
  entry        one (block, step), over every sample and branch
  prompt       the samples of one prompt text (they differ only by seed) are one prompt: the bootstrap unit
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from stas.core.layout import TokenLayout
from stas.ma.capture import REGION_NAMES

MEAN, MAX = 0, 1  # the two region statistics; regions: first_frame, boundary, interior
# each reported ratio: (numerator, denominator) region; the first two (ADJACENT) make the hierarchy
PAIRS = {"first_over_boundary": (0, 1), "boundary_over_interior": (1, 2), "first_over_interior": (0, 2)}
ADJACENT = ("first_over_boundary", "boundary_over_interior")
PAIR_LABELS = {"first_over_boundary": "first/boundary", "boundary_over_interior": "boundary/interior",
               "first_over_interior": "first/interior"}
VERDICTS = ("holds", "does_not_hold", "inconclusive")


@dataclass(frozen=True)
class VerdictSettings:
    """How the verdicts decide (analysis.min_effect, resamples, confidence, min_prompts). The seed fixes the
    bootstrap and null draws, so the same ma_stats.pt always gives the same summary."""

    min_effect: float = 0.05  # a ratio must exceed 1 + min_effect to count as an effect
    resamples: int = 1000  # bootstrap resamples of the prompts; null draws of the period test
    confidence: float = 0.95  # of the bootstrap intervals; 1 - confidence is the period test's level
    min_prompts: int = 3  # fewer prompts (with MAs): inconclusive, whatever the interval says
    seed: int = 0

    @property
    def threshold(self) -> float:
        return 1.0 + self.min_effect


# ------------------------------------------------------------------------------------------------------ regions


def with_ma(regions: torch.Tensor) -> torch.Tensor:
    """(..., R, 2) region statistics -> (...) whether the observation has MAs (some region max > 0)."""
    return regions[..., MAX].nan_to_num(nan=0.0).amax(dim=-1) > 0


def captured(regions: torch.Tensor) -> torch.Tensor:
    """(..., R, 2) -> (...) whether the observation was captured (a slot never written stays NaN)."""
    return ~regions[..., MAX].isnan().all(dim=-1)


def region_table(regions: torch.Tensor) -> torch.Tensor:
    """(N, L, T, B, R, 2) -> (L, T, R, 2): region means averaged over the (sample, branch) observations with MAs
    (NaN where none has MAs: an observation without MAs says nothing about where MAs sit), maxima over all."""
    means = regions[..., MEAN].masked_fill(~with_ma(regions)[..., None], math.nan).nanmean(dim=(0, 3))
    maxes = regions[..., MAX].nan_to_num(nan=-math.inf).amax(dim=(0, 3))
    return torch.stack([means, maxes], dim=-1)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) else math.nan


def region_entry(table: torch.Tensor, observations: int, with_ma_count: int) -> dict:
    """Summary of one (block, step): region means/maxima, the three ratios of means (NaN without MAs), and how
    many of its observations were captured and had MAs."""
    entry = {name: {"mean": table[r, MEAN].item(), "max": table[r, MAX].item()} for r, name in enumerate(REGION_NAMES)}
    for pair, (a, b) in PAIRS.items():
        entry[pair] = _ratio(table[a, MEAN].item(), table[b, MEAN].item())
    entry["observations"], entry["with_ma"] = observations, with_ma_count
    return entry


# ------------------------------------------------------------------------------------------- hierarchy verdict


def log_ratios(regions: torch.Tensor) -> torch.Tensor:
    """(N, L, T, B, R, 2) -> (N, L, T, B, pairs) log(mean_a / mean_b) per observation with MAs, float64; NaN
    where it has none or a region mean is not positive (a region without tokens)."""
    means = regions[..., MEAN].double()
    usable = with_ma(regions)
    columns = []
    for a, b in PAIRS.values():
        ok = usable & (means[..., a] > 0) & (means[..., b] > 0)  # NaN > 0 is False
        logs = means[..., a].clamp_min(1e-300).log() - means[..., b].clamp_min(1e-300).log()
        columns.append(torch.where(ok, logs, math.nan))
    return torch.stack(columns, dim=-1)


def prompt_groups(prompts: list[str]) -> torch.Tensor:
    """(N,) the prompt of each sample, numbered in order of appearance (samples of one text are one prompt)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(prompt, len(index)) for prompt in prompts], dtype=torch.long)


def prompt_means(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N, ...) per-observation values (NaN: none) -> (prompts,) the mean of each prompt's finite values, pooled
    over its samples (NaN for a prompt without any)."""
    flat = values.reshape(values.shape[0], -1).double()
    finite = flat.isfinite()
    count = int(groups.max()) + 1 if groups.numel() else 0
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, torch.where(finite, flat, 0.0).sum(dim=1))
    counts = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, finite.sum(dim=1).double())
    return sums / counts


def pair_verdict(values: torch.Tensor, settings: VerdictSettings) -> dict:
    """Verdict on one ratio from its per-prompt mean log ratios (NaN: the prompt has no observation with MAs).

    ratio: exp of the mean over prompts (a geometric mean of per-observation ratios); ci: the percentile bootstrap
    interval over prompts; holds when ci[0] > 1 + min_effect, does_not_hold when ci[1] < 1 + min_effect (absent,
    smaller than the minimum effect, or reversed), else inconclusive, and always with fewer than min_prompts."""
    values = values[values.isfinite()].double()
    n = values.numel()
    result = {"ratio": math.exp(values.mean().item()) if n else math.nan, "ci": [math.nan, math.nan],
              "verdict": "inconclusive", "prompts": n}
    if n < settings.min_prompts:
        return result
    generator = torch.Generator().manual_seed(settings.seed)
    resampled = values[torch.randint(n, (settings.resamples, n), generator=generator)].mean(dim=1)
    tail = (1.0 - settings.confidence) / 2
    low, high = torch.quantile(resampled, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).exp().tolist()
    result["ci"] = [low, high]
    if low > settings.threshold:
        result["verdict"] = "holds"
    elif high < settings.threshold:
        result["verdict"] = "does_not_hold"
    return result


def overall_verdict(pairs: dict) -> str:
    """holds when both adjacent pairs hold, does_not_hold when either does not hold, else inconclusive."""
    verdicts = [pairs[name]["verdict"] for name in ADJACENT]
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "does_not_hold" if "does_not_hold" in verdicts else "inconclusive"


def _reason(verdict: str, pairs: dict, settings: VerdictSettings) -> str:
    level, threshold = f"{settings.confidence:.0%}", f"{settings.threshold:g}"
    if verdict == "holds":
        return f"the {level} intervals of first/boundary and boundary/interior lie above {threshold}"
    parts = []
    for name in ADJACENT:
        pair, label = pairs[name], PAIR_LABELS[name]
        low, high = pair["ci"]
        if pair["prompts"] < settings.min_prompts:
            part = (f"{pair['prompts']} prompt(s) with MAs, the bootstrap over prompts needs at least "
                    f"{settings.min_prompts} (analysis.min_prompts)")
        elif pair["verdict"] == "does_not_hold":
            part = f"{label}: {level} interval [{low:.3f}, {high:.3f}] lies below {threshold}"
        elif pair["verdict"] == "inconclusive":
            part = f"{label}: {level} interval [{low:.3f}, {high:.3f}] contains {threshold}"
        else:
            continue
        if part not in parts:
            parts.append(part)
    return "; ".join(parts)


def hierarchy_verdict(regions: torch.Tensor, prompts: list[str], steps: list[int],
                      settings: VerdictSettings = VerdictSettings()) -> dict:
    """The hierarchy verdict of one variant from its regions (N, L, T, B, R, 2) and the prompt of each sample:
    verdict and reason, the three ratios with their intervals, the counts behind them, the settings, and the same
    verdict per captured step (over blocks)."""
    groups = prompt_groups(prompts)
    logs = log_ratios(regions)  # (N, L, T, B, pairs)

    def pairs_of(values: torch.Tensor) -> dict:
        return {name: {**pair_verdict(prompt_means(values[..., k], groups), settings),
                       "observations": int(values[..., k].isfinite().sum())} for k, name in enumerate(PAIRS)}

    pairs = pairs_of(logs)
    verdict = overall_verdict(pairs)
    by_step = {}
    for j, step in enumerate(steps):
        step_pairs = pairs_of(logs[:, :, j])
        by_step[str(step)] = {"verdict": overall_verdict(step_pairs),
                              **{name: {key: pair[key] for key in ("ratio", "ci", "verdict")}
                                 for name, pair in step_pairs.items()}}
    has, done = with_ma(regions), captured(regions)
    entry_has, entry_done = has.any(dim=3).any(dim=0), done.any(dim=3).any(dim=0)  # (L, T)
    return {
        "verdict": verdict,
        "reason": _reason(verdict, pairs, settings),
        "ratios": pairs,
        "counts": {
            "prompts": int(groups.max()) + 1 if groups.numel() else 0,
            "samples": int(regions.shape[0]),
            "observations": int(done.sum()),
            "observations_without_ma": int((done & ~has).sum()),
            "entries": int(entry_done.sum()),
            "entries_without_ma": int((entry_done & ~entry_has).sum()),
        },
        "settings": asdict(settings),
        "by_step": by_step,
    }


# ------------------------------------------------------------------------------------------- profile and period


def within_frame_profile(tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(tokens_per_frame,) MA magnitude by position inside a latent frame, averaged over the frames after the
    first one (the temporal chunks; the first frame alone when there is no other)."""
    grid = tokens.reshape(layout.frames, layout.tokens_per_frame)
    return grid[1:].mean(dim=0) if layout.frames > 1 else grid[0]


def autocorrelation(x: torch.Tensor) -> torch.Tensor:
    """Biased autocorrelation of a 1-D signal at lags 0..n-1 (lag 0 = 1), by FFT."""
    x = x.double() - x.double().mean()
    n = x.numel()
    spectrum = torch.fft.rfft(x, 2 * n)
    acf = torch.fft.irfft(spectrum * spectrum.conj(), 2 * n)[:n]
    return acf / acf[0] if acf[0] > 0 else torch.zeros(n, dtype=torch.float64)


def frame_rotation_null(x: torch.Tensor, tokens_per_frame: int, draws: int, seed: int) -> tuple[float, torch.Tensor]:
    """The autocorrelation at lag tokens_per_frame of `x` (whole frames of tokens), and `draws` values of it under
    the null: every frame rotated (circularly shifted) by its own random offset. Each frame keeps its values, its
    mean and its internal order, so a trend over frames or a pattern within frames survives; only the alignment
    of the pattern to the frame starts is destroyed.

    Exact and cheap: with y the centred signal as (frames, tpf) and C[f, d] = sum_j y[f, j] y[f+1, j+d] (circular
    cross-correlation of adjacent frames), a draw with offsets o is sum_f C[f, o[f+1] - o[f]] / sum(y^2)."""
    y = x.double() - x.double().mean()
    denominator = (y * y).sum()
    if denominator <= 0:
        return 0.0, torch.zeros(draws, dtype=torch.float64)
    frames = y.reshape(-1, tokens_per_frame)
    spectrum = torch.fft.rfft(frames, dim=1)
    cross = torch.fft.irfft(spectrum[:-1].conj() * spectrum[1:], n=tokens_per_frame, dim=1)  # (frames - 1, tpf)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(tokens_per_frame, (draws, frames.shape[0]), generator=generator)
    lags = (offsets[:, 1:] - offsets[:, :-1]) % tokens_per_frame  # (draws, frames - 1)
    rows = torch.arange(cross.shape[0]).expand_as(lags)
    return (cross[:, 0].sum() / denominator).item(), cross[rows, lags].sum(dim=1) / denominator


def sequence_period(tokens: torch.Tensor, layout: TokenLayout, settings: VerdictSettings = VerdictSettings()) -> dict:
    """The period of the per-token MA magnitude over the temporal chunks (frames after the first), and whether it
    is evidence that the spikes follow the latent-frame chunking.

    period: the lag of the highest local maximum of the autocorrelation (None when there are fewer than two chunks
    or nothing varies). autocorrelation_at_frame: at lag tokens_per_frame; null_mean, null_p: its mean under the
    frame-rotation null (frame_rotation_null, settings.resamples draws) and the fraction of draws at least as high
    ((1 + count) / (1 + draws), never 0). period_evidence: period == tokens_per_frame and null_p <= 1 - confidence.
    """
    tpf = layout.tokens_per_frame
    result = {"tokens_per_frame": tpf, "period": None, "period_is_frame": False, "autocorrelation_at_period": None,
              "autocorrelation_at_frame": None, "null_mean": None, "null_p": None, "period_evidence": False}
    if layout.frames < 3:
        return result
    chunks = tokens[tpf:]
    acf = autocorrelation(chunks)
    lags = torch.arange(2, acf.numel() - 1)
    peaks = lags[(acf[lags] >= acf[lags - 1]) & (acf[lags] > acf[lags + 1]) & (acf[lags] > 0)]
    if peaks.numel():
        period = int(peaks[torch.argmax(acf[peaks])])
        result.update(period=period, period_is_frame=period == tpf, autocorrelation_at_period=acf[period].item())
    observed, null = frame_rotation_null(chunks, tpf, settings.resamples, settings.seed)
    null_p = (1 + int((null >= observed - 1e-9).sum())) / (1 + null.numel())
    result.update(autocorrelation_at_frame=observed, null_mean=null.mean().item(), null_p=null_p,
                  period_evidence=bool(result["period_is_frame"] and null_p <= 1.0 - settings.confidence))
    return result
