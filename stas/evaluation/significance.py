"""Paired statistics for steered-vs-vanilla comparisons: bootstrap intervals, sign-flip p-values, effect sizes and
multiple-comparison corrections (numpy only). See docs/evaluation.md, "Statistics of the deltas".

The unit of replication is the prompt. A metric's values come as {metric: {prompt: value}}, each value already the
mean over that prompt's samples (seeds are replicates of one prompt, not independent observations), and the two runs
are paired by prompt. A statistic maps {metric: mean over prompts} to a number: one metric scaled, or a VBench
composite score of several dimensions, which is affine in the dimension means (VBench does not clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}
_CHUNK = 1 << 22  # sign matrix elements per Monte Carlo chunk (32 MiB of float64 products)


@dataclass(frozen=True)
class PairedComparison:
    delta: float  # statistic(b) - statistic(a) over the shared prompts
    ci_low: float  # percentile bootstrap interval of the delta at `level`
    ci_high: float
    n_pairs: int  # prompts paired (the union over the metrics the statistic reads)
    p_value: float  # two-sided sign-flip permutation p-value, uncorrected
    effect_size: float  # paired Cohen's d_z of the per-prompt contributions


def shared_prompts(a: dict, b: dict) -> dict[str, list[str]]:
    """{metric: prompts both sides have}, metrics without a shared prompt left out."""
    shared = {m: sorted(set(a[m]) & set(b[m])) for m in a if m in b}
    return {m: prompts for m, prompts in shared.items() if prompts}


def paired_bootstrap(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], statistic, resamples: int,
                     seed: int, level: float = 0.95) -> tuple[float, float, float, int]:
    """Delta statistic(b) - statistic(a) and its percentile interval at `level`, resampling prompts.

    `a`, `b`: {metric: {prompt: value}}; `statistic`: {metric: mean} -> float. Returns (delta, low, high, prompts).
    Prompts are resampled with replacement, the same draw on both sides (paired), stratified by the set of metrics a
    prompt belongs to: every metric keeps its number of prompts, metrics scored on the same prompts (VBench dimensions
    in custom_input mode) are resampled together, so their correlation across prompts stays in the interval, and
    metrics on disjoint prompt lists (VBench's standard suite) are resampled independently.
    """
    shared = shared_prompts(a, b)
    if not shared:
        return np.nan, np.nan, np.nan, 0
    union = sorted(set().union(*shared.values()))
    position = {p: i for i, p in enumerate(union)}
    columns = {m: np.array([position[p] for p in ps]) for m, ps in shared.items()}
    arrays = {m: (np.array([a[m][p] for p in ps]), np.array([b[m][p] for p in ps])) for m, ps in shared.items()}
    delta = (statistic({m: y.mean() for m, (_, y) in arrays.items()})
             - statistic({m: x.mean() for m, (x, _) in arrays.items()}))
    strata: dict[tuple, list[int]] = {}
    for p in union:
        strata.setdefault(tuple(m for m in shared if p in a[m] and p in b[m]), []).append(position[p])
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, len(union)))  # how often each prompt is drawn in each replicate
    rows = np.arange(resamples)[:, None]
    for members in strata.values():
        members = np.array(members)
        np.add.at(counts, (rows, members[rng.integers(0, len(members), (resamples, len(members)))]), 1.0)
    means_a = {m: counts[:, columns[m]] @ x / len(x) for m, (x, _) in arrays.items()}
    means_b = {m: counts[:, columns[m]] @ y / len(y) for m, (_, y) in arrays.items()}
    replicates = np.array([statistic({m: v[r] for m, v in means_b.items()})
                           - statistic({m: v[r] for m, v in means_a.items()}) for r in range(resamples)])
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(replicates, [tail, 100.0 - tail])
    return float(delta), float(low), float(high), len(union)


def prompt_contributions(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], statistic) -> np.ndarray:
    """Per-prompt contributions w (one per prompt shared by any metric) with sum(w) = statistic(b) - statistic(a).

    The statistic is affine in the metric means, so delta = sum over metrics m of c_m * mean_p(b_m[p] - a_m[p]), c_m its
    slope in m: w_p = sum over the metrics m that prompt p has of c_m * (b_m[p] - a_m[p]) / n_m. For one metric w is
    the per-prompt difference (scaled, divided by n); for a composite score whose dimensions share their prompts it is
    the per-prompt difference of the score divided by n. A ValueError when the statistic is not affine.
    """
    shared = shared_prompts(a, b)
    if not shared:
        return np.zeros(0)
    base = {m: 0.5 for m in shared}  # a point inside VBench's raw range [0, 1]; any point does for an affine map
    slopes = {m: (statistic({**base, m: 0.6}) - statistic(base)) / 0.1 for m in shared}
    union = sorted(set().union(*shared.values()))
    position = {p: i for i, p in enumerate(union)}
    w = np.zeros(len(union))
    for m, prompts in shared.items():
        for p in prompts:
            w[position[p]] += slopes[m] * (b[m][p] - a[m][p]) / len(prompts)
    direct = (statistic({m: np.mean([b[m][p] for p in ps]) for m, ps in shared.items()})
              - statistic({m: np.mean([a[m][p] for p in ps]) for m, ps in shared.items()}))
    if not np.isclose(w.sum(), direct, rtol=1e-6, atol=1e-9):
        raise ValueError(f"the statistic is not affine in the metric means ({w.sum()} != {direct}): the sign-flip "
                         "test needs per-prompt contributions")
    return w


def sign_flip_pvalue(values, permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of |sum(values)|, flipping the sign of each prompt's difference.

    Under "steering changes nothing", the steered and vanilla video of a prompt are exchangeable, so each per-prompt
    difference is as likely negated. Exact (all 2^n sign patterns) when 2^n <= `permutations`, else Monte Carlo with
    `permutations` random patterns and the (1 + hits) / (1 + permutations) estimate, which never gives 0 and keeps the
    test valid. With n pairs the exact p-value is at least 2 / 2^n: 0.0625 at n = 5, 0.03125 at n = 6.
    """
    v = np.asarray(values, dtype=float)
    n = v.size
    if n == 0 or not np.all(np.isfinite(v)):
        return np.nan
    tolerance = 1e-9 * np.abs(v).sum()  # sums of the same numbers in another order differ in the last bits
    observed = abs(v.sum())
    if observed <= tolerance:
        return 1.0
    if 2 ** n <= permutations:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs(signs @ v) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < permutations:
        size = min(permutations - done, max(1, _CHUNK // n))
        signs = rng.integers(0, 2, (size, n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ v) >= observed - tolerance))
        done += size
    return (1.0 + hits) / (1.0 + permutations)


def effect_size_dz(values) -> float:
    """Paired Cohen's d_z: mean / standard deviation (ddof 1) of the per-prompt differences; NaN below 2 pairs or when
    every difference is 0, +-inf when they are all equal and not 0. Scale-free, so contributions give the same d_z."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return np.nan
    mean, sd = v.mean(), v.std(ddof=1)
    if sd <= 1e-12 * max(1.0, np.abs(v).max()):
        return np.nan if mean == 0 else float(np.sign(mean) * np.inf)
    return float(mean / sd)


def adjust_pvalues(p_values, method: str) -> np.ndarray:
    """Adjusted p-values over the family of the finite ones (NaN stays NaN): `holm` (family-wise error, any
    dependence), `bh` (Benjamini-Hochberg false discovery rate), `none`. Reject where adjusted <= alpha."""
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; allowed: {', '.join(CORRECTIONS)}")
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    q = p[finite]
    m = q.size
    if m == 0 or method == "none":
        out[finite] = q
        return out
    order = np.argsort(q, kind="stable")
    ranked = q[order]
    if method == "holm":  # p_(i) * (m - i + 1), made monotone from the smallest up
        ranked = np.maximum.accumulate(np.minimum(1.0, ranked * (m - np.arange(m))))
    else:  # bh: p_(i) * m / i, made monotone from the largest down
        ranked = np.minimum(1.0, np.minimum.accumulate((ranked * m / np.arange(1, m + 1))[::-1])[::-1])
    adjusted = np.empty(m)
    adjusted[order] = ranked
    out[finite] = adjusted
    return out


def least_pairs(alpha: float) -> int:
    """The fewest pairs whose exact two-sided sign-flip p-value can reach `alpha` (2 / 2^n <= alpha): 6 at 0.05."""
    n = 1
    while 2.0 / 2 ** n > alpha:
        n += 1
    return n


def compare_paired(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], statistic, resamples: int = 2000,
                   permutations: int = 10000, seed: int = 0, level: float = 0.95) -> PairedComparison:
    """Delta, bootstrap interval, sign-flip p-value and d_z of statistic(b) - statistic(a), paired by prompt."""
    delta, low, high, n = paired_bootstrap(a, b, statistic, resamples, seed, level)
    w = prompt_contributions(a, b, statistic)
    return PairedComparison(delta, low, high, n, sign_flip_pvalue(w, permutations, seed), effect_size_dz(w))
