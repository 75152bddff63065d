"""The results schema: per-video metric rows (metrics.jsonl) and their per-run aggregate (metrics.json).

A row is one number about one video: {video, prompt, seed, evaluator, metric, value, video_sha256} (the
video's content when it was scored: a regenerated video is scored again), plus `weight` where the value
averages over frame pairs or frames that a pooled aggregate should count (VBench pools its consistency dimensions
over frame pairs, not videos), `settings` for the frame-feature evaluators (what the value depends on besides the
video: pixel size or weights, temporal compression), and `error` (with value null) when the video could not be
scored, or `excluded` (with value null) when the tool scored it and gives it no value by its own definition.
`aggregate_metrics` is pure, so the merge of sharded runs can call it on the union of the shards' rows.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stas.errors import UserError
from stas.evaluation.scores import DIMENSIONS, raw_value_problem, unscored_dimensions, vbench_scores

METRICS_STAGE = "metrics"  # rows in metrics.jsonl, or shards/metrics-III-of-KKK.jsonl (stas.rundir.shard_file)
METRICS_FILE = f"{METRICS_STAGE}.jsonl"
AGGREGATE_FILE = "metrics.json"
VBENCH_SCORES = ("quality_score", "semantic_score", "total_score")  # in an aggregate's "vbench", where computed


@dataclass(frozen=True)
class Video:
    """One video of a run: its file name (the `video` of its rows), where it is, what made it, its content hash."""

    name: str
    path: Path
    prompt: str
    seed: int | None
    sha256: str | None = None


def row_key(row: dict) -> str:
    return f"{row['video']}\t{row['evaluator']}\t{row['metric']}"


def metric_row(video: Video, evaluator: str, metric: str, value: float, weight: int | None = None) -> dict:
    row = {"video": video.name, "prompt": video.prompt, "seed": video.seed, "evaluator": evaluator,
           "metric": metric, "value": value, "video_sha256": video.sha256}
    if weight is not None:
        row["weight"] = weight
    if value is not None and not math.isfinite(value):
        # JSON has no NaN or infinity; the video counts as not scored, with the reason, and is tried again.
        return {**row, "value": None, "error": f"{evaluator} gave a non-finite {metric} ({value})"}
    return row


def error_row(video: Video, evaluator: str, metric: str, error: str) -> dict:
    return {**metric_row(video, evaluator, metric, None), "error": error}


def excluded_row(video: Video, evaluator: str, metric: str, reason: str) -> dict:
    """A video the tool scored and gave no value by its own definition (VBench's color, no object detected): done,
    not an error, not in the aggregate's values."""
    return {**metric_row(video, evaluator, metric, None), "excluded": reason}


def aggregate_metrics(rows) -> dict:
    """The per-run aggregate of metric rows.

    metrics: {"evaluator/metric": {mean, std, count, [pooled]}}: mean and sample std over videos; `pooled` (when
    every row has a weight) = sum(value * weight) / sum(weight), which is how VBench aggregates.
    vbench: the dimensions' values as VBench aggregates them, and vbench_scores of those (partial sets say what
    is missing; a value outside [0, 1] is "invalid" and the scores built on it "withheld", with the reason), and
    "flagged": the videos whose rows hold such values; "unscored": each dimension every video of which is excluded
    (no value; the scores built on it are withheld, not "missing": evaluating again gives none). errors: the rows
    of videos that could not be scored; excluded: the rows of videos the tool scored and gave no value by its own definition (VBench's color when the
    object is never detected), left out of the values as VBench leaves them out.
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    errors, excluded = [], []
    for row in rows:
        if row.get("value") is None and row.get("excluded"):
            excluded.append({key: row.get(key) for key in ("video", "evaluator", "metric", "excluded")})
        elif row.get("value") is None:
            errors.append({key: row.get(key) for key in ("video", "evaluator", "metric", "error")})
        else:
            groups[(row["evaluator"], row["metric"])].append(row)
    metrics = {}
    for (evaluator, metric), group in sorted(groups.items()):
        values = [row["value"] for row in group]
        entry = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                 "count": len(values)}
        total = sum(row.get("weight", 0) for row in group)
        if total > 0 and all("weight" in row for row in group):
            entry["pooled"] = sum(row["value"] * row["weight"] for row in group) / total
        metrics[f"{evaluator}/{metric}"] = entry
    result = {"videos": len({row["video"] for row in rows}), "metrics": metrics, "errors": errors,
              "excluded": excluded}
    dimensions = {d: metrics[f"vbench/{d}"].get("pooled", metrics[f"vbench/{d}"]["mean"])
                  for d in DIMENSIONS if f"vbench/{d}" in metrics}
    unscored = unscored_dimensions(rows)
    if dimensions or unscored:
        result["vbench"] = {"dimensions": dimensions, **vbench_scores(dimensions, unscored), "unscored": unscored,
                            "flagged": flagged_rows(groups)}
    return result


def flagged_rows(groups: dict) -> dict[str, list[str]]:
    """{dimension: the videos whose VBench row holds a raw value outside [0, 1]}: kept in the rows and in the
    dimension's value, flagged here (a dimension value outside [0, 1] withholds the scores built on it)."""
    flagged = {}
    for dimension in DIMENSIONS:
        videos = [row["video"] for row in groups.get(("vbench", dimension), []) if raw_value_problem(row["value"])]
        if videos:
            flagged[dimension] = videos
    return flagged


def summary_values(aggregate: dict) -> dict:
    """Flat {name: number} of an aggregate, for a W&B summary: metric means, VBench dimensions and scores."""
    flat = {f"eval/{name}": entry["mean"] for name, entry in aggregate["metrics"].items()}
    vbench = aggregate.get("vbench", {})
    flat.update({f"eval/vbench/{d}": value for d, value in vbench.get("dimensions", {}).items()})
    flat.update({f"eval/vbench/{score}": vbench[score] for score in VBENCH_SCORES if score in vbench})
    flat["eval/errors"] = len(aggregate["errors"])
    return flat


def aggregate_values(aggregate: dict) -> dict[str, float]:
    """{name: number} of an aggregate that a search can optimise: every `evaluator/metric` (its pooled value where it
    has one, as VBench aggregates, else its mean over videos) and `vbench/<score>` for the VBench scores computed."""
    values = {name: entry.get("pooled", entry["mean"]) for name, entry in aggregate.get("metrics", {}).items()}
    vbench = aggregate.get("vbench", {})
    values.update({f"vbench/{score}": vbench[score] for score in VBENCH_SCORES if score in vbench})
    return values


def aggregate_value(aggregate: dict, name: str, where: str) -> float:
    """The value `name` of an aggregate read from `where` (a metrics.json); a UserError naming the metric, the
    metrics there, and why an evaluator gave none (skipped, or every video failed) when it is not there."""
    values = aggregate_values(aggregate)
    if name in values:
        return float(values[name])
    available = ", ".join(sorted(values)) or "none"
    lines = [f"search.metric={name!r} is not in {where}; its metrics: {available}"]
    evaluator, _, metric = name.partition("/")
    vbench = aggregate.get("vbench", {}) if evaluator == "vbench" else {}
    needs = vbench.get("missing", {}).get(metric)
    if needs:
        lines.append(f"VBench's {metric} needs the dimension(s) {', '.join(needs)} too")
    if metric in vbench.get("withheld", {}):
        lines.append(f"VBench's {metric} is withheld: {vbench['withheld'][metric]}")
    for scorer, reason in aggregate.get("skipped", {}).items():
        if scorer.split("/")[0] == evaluator:
            first = reason[0] if isinstance(reason, list) and reason else reason
            lines.append(f"{scorer} was skipped: {first}")
    failed = sum(f"{error.get('evaluator')}/{error.get('metric')}" == name for error in aggregate.get("errors", []))
    if failed:
        lines.append(f"{failed} video(s) could not be scored for it (\"errors\" in {where})")
    raise UserError("; ".join(lines))
