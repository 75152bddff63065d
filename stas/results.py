"""Paper-style tables from run directories, with paired bootstrap confidence intervals for STAS vs vanilla.

A *run* is a directory with `run_identity.yaml` (written by stas.run) and, once evaluated, `metrics.jsonl` rows
(video, prompt, seed, evaluator, metric, value). A run's value for a metric is the mean over its videos (for VBench
dimensions this equals VBench's own aggregate: every video of a run has the same frame count). Deltas pair each
steered run with the vanilla run of identical config but `steer`, over the prompts both evaluated, and resample
prompts (same resample on both sides) for a percentile 95% interval; composite VBench scores resample every
dimension's prompts and recompute the score in each replicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stas.errors import UserError
from stas.evaluation.scores import vbench_scores
from stas.generation import generation_rows
from stas.rundir import (IDENTITY_FILE, MANIFEST_FILE, METRIC_FIELDS, checked_records, flatten,
                         load_identity, read_manifest)

# The paper's Table 1: column title -> VBench dimension, or the composite score.
PAPER_COLUMNS = {
    "Subject Consistency": "subject_consistency",
    "Background Consistency": "background_consistency",
    "Aesthetic Quality": "aesthetic_quality",
    "Imaging Quality": "imaging_quality",
    "Quality Score": "quality_score",
    "Semantic Score": "semantic_score",
    "Total Score": "total_score",
}
COMPOSITES = ("quality_score", "semantic_score", "total_score")
STAS_PRESETS = ("stas", "stas_paper")
IDENTITY_KEYS = {"model.name": str, "model.fps": int, "steer.enabled": bool, "steer.name": str}  # what tables read


@dataclass
class Run:
    path: Path
    identity: dict
    metrics: list[dict] = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.identity["model"]["name"]

    @property
    def steered(self) -> bool:
        return bool(self.identity["steer"]["enabled"])

    @property
    def method(self) -> str:
        if not self.steered:
            return "Vanilla"
        name = self.identity["steer"]["name"]
        return "+STAS" if name in STAS_PRESETS else f"+{name}"

    def per_prompt(self) -> dict[tuple[str, str], dict[str, float]]:
        """{(evaluator, metric): {prompt: mean value over that prompt's samples}}; error rows skipped."""
        sums: dict = {}
        for row in self.metrics:
            value = row.get("value")
            if value is None or row.get("error") or not np.isfinite(value):
                continue
            cell = sums.setdefault((row["evaluator"], row["metric"]), {}).setdefault(row["prompt"], [])
            cell.append(float(value))
        return {key: {p: float(np.mean(v)) for p, v in prompts.items()} for key, prompts in sums.items()}


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run under the given run or sweep directories, with its metric rows (merged and shard files)."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a directory")
        found = [path] if (path / IDENTITY_FILE).is_file() else sorted(p.parent for p in path.rglob(IDENTITY_FILE))
        if not found:
            raise UserError(f"{path} holds no run (no {IDENTITY_FILE} below it): is it a stas.run output directory?")
        for run_dir in found:
            identity = load_identity(run_dir)
            flat = flatten(identity)
            lacking = [key for key in IDENTITY_KEYS if key not in flat]
            if lacking:
                raise UserError(f"{run_dir / IDENTITY_FILE} lacks {', '.join(lacking)}: is it a stas.run identity?")
            for key, kind in IDENTITY_KEYS.items():
                if not isinstance(flat[key], kind) or (kind is int and isinstance(flat[key], bool)):
                    raise UserError(f"{run_dir / IDENTITY_FILE}: {key}={flat[key]!r} is not of the type stas.run "
                                    f"writes ({kind.__name__})")
            rows = {(row["video"], row["evaluator"], row["metric"]): row
                    for row in checked_records(run_dir, "metrics", METRIC_FIELDS)}
            runs.append(Run(run_dir, identity, list(rows.values())))
    return runs


def varying_keys(runs: list[Run]) -> list[str]:
    """Identity keys whose values differ between runs: what a sweep varied."""
    flat = [flatten(run.identity) for run in runs]
    keys = set().union(*flat)
    return sorted(k for k in keys if len({repr(f.get(k)) for f in flat}) > 1)


def run_label(run: Run, keys: list[str]) -> str:
    """The method column of a run: Vanilla / +STAS, plus the swept non-model settings that set it apart."""
    flat = flatten(run.identity)
    extra = [f"{k.split('.', 1)[1] if k.startswith('steer.') else k}={flat.get(k)}" for k in keys
             if not k.startswith("model.") and k not in ("steer.enabled", "steer.name")
             and (run.steered or not k.startswith("steer."))]
    return run.method + (f" ({', '.join(extra)})" if extra else "")


def _vbench_dims(per_prompt) -> dict[str, dict[str, float]]:
    return {metric: values for (evaluator, metric), values in per_prompt.items() if evaluator == "vbench"}


def composite_scores(dimension_means: dict[str, float]) -> dict[str, float]:
    scores = vbench_scores(dimension_means)
    return {name: scores[name] for name in COMPOSITES if scores.get(name) is not None}


def run_values(run: Run) -> dict[str, float]:
    """Every metric of a run ('evaluator/metric'), VBench dimensions and composite scores in percent."""
    per_prompt = run.per_prompt()
    values = {f"{e}/{m}": float(np.mean(list(v.values()))) for (e, m), v in per_prompt.items()}
    dims = {m: float(np.mean(list(v.values()))) for m, v in _vbench_dims(per_prompt).items()}
    values.update({f"vbench/{m}": 100.0 * v for m, v in dims.items()})
    if dims:
        values.update(composite_scores(dims))
    return values


def paper_table(runs: list[Run]) -> pd.DataFrame:
    """One row per backbone x method, the paper's Table 1 columns (percent; NaN where not evaluated)."""
    keys = varying_keys(runs)
    records = []
    for run in runs:
        values = run_values(run)
        record = {"Model": run.model, "Method": run_label(run, keys)}
        for title, name in PAPER_COLUMNS.items():
            record[title] = values.get(name if name in COMPOSITES else f"vbench/{name}", np.nan)
        records.append(record)
    return pd.DataFrame.from_records(records).sort_values(["Model", "Method"], kind="stable").reset_index(drop=True)


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """Every metric of every run, one row per run (the ablation table and the chunk-aware similarity columns)."""
    keys = varying_keys(runs)
    records = [{"Model": run.model, "Method": run_label(run, keys), **run_values(run)} for run in runs]
    frame = pd.DataFrame.from_records(records)
    return frame.sort_values(["Model", "Method"], kind="stable").reset_index(drop=True)


def vanilla_partner(run: Run, runs: list[Run]) -> Run | None:
    """The vanilla run with the same config but `steer` (same model, prompts, seeds, sampling settings)."""
    mine = {k: v for k, v in flatten(run.identity).items() if not k.startswith("steer.")}
    for other in runs:
        if not other.steered and {k: v for k, v in flatten(other.identity).items() if not k.startswith("steer.")} == mine:
            return other
    return None


def paired_bootstrap(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], statistic, resamples: int,
                     seed: int) -> tuple[float, float, float, int]:
    """Delta statistic(b) - statistic(a) and its percentile 95% interval, resampling the prompts each metric shares.

    `a`, `b`: {metric: {prompt: value}}; `statistic`: {metric: mean} -> float. Returns (delta, low, high, prompts).
    """
    shared = {m: sorted(set(a[m]) & set(b[m])) for m in a if m in b}
    shared = {m: p for m, p in shared.items() if p}
    if not shared:
        return np.nan, np.nan, np.nan, 0
    arrays = {m: (np.array([a[m][p] for p in ps]), np.array([b[m][p] for p in ps])) for m, ps in shared.items()}
    delta = statistic({m: y.mean() for m, (_, y) in arrays.items()}) - statistic({m: x.mean() for m, (x, _) in arrays.items()})
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for r in range(resamples):
        draws = {m: rng.integers(0, len(x), len(x)) for m, (x, _) in arrays.items()}
        replicates[r] = (statistic({m: y[draws[m]].mean() for m, (_, y) in arrays.items()})
                         - statistic({m: x[draws[m]].mean() for m, (x, _) in arrays.items()}))
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(delta), float(low), float(high), max(len(p) for p in shared.values())


def delta_table(runs: list[Run], resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """STAS minus vanilla per metric, with a paired bootstrap 95% CI over prompts (percent for VBench)."""
    keys = varying_keys(runs)
    records = []
    for run in runs:
        partner = vanilla_partner(run, runs) if run.steered else None
        if partner is None:
            continue
        mine, theirs = run.per_prompt(), partner.per_prompt()
        for (evaluator, metric), values in sorted(mine.items()):
            if (evaluator, metric) not in theirs:
                continue
            scale = 100.0 if evaluator == "vbench" else 1.0
            delta, low, high, n = paired_bootstrap({metric: theirs[(evaluator, metric)]}, {metric: values},
                                                   lambda means, m=metric: scale * means[m], resamples, seed)
            records.append(_delta_record(run, keys, f"{evaluator}/{metric}", delta, low, high, n))
        dims_a, dims_b = _vbench_dims(theirs), _vbench_dims(mine)
        computable = composite_scores({m: 0.0 for m in dims_b if m in dims_a})  # which scores the shared dims allow
        for score in COMPOSITES:
            if score not in computable:
                continue
            delta, low, high, n = paired_bootstrap(dims_a, dims_b, lambda means, s=score: composite_scores(means)[s],
                                                   resamples, seed)
            records.append(_delta_record(run, keys, score, delta, low, high, n))
    columns = ["Model", "Method", "Metric", "Delta", "CI low", "CI high", "Prompts", "Significant"]
    return pd.DataFrame.from_records(records, columns=columns)


def _delta_record(run, keys, metric, delta, low, high, prompts) -> dict:
    return {"Model": run.model, "Method": run_label(run, keys), "Metric": metric, "Delta": delta, "CI low": low,
            "CI high": high, "Prompts": prompts, "Significant": bool(low > 0 or high < 0)}


def missing_work(run: Run) -> list[str]:
    """What a run still lacks: videos of its manifest not generated, generated videos without metrics."""
    manifest = read_manifest(run.path) if (run.path / MANIFEST_FILE).exists() else []
    generated = generation_rows(run.path)  # checks every row (untrusted input)
    problems = []
    not_generated = [m for m in manifest if m["key"] not in generated]
    if not_generated:
        problems.append(f"{run.path}: {len(not_generated)} of {len(manifest)} videos not generated "
                        f"(first: {not_generated[0]['prompt']!r} sample {not_generated[0]['index']})")
    scored = {row["video"] for row in run.metrics}  # metric rows name a video by its file name
    unscored = [row for row in generated.values() if Path(row["path"]).name not in scored]
    if unscored:
        problems.append(f"{run.path}: {len(unscored)} of {len(generated)} videos have no metrics "
                        f"(run: python -m stas.evaluate {run.path})")
    return problems


# ------------------------------------------------------------------------------------------------------- writing


def to_markdown(frame: pd.DataFrame, digits: int = 2) -> str:
    return frame.to_markdown(index=False, floatfmt=f".{digits}f", missingval="–")


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in str(text))


def to_latex(frame: pd.DataFrame, caption: str, label: str, digits: int = 2) -> str:
    """A booktabs table; numbers right-aligned, NaN as an en dash."""

    def cell(value):
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (int, np.integer)):
            return str(value)
        if isinstance(value, (float, np.floating)):
            return "--" if np.isnan(value) else f"{value:.{digits}f}"
        return latex_escape(value)

    align = "".join("r" if pd.api.types.is_numeric_dtype(frame[c]) else "l" for c in frame.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in frame.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(cell(v) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
