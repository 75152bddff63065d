"""Several analysis runs side by side (backbones, steering variants): a Markdown table and a figure.

Used by `python -m stas.analyze analysis.compare=[dir,...]` and `python analysis/compare_runs.py dir ...`.
A directory is an analysis run when it holds ma_summary.json; a directory without one whose subdirectories hold
them (a multirun sweep) stands for those subdirectories.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from stas.errors import UserError
from stas.ma.analysis import SUMMARY_FILE
from stas.ma.hierarchy import ADJACENT, PAIR_LABELS
from stas.ma.plots import save_figure
from stas.ma.stats import OPTIONAL_SUMMARY_KEYS, SUMMARY_KEYS
from stas.rundir import atomic_write_json, atomic_write_text

COMPARE_FILES = ("compare.md", "compare.json", "compare.png")


def analysis_runs(paths) -> list[Path]:
    """The analysis run directories that `paths` name, in order; a clear UserError for anything else."""
    if not paths:
        raise UserError("analysis.compare is empty: give analysis run directories, e.g. "
                        "analysis.compare=[runs/a/analyze-1,runs/b/analyze-2]")
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"analysis.compare: {str(path)!r} is not a directory")
        if (path / SUMMARY_FILE).is_file():
            runs.append(path)
            continue
        inner = sorted(p.parent for p in path.glob(f"*/{SUMMARY_FILE}"))
        if not inner:
            raise UserError(f"analysis.compare: {str(path)!r} is not an analysis run: it has no {SUMMARY_FILE}, "
                            f"nor have its subdirectories (analysis runs are written by python -m stas.analyze)")
        runs.extend(inner)
    return runs


def read_summary(run: Path) -> dict:
    try:
        summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{run / SUMMARY_FILE}: cannot be read as JSON ({err})") from None
    missing = [key for key in SUMMARY_KEYS if key not in OPTIONAL_SUMMARY_KEYS
               and (not isinstance(summary, dict) or key not in summary)]
    if missing:
        older = ("; one written before the hierarchy verdict can be rewritten from its ma_stats.pt with "
                 "stas.ma.stats.summarise") if missing == ["hierarchy"] else ""
        raise UserError(f"{run / SUMMARY_FILE} is not an ma_summary.json written by stas.analyze "
                        f"(missing: {', '.join(missing)}{older})")
    return summary


def compare_rows(runs: list[Path]) -> list[dict]:
    """One row per (run, variant): hierarchy verdict, ratios with their intervals, period and channel stability."""
    rows = []
    for run in runs:
        summary = read_summary(run)
        for variant, result in summary["results"].items():
            hierarchy, stability = result["hierarchy"], result["stability"]
            periods = [p["period"] for p in result["profiles"]]
            rows.append({
                "run": f"{run.parent.name}/{run.name}",
                "model": summary["model"],
                "variant": variant if variant == "vanilla" else f"{variant} ({summary['steer']})",
                "prompts": len(summary["prompts"]),
                "MA channels (every block)": " ".join(map(str, stability["channels_in_every_layer"])) or "-",
                "hierarchy": hierarchy["verdict"],
                **{label: hierarchy["ratios"][pair]["ratio"] for pair, label in PAIR_LABELS.items()},
                **{f"{PAIR_LABELS[pair]} CI": hierarchy["ratios"][pair]["ci"] for pair in ADJACENT},
                "entries without MAs": f"{hierarchy['counts']['entries_without_ma']}/{hierarchy['counts']['entries']}",
                "tokens/frame": summary["layout"]["tokens_per_frame"],
                "period": " ".join(str(p) for p in periods),
                "period = frame": all(p["period_is_frame"] for p in result["profiles"]),
                "period evidence": all(p["period_evidence"] for p in result["profiles"]),
                "stable over prompts": stability["prompts"],
                "over steps": stability["steps"],
                "over blocks": stability["layers"],
            })
    return rows


def _cell(value):
    """An interval [low, high] as one short cell ('-' without one)."""
    if not isinstance(value, list):
        return value
    return "-" if None in value else f"[{value[0]:.2f}, {value[1]:.2f}]"


def compare_table(rows: list[dict]) -> str:
    import pandas as pd

    cells = [{key: _cell(value) for key, value in row.items()} for row in rows]
    return pd.DataFrame(cells).to_markdown(index=False, floatfmt=".2f", missingval="-")


def compare_figure(rows: list[dict]) -> Figure:
    """Bars of the two ratios of the hierarchy verdict per run and variant, with their bootstrap intervals."""
    labels = [f"{row['model']}\n{row['variant']}" for row in rows]
    keys = [PAIR_LABELS[pair] for pair in ADJACENT]
    fig = Figure(figsize=(max(5.0, 1.4 * len(rows) + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    for offset, key in zip((-0.2, 0.2), keys):
        values = np.array([row[key] if row[key] is not None else np.nan for row in rows])
        low, high = (np.array([np.nan if row[f"{key} CI"][i] is None else row[f"{key} CI"][i] for row in rows])
                     for i in (0, 1))
        errors = np.nan_to_num(np.stack([values - low, high - values]), nan=0.0)
        ax.bar(x + offset, values, width=0.4, label=key, yerr=errors, capsize=3)
    ax.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("MA magnitude ratio (geometric mean)")
    ax.legend(fontsize=8)
    ax.set_title("Massive-activation hierarchy per run (bars: bootstrap intervals over prompts)")
    return fig


def compare(paths, out_dir: Path) -> str:
    """Write compare.md, compare.json and compare.png into `out_dir`; returns the Markdown table."""
    rows = compare_rows(analysis_runs(paths))
    table = compare_table(rows)
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "compare.md", table + "\n")
    atomic_write_json(out_dir / "compare.json", rows)
    save_figure(compare_figure(rows), out_dir / "compare.png")
    return table
