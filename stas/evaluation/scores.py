"""VBench's aggregate scores (Quality, Semantic, Total) from raw per-dimension values.

The constants are VBench's own (scripts/constant.py and scripts/cal_final_score.py in github.com/Vchitect/VBench):
each raw value is min/max normalised and weighted, Quality is the weighted mean of the 7 quality dimensions,
Semantic of the 9 semantic ones, Total = (4 * Quality + 1 * Semantic) / 5. VBench does not clip the normalised
values, and neither do we.
"""

from __future__ import annotations

import math
from collections import defaultdict

# dimension: (Min, Max, weight), snake_case as VBench names its dimensions in code and in results files.
NORMALIZATION = {
    "subject_consistency": (0.1462, 1.0, 1.0),
    "background_consistency": (0.2615, 1.0, 1.0),
    "temporal_flickering": (0.6293, 1.0, 1.0),
    "motion_smoothness": (0.706, 0.9975, 1.0),
    "dynamic_degree": (0.0, 1.0, 0.5),
    "aesthetic_quality": (0.0, 1.0, 1.0),
    "imaging_quality": (0.0, 1.0, 1.0),
    "object_class": (0.0, 1.0, 1.0),
    "multiple_objects": (0.0, 1.0, 1.0),
    "human_action": (0.0, 1.0, 1.0),
    "color": (0.0, 1.0, 1.0),
    "spatial_relationship": (0.0, 1.0, 1.0),
    "scene": (0.0, 0.8222, 1.0),
    "appearance_style": (0.0009, 0.2855, 1.0),
    "temporal_style": (0.0, 0.364, 1.0),
    "overall_consistency": (0.0, 0.364, 1.0),
}
QUALITY_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
                      "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC_DIMENSIONS = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                       "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1
# VBench's custom_input mode refuses these: they need the auxiliary info (objects, colours, ...) of its own prompts.
NEED_STANDARD_PROMPTS = ("object_class", "multiple_objects", "scene", "appearance_style", "color",
                         "spatial_relationship")


def normalized_score(dimension: str, raw: float) -> float:
    """(raw - Min) / (Max - Min), not clipped, not weighted: 1.0 is VBench's Max."""
    low, high, _ = NORMALIZATION[dimension]
    return (raw - low) / (high - low)


def _weighted_mean(raw: dict, dimensions) -> float:
    weights = [NORMALIZATION[d][2] for d in dimensions]
    return sum(normalized_score(d, raw[d]) * w for d, w in zip(dimensions, weights)) / sum(weights)


def raw_value_problem(value) -> str | None:
    """Why a raw dimension value cannot enter VBench's scores (not a number, NaN, outside [0, 1]), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "not a number"
    if math.isnan(value):
        return "NaN"
    if not 0.0 <= value <= 1.0:
        return "outside [0, 1]"
    return None


def vbench_scores(raw: dict, unscored: dict[str, str] | None = None) -> dict:
    """VBench's Quality, Semantic and Total scores in percent from raw dimension values in [0, 1].

    `unscored`: {dimension: why} for dimensions that were evaluated and have no value by VBench's own definition
    (color when no video of the set has its object detected); evaluating again would give none either.

    Returns the scores whose dimensions are all in `raw` with valid values (quality_score, semantic_score,
    total_score), each valid dimension's normalised value in percent under "normalized", under "missing" the
    dimensions each absent score still needs (not evaluated yet), under "invalid" each dimension whose raw value is
    not a number in [0, 1] (NaN, out of range: broken or random weights) with why, and under "withheld" each score
    that is not computed because one of its dimensions is invalid or unscored, with the reason. Never raises for a
    bad value: the value is flagged and the scores built on it are withheld. A Total is never computed from a
    partial set.
    """
    unscored = {d: why for d, why in (unscored or {}).items() if d not in raw}
    unknown = sorted((set(raw) | set(unscored)) - set(NORMALIZATION))
    if unknown:
        raise ValueError(f"unknown VBench dimension(s) {unknown}; allowed: {', '.join(DIMENSIONS)}")
    invalid = {d: problem for d in DIMENSIONS if d in raw and (problem := raw_value_problem(raw[d]))}
    result: dict = {"normalized": {d: 100.0 * normalized_score(d, raw[d]) for d in DIMENSIONS
                                   if d in raw and d not in invalid}}
    missing, withheld = {}, {}
    groups = (("quality_score", QUALITY_DIMENSIONS), ("semantic_score", SEMANTIC_DIMENSIONS),
              ("total_score", DIMENSIONS))
    for name, dimensions in groups:
        absent = [d for d in dimensions if d not in raw and d not in unscored]
        bad = [d for d in dimensions if d in invalid]
        empty = [d for d in dimensions if d in unscored]
        if absent:
            missing[name] = absent
        reasons = []
        if bad:
            reasons.append("raw value(s) not a number in [0, 1]: " + ", ".join(
                f"{d}={raw[d]!r} ({invalid[d]})" for d in bad))
        if empty:
            reasons.append("no value for " + ", ".join(f"{d} ({unscored[d]})" for d in empty))
        if reasons:
            withheld[name] = "; ".join(reasons)
        if absent or reasons:
            continue
        if name == "total_score":
            result[name] = ((QUALITY_WEIGHT * result["quality_score"] + SEMANTIC_WEIGHT * result["semantic_score"])
                            / (QUALITY_WEIGHT + SEMANTIC_WEIGHT))
        else:
            result[name] = 100.0 * _weighted_mean(raw, dimensions)
    result.update(missing=missing, invalid=invalid, withheld=withheld)
    return result


def unscored_dimensions(rows) -> dict[str, str]:
    """{dimension: why} for each VBench dimension whose metric rows are all excluded: evaluated, and no video has a
    value by VBench's own rule (color when no video has its object detected). vbench_scores' `unscored`."""
    excluded, valued = defaultdict(list), set()
    for row in rows:
        if row.get("evaluator") != "vbench" or row.get("metric") not in NORMALIZATION:
            continue
        if row.get("value") is not None:
            valued.add(row["metric"])
        elif row.get("excluded"):
            excluded[row["metric"]].append(str(row["excluded"]))
    return {d: f"all {len(reasons)} video(s) excluded: {reasons[0]}" for d, reasons in excluded.items()
            if d not in valued}
