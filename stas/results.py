"""Paper-style tables from run directories: STAS vs vanilla deltas with bootstrap intervals, sign-flip p-values,
a multiple-comparison correction and effect sizes.

A *run* is a directory with `run_identity.yaml` (written by stas.run) and, once evaluated, `metrics.jsonl` rows
(video, prompt, seed, evaluator, metric, value). A run's value for a metric is the mean over its prompts of the mean
over each prompt's samples (for VBench dimensions this equals VBench's own aggregate when every prompt has the same
number of samples). Deltas pair each steered run with the vanilla run of identical config but `steer`, over the
prompts both evaluated; the statistics are those of stas.evaluation.significance (docs/evaluation.md, "Statistics of
the deltas"). Rows keep the sweep's order (vanilla first within a model) and name what a sweep varied by the option
chosen (`window=all`), from the Hydra choices the run recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stas.errors import UserError
from stas.evaluation.scores import (DIMENSIONS, QUALITY_DIMENSIONS, SEMANTIC_DIMENSIONS, unscored_dimensions,
                                   vbench_scores)
from stas.evaluation.significance import CORRECTIONS, adjust_pvalues, compare_paired
from stas.generation import generation_rows, video_costs
from stas.rundir import (IDENTITY_FILE, MANIFEST_FILE, METRIC_FIELDS, checked_records, flatten, hydra_job,
                         load_identity, read_manifest, run_dirs_below)

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
COMPOSITES = {"quality_score": QUALITY_DIMENSIONS, "semantic_score": SEMANTIC_DIMENSIONS, "total_score": DIMENSIONS}
COMPOSITE_KINDS = {"quality_score": "quality", "semantic_score": "semantic", "total_score": "VBench"}
STAS_PRESETS = ("stas", "stas_paper")
IDENTITY_KEYS = {"model.name": str, "model.fps": int, "steer.enabled": bool, "steer.name": str}  # what tables read
METHOD_PREFIXES = ("steer.", "detect.")  # what makes a run the method it is: vanilla runs ignore them
# Units: VBench dimensions and scores in percent (as VBench and the paper print them), every other metric on its
# evaluator's own scale ("raw": a cosine similarity for pixel, dino and clip).
PERCENT, RAW = "%", "raw"
DELTA_COLUMNS = ["model", "method", "metric", "unit", "n_pairs", "delta", "ci_low", "ci_high", "effect_size_dz",
                 "p_value", "p_adjusted", "correction", "alpha", "significant", "verdict"]
TOO_FEW = "n too small"
HOW_TO_EVALUATE = ("Evaluate with `python -m stas.evaluate RUN_DIR eval=vbench_standard` (all 16 dimensions, the "
                   "paper's protocol; the semantic dimensions need runs made with prompts=vbench), or name the "
                   "missing dimensions in eval.vbench.dimensions.")


@dataclass
class Run:
    path: Path
    identity: dict
    metrics: list[dict] = field(default_factory=list)
    choices: dict[str, str] | None = None  # Hydra's config-group choices, when the run recorded them
    job: int | None = None  # Hydra's multirun job number

    @property
    def model(self) -> str:
        return self.identity["model"]["name"]

    @property
    def steered(self) -> bool:
        return bool(self.identity["steer"]["enabled"])

    @property
    def guidance(self) -> str:
        return str(self.identity.get("guidance", {}).get("name", "cfg"))

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


def _natural(text: str) -> tuple:
    """'job10' after 'job9': digit runs compare as numbers (re.split alternates text and digits, so types line up)."""
    return tuple(int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", text)))


def find_runs(paths: list[Path], skipped: list[Path] | None = None) -> list[Run]:
    """Every run under the given run or sweep directories, with its metric rows (merged and shard files), in sweep
    order: the paths as given; below each, sweep folders in natural order, their runs by Hydra job number (then
    natural order of the folder name, so that 10 comes after 9). Run directories without any output (failed before
    their first video, or not started) are left out and added to `skipped`."""
    runs, seen, skipped = [], set(), [] if skipped is None else skipped
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a directory")
        stubs, found = len(skipped), run_dirs_below(path, skipped)
        if not found:
            raise UserError(f"{path} holds no run (no {IDENTITY_FILE} below it): is it a stas.run output directory?"
                            if len(skipped) == stubs else f"{path} holds no run with any output (no video, no "
                            f"record): {', '.join(map(str, skipped[stubs:]))}")
        below = []
        for run_dir in found:
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            choices, job = hydra_job(run_dir)
            metrics = {(row["video"], row["evaluator"], row["metric"]): row
                       for row in checked_records(run_dir, "metrics", METRIC_FIELDS)}
            below.append(Run(run_dir, _checked_identity(run_dir), list(metrics.values()), choices, job))
        runs += sorted(below, key=lambda run: (
            tuple(map(_natural, run.path.relative_to(path).parent.parts)),
            (0, run.job) if run.job is not None else (1, 0), _natural(run.path.name)))
    return runs


def _checked_identity(run_dir: Path) -> dict:
    identity = load_identity(run_dir)
    flat = flatten(identity)
    lacking = [key for key in IDENTITY_KEYS if key not in flat]
    if lacking:
        raise UserError(f"{run_dir / IDENTITY_FILE} lacks {', '.join(lacking)}: is it a stas.run identity?")
    for key, kind in IDENTITY_KEYS.items():
        if not isinstance(flat[key], kind) or (kind is int and isinstance(flat[key], bool)):
            raise UserError(f"{run_dir / IDENTITY_FILE}: {key}={flat[key]!r} is not of the type stas.run "
                            f"writes ({kind.__name__})")
    return identity


def table_order(runs: list[Run]) -> list[Run]:
    """Rows in sweep order: models in the order first found, the vanilla runs first within a model."""
    models = list(dict.fromkeys(run.model for run in runs))
    return sorted(runs, key=lambda run: (models.index(run.model), run.steered))


def varying_keys(runs: list[Run]) -> list[str]:
    """Identity keys whose values differ between runs: what a sweep varied."""
    flat = [flatten(run.identity) for run in runs]
    keys = set().union(*flat)
    return sorted(k for k in keys if len({repr(f.get(k)) for f in flat}) > 1)


def run_labels(runs: list[Run]) -> list[str]:
    """The method column of each run: Vanilla / +STAS / +<preset>, plus what the sweep varied between runs of a model.

    A varying identity key is named by the config-group option that set it when the runs recorded their Hydra choices
    and the option decides the key's value in all of them (`window=all`, not `window.end=1.0, window.start=0.0`),
    else as key=value (`alpha=0.5`, `guidance_scale=3.0`). steer and detect keys count among steered runs only. Nothing the
    Model column or the method name already says is repeated (the model option, the steer preset)."""
    flats = [flatten(run.identity) for run in runs]
    choices = [{"model": flat["model.name"], "steer": flat["steer.name"], **(run.choices or {})}
               for run, flat in zip(runs, flats)]
    parts: list[dict[str, str]] = [{} for _ in runs]
    for key in varying_keys(runs):
        if key in ("steer.enabled", "steer.name"):
            continue
        among = [i for i, run in enumerate(runs) if run.steered or not key.startswith(METHOD_PREFIXES)]
        if len({repr(flats[i].get(key)) for i in among}) < 2:
            continue
        group = _deciding_group(key, [flats[i].get(key) for i in among], [choices[i] for i in among])
        for i in among:
            name = group or key
            parts[i][name] = f"{_short(name)}={choices[i][group] if group else flats[i].get(key)}"
    for i, run in enumerate(runs):
        parts[i].pop("model", None)
        steered = [j for j, other in enumerate(runs) if other.steered and other.method == run.method]
        if len({choices[j].get("steer") for j in steered}) <= 1:  # the preset name already tells it
            parts[i].pop("steer", None)
    return [run.method + (f" ({', '.join(part[k] for k in sorted(part))})" if part else "")
            for run, part in zip(runs, parts)]


def _deciding_group(key: str, values: list, choices: list[dict]) -> str | None:
    """The deepest config group above `key` that every run chose an option of and whose option decides the value."""
    groups = sorted({g for c in choices for g in c if not g.startswith("hydra/")}, key=lambda g: -g.count("/"))
    for group in groups:
        if not key.startswith(group.replace("/", ".") + ".") or any(group not in c for c in choices):
            continue
        decided: dict = {}
        if all(decided.setdefault(c[group], repr(v)) == repr(v) for c, v in zip(choices, values)):
            return group
    return None


def _short(name: str) -> str:
    for prefix in ("steer.", "steer/", "model."):
        if name.startswith(prefix) and name != prefix[:-1]:
            return name[len(prefix):]
    return name


def _vbench_dims(per_prompt) -> dict[str, dict[str, float]]:
    return {metric: values for (evaluator, metric), values in per_prompt.items() if evaluator == "vbench"}


def composite_scores(dimension_means: dict[str, float]) -> dict[str, float]:
    scores = vbench_scores(dimension_means)
    return {name: scores[name] for name in COMPOSITES if scores.get(name) is not None}


def run_scores(run: Run) -> dict:
    """vbench_scores of the run's dimension means, dimensions with every video excluded (color) as unscored."""
    return vbench_scores(dimension_means(run), unscored_dimensions(run.metrics))


def dimension_means(run: Run) -> dict[str, float]:
    """The run's raw VBench value of each dimension it has (mean over prompts)."""
    return {m: float(np.mean(list(v.values()))) for m, v in _vbench_dims(run.per_prompt()).items()}


def run_values(run: Run) -> dict[str, float]:
    """Every metric of a run ('evaluator/metric'), VBench dimensions and composite scores in percent."""
    values = {f"{e}/{m}": float(np.mean(list(v.values()))) for (e, m), v in run.per_prompt().items()}
    values.update({f"vbench/{m}": 100.0 * v for m, v in dimension_means(run).items()})
    scores = run_scores(run)
    values.update({name: scores[name] for name in COMPOSITES if name in scores})
    return values


def unit_of(metric: str) -> str:
    """'%' for VBench dimensions ('vbench/...') and composite scores, 'raw' for every other metric."""
    return PERCENT if metric.startswith("vbench/") or metric in COMPOSITES else RAW


def paper_table(runs: list[Run]) -> pd.DataFrame:
    """One row per backbone x method in sweep order, the paper's Table 1 columns in percent (NaN where not evaluated;
    paper_table_notes says why)."""
    labels = dict(zip(map(id, runs), run_labels(runs)))
    records = []
    for run in table_order(runs):
        values = run_values(run)
        record = {"Model": run.model, "Method": labels[id(run)]}
        for title, name in PAPER_COLUMNS.items():
            record[f"{title} ({PERCENT})"] = values.get(name if name in COMPOSITES else f"vbench/{name}", np.nan)
        record["NFE"] = video_costs(run.path)["nfe"]
        records.append(record)
    return pd.DataFrame.from_records(records, columns=["Model", "Method", *(f"{t} ({PERCENT})" for t in PAPER_COLUMNS),
                                                       "NFE"])


def paper_table_notes(runs: list[Run]) -> list[str]:
    """Why cells of the paper table are empty: for each column some run lacks, the VBench dimensions it needs and
    which are missing, then how to get them; each dimension a run evaluated without any value (every video excluded:
    color) and each score withheld for that or for a raw value not in [0, 1]. Empty when every cell has a value."""
    unscored = [unscored_dimensions(run.metrics) for run in runs]
    # An unscored dimension was evaluated: evaluating again gives no value, so it is not among the missing
    have = [{m for (e, m) in run.per_prompt() if e == "vbench"} | set(empty) for run, empty in zip(runs, unscored)]
    labels = run_labels(runs)
    notes = []
    for title, name in PAPER_COLUMNS.items():
        needs = COMPOSITES.get(name, (name,))
        lacking = [i for i, dims in enumerate(have) if not set(needs) <= dims]
        if not lacking:
            continue
        missing = [d for d in needs if any(d not in have[i] for i in lacking)]
        who = ("every run" if len(lacking) == len(runs)
               else ", ".join(f"{runs[i].model} {labels[i]}" for i in lacking))
        notes.append(f"{title} ({PERCENT}): VBench's {name} is missing in {who}." if len(needs) == 1 else
                     f"{title} ({PERCENT}) needs all {len(needs)} {COMPOSITE_KINDS[name]} dimensions; missing in "
                     f"{who}: {', '.join(missing)}.")
    withheld = [f"{run.model} {label}: {dimension} has no value, {reason}." for run, label, empty
                in zip(runs, labels, unscored) for dimension, reason in empty.items()]
    withheld += [f"{run.model} {label}: {name} withheld, {reason}." for run, label in zip(runs, labels)
                 for name, reason in run_scores(run)["withheld"].items()]
    return notes + [HOW_TO_EVALUATE] + withheld if notes else withheld


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """Every metric of every run, one row per run in sweep order, the unit in each column name ('%' or 'raw')."""
    labels = dict(zip(map(id, runs), run_labels(runs)))
    records = [{"Model": run.model, "Method": labels[id(run)], "NFE": video_costs(run.path)["nfe"],
                **{f"{k} ({unit_of(k)})": v for k, v in run_values(run).items()}} for run in table_order(runs)]
    return pd.DataFrame.from_records(records)


def methods_table(runs: list[Run]) -> pd.DataFrame:
    """The methods compared at their cost: one row per backbone x guidance x steering (models in the order first
    found, guidance methods in the order first found, vanilla first), with each run's mean NFE (transformer passes),
    steps and seconds per video beside its scores (Total Score when VBench gave it, and every other metric)."""
    labels = dict(zip(map(id, runs), run_labels(runs)))
    models = list(dict.fromkeys(run.model for run in runs))
    guidances = list(dict.fromkeys(run.guidance for run in runs))
    records = []
    for run in sorted(runs, key=lambda run: (models.index(run.model), guidances.index(run.guidance), run.steered)):
        costs, values = video_costs(run.path), run_values(run)
        records.append({"Model": run.model, "Guidance": run.guidance, "Method": labels[id(run)],
                        "NFE": costs["nfe"], "Steps": costs["steps"], "Seconds": costs["seconds"],
                        **{f"{k} ({unit_of(k)})": v for k, v in values.items()}})
    return pd.DataFrame.from_records(records)


def vanilla_partner(run: Run, runs: list[Run]) -> Run | None:
    """The vanilla run with the same config but `steer` and `detect` (same model, prompts, seeds, sampling
    settings)."""
    mine = {k: v for k, v in flatten(run.identity).items() if not k.startswith(METHOD_PREFIXES)}
    for other in runs:
        if not other.steered and {k: v for k, v in flatten(other.identity).items()
                                  if not k.startswith(METHOD_PREFIXES)} == mine:
            return other
    return None


def delta_table(runs: list[Run], resamples: int = 2000, seed: int = 0, *, permutations: int = 10000,
                min_pairs: int = 6, correction: str = "holm", alpha: float = 0.05) -> pd.DataFrame:
    """Steered minus vanilla per metric and composite score, one row each (columns DELTA_COLUMNS, units in `unit`).

    Per row: the delta, its paired bootstrap interval at level 1 - alpha (`resamples` prompt resamples), the paired
    sign-flip p-value (`permutations`: exact below 2^n <= permutations), Cohen's d_z. Rows with at least `min_pairs`
    prompts form the correction's family; `p_adjusted` and `significant` (p_adjusted <= alpha) are theirs, the others
    say `n too small` in `verdict` and have no `p_adjusted` and no `significant`."""
    labels = dict(zip(map(id, runs), run_labels(runs)))
    records = []
    for run in table_order(runs):
        partner = vanilla_partner(run, runs) if run.steered else None
        if partner is None:
            continue
        mine, theirs = run.per_prompt(), partner.per_prompt()
        comparisons = []
        for (evaluator, metric), values in sorted(mine.items()):
            if (evaluator, metric) in theirs:
                scale = 100.0 if evaluator == "vbench" else 1.0
                comparisons.append((f"{evaluator}/{metric}", {metric: theirs[(evaluator, metric)]}, {metric: values},
                                    lambda means, m=metric, s=scale: s * means[m]))
        dims_a, dims_b = _vbench_dims(theirs), _vbench_dims(mine)
        computable = composite_scores({m: 0.5 for m in dims_b if m in dims_a})  # which scores the shared dims allow
        comparisons += [(score, dims_a, dims_b, lambda means, s=score: composite_scores(means)[s])
                        for score in COMPOSITES if score in computable]
        for metric, a, b, statistic in comparisons:
            result = compare_paired(a, b, statistic, resamples, permutations, seed, level=1.0 - alpha)
            records.append({"model": run.model, "method": labels[id(run)], "metric": metric, "unit": unit_of(metric),
                            "n_pairs": result.n_pairs, "delta": result.delta, "ci_low": result.ci_low,
                            "ci_high": result.ci_high, "effect_size_dz": result.effect_size, "p_value": result.p_value})
    return judge(pd.DataFrame.from_records(records, columns=DELTA_COLUMNS[:10]), min_pairs, correction, alpha)


def judge(frame: pd.DataFrame, min_pairs: int, correction: str, alpha: float) -> pd.DataFrame:
    """Adds p_adjusted, correction, alpha, significant and verdict to rows with n_pairs and p_value: the family is
    every row with at least `min_pairs` pairs and a p-value."""
    if min_pairs < 2 or not 0.0 < alpha < 1.0 or correction not in CORRECTIONS:
        raise ValueError(f"min_pairs={min_pairs} (>= 2), alpha={alpha} (in (0, 1)), correction={correction!r} "
                         f"(one of {', '.join(CORRECTIONS)}): a value is out of range")
    frame = frame.copy()
    family = (frame["n_pairs"] >= min_pairs) & frame["p_value"].notna()
    frame["p_adjusted"] = np.nan
    frame.loc[family, "p_adjusted"] = adjust_pvalues(frame.loc[family, "p_value"].to_numpy(float), correction)
    frame["correction"], frame["alpha"] = correction, alpha
    frame["significant"] = pd.array([pd.NA] * len(frame), dtype="boolean")
    frame.loc[family, "significant"] = frame.loc[family, "p_adjusted"] <= alpha
    frame["verdict"] = [("significant" if s else "not significant") if f else TOO_FEW
                        for f, s in zip(family, frame["significant"].fillna(False))]
    return frame[DELTA_COLUMNS]


def delta_display(frame: pd.DataFrame) -> pd.DataFrame:
    """The deltas as the Markdown and LaTeX tables show them: titled columns, p-values as text, yes/no/n too small."""
    adjusted = f"p adj. ({CORRECTIONS[frame['correction'].iloc[0] if len(frame) else 'holm']})"
    shown = pd.DataFrame({
        "Model": frame["model"], "Method": frame["method"], "Metric": frame["metric"], "Unit": frame["unit"],
        "Delta": frame["delta"], "CI low": frame["ci_low"], "CI high": frame["ci_high"], "Pairs": frame["n_pairs"],
        "d_z": frame["effect_size_dz"], "p": frame["p_value"].map(format_p),
        adjusted: frame["p_adjusted"].map(format_p),
        "Significant": [TOO_FEW if v == TOO_FEW else "yes" if v == "significant" else "no" for v in frame["verdict"]],
    })
    return shown.astype({"Pairs": int}) if len(shown) else shown


def format_p(p: float) -> str:
    return "–" if not np.isfinite(p) else f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


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
