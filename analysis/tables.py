"""Paper-style tables of one or more sweeps or runs: Markdown, LaTeX and CSV; STAS-vs-vanilla deltas with bootstrap
intervals, sign-flip p-values corrected for multiple comparisons, and effect sizes.

    python analysis/tables.py multirun/paper_main --out multirun/paper_main/tables
    python analysis/tables.py multirun/ablation_vanilla multirun/ablation_targets --out tables/targets

Writes paper_table.{md,tex} (the paper's Table 1 columns, percent; when a column cannot be computed, a note names
the VBench dimensions it lacks, and with no VBench dimension at all the files hold only that explanation),
metrics_table.{md,tex} and results.csv (every metric, the unit in each column name: % or raw; NFE, the transformer
passes per video, in every table), methods_table.{md,tex} and methods.csv (one row per backbone x guidance x
steering: NFE, steps and seconds per video beside the scores), deltas.{md,tex} and
deltas.csv (steered minus vanilla per metric: n_pairs, delta, ci_low, ci_high, effect_size_dz, p_value, p_adjusted,
significant, verdict). Prompts are the unit of replication (samples of a prompt are averaged first); the p-value is a
paired sign-flip permutation test, corrected over every row with at least --min-pairs pairs (Holm by default); rows
with fewer say "n too small". Rows keep the sweep's order (vanilla first) and name ablations by the option chosen
(window=all). Logs the tables to W&B (job_type "aggregate") unless --wandb none. Exits 3 when a run is incomplete
(it says what is missing), 2 on bad input. Run directories without any output (a run that failed before its first
video) are skipped and named. Details: docs/evaluation.md, "Statistics of the deltas".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from stas.errors import UserError
from stas.evaluation.significance import CORRECTIONS, least_pairs
from stas.loggers import RunLogger
from stas.results import (delta_display, delta_table, find_runs, methods_table, metrics_table, missing_work,
                          paper_table, paper_table_notes)
from stas.table_files import to_latex, to_markdown
from stas.rundir import atomic_write_text, check_writable

NO_PAPER_TABLE = "No paper table: no run has the VBench dimensions of any of its columns."


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the prompts for the "
                        "confidence intervals (default 2000, at least 100)")
    parser.add_argument("--permutations", type=int, default=10000, help="sign flips of the Monte Carlo p-value; "
                        "exact (all 2^n) when 2^n <= this (default 10000, at least 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the sign flips")
    parser.add_argument("--min-pairs", type=int, default=6, help="fewest paired prompts for a verdict; rows with "
                        "fewer say 'n too small' (default 6: the least n whose exact two-sided p can reach 0.05)")
    parser.add_argument("--correction", choices=list(CORRECTIONS), default="holm",
                        help="multiple-comparison correction over the rows with a verdict: holm (family-wise "
                             "error, default), bh (Benjamini-Hochberg false discovery rate) or none")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the adjusted p-values; "
                        "the intervals are at 1 - alpha (default 0.05)")
    parser.add_argument("--wandb", choices=["offline", "online", "disabled", "none"], default="offline")
    parser.add_argument("--allow-incomplete", action="store_true", help="exit 0 even when runs are incomplete")
    args = parser.parse_args(argv)
    for option, value, least in (("--resamples", args.resamples, 100), ("--permutations", args.permutations, 100),
                                 ("--min-pairs", args.min_pairs, 2)):
        if value < least:
            parser.error(f"{option} {value}: must be an integer of at least {least}")
    if not 0.0 < args.alpha < 1.0:
        parser.error(f"--alpha {args.alpha}: must be a number strictly between 0 and 1 (e.g. 0.05)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    skipped = []
    try:
        runs = find_runs(args.paths, skipped)
        missing = [problem for run in runs for problem in missing_work(run)]
        check_writable(args.out)
    except UserError as err:
        print(f"tables: error: {err}", file=sys.stderr)
        return 2
    if skipped:
        print(f"tables: skipped {len(skipped)} run director{'y' if len(skipped) == 1 else 'ies'} without any output "
              "(no video, no record: the run failed before its first video, or has not started):\n  "
              + "\n  ".join(map(str, skipped)), file=sys.stderr)
    deltas = delta_table(runs, args.resamples, args.seed, permutations=args.permutations, min_pairs=args.min_pairs,
                         correction=args.correction, alpha=args.alpha)
    level = f"{100 * (1 - args.alpha):g}%"
    tables = {  # name: (table, caption, digits)
        "paper_table": (paper_table(runs), "VBench scores (percent), one row per backbone and method.", 2),
        "metrics_table": (metrics_table(runs), "Every metric, mean over prompts (VBench in percent, others raw).", 4),
        "methods_table": (methods_table(runs), "Guidance methods with and without steering at their cost: transformer "
                          "passes (NFE), steps and seconds per video, beside every metric.", 4),
        "deltas": (delta_display(deltas), f"Steered minus vanilla, paired over prompts: {level} bootstrap interval, "
                   f"sign-flip p-value, {CORRECTIONS[args.correction]} over the rows with at least {args.min_pairs} "
                   f"pairs, significant when the adjusted p <= {args.alpha:g}; d_z = mean / sd of the per-prompt "
                   "differences.", 4),
    }
    notes = paper_table_notes(runs)
    paper = tables["paper_table"][0]
    has_paper = bool(np.isfinite(paper[[c for c in paper.columns if c.endswith("(%)")]].to_numpy(float)).any())
    for name, (frame, caption, digits) in tables.items():
        markdown, latex = to_markdown(frame, digits) + "\n", to_latex(frame, caption, f"tab:{name}", digits)
        if name == "paper_table":
            markdown, latex = _paper_files(markdown, latex, has_paper, notes)
        atomic_write_text(args.out / f"{name}.md", markdown)
        atomic_write_text(args.out / f"{name}.tex", latex)
    atomic_write_text(args.out / "results.csv", tables["metrics_table"][0].to_csv(index=False))
    atomic_write_text(args.out / "methods.csv", tables["methods_table"][0].to_csv(index=False))
    atomic_write_text(args.out / "deltas.csv", deltas.to_csv(index=False))
    print(f"{len(runs)} run(s) from {', '.join(map(str, args.paths))}\n")
    _print_tables(args, tables, deltas, notes, has_paper)
    print(f"tables written to {args.out}")
    _log(args, tables)
    if missing:
        print("INCOMPLETE:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 0 if args.allow_incomplete else 3
    return 0


def _paper_files(markdown: str, latex: str, has_paper: bool, notes: list[str]) -> tuple[str, str]:
    """The paper table with a paragraph per note (the dimensions an empty column lacks) below it, as LaTeX comments
    in the .tex; without a single value, only the explanation (the files are still written)."""
    comments = "".join(f"% {line}\n" for line in notes)
    if not has_paper:
        return f"{NO_PAPER_TABLE}\n\n" + "\n\n".join(notes) + "\n", comments + rf"\emph{{{NO_PAPER_TABLE}}}" + "\n"
    return markdown + "".join(f"\n{line}\n" for line in notes), latex + comments


def _print_tables(args, tables, deltas, notes, has_paper) -> None:
    if has_paper:
        print(to_markdown(tables["paper_table"][0]) + "\n")
    print("".join(f"paper_table: {line}\n" for line in notes) + ("\n" if notes else ""), end="")
    methods = tables["methods_table"][0]
    if methods["Guidance"].nunique() > 1:  # a comparison of guidance methods: show what each cost
        print(to_markdown(methods[["Model", "Guidance", "Method", "NFE", "Steps", "Seconds"]]) + "\n")
    if deltas.empty:
        return
    print(to_markdown(tables["deltas"][0], digits=4) + "\n")
    family = int(deltas["p_adjusted"].notna().sum())
    print(f"deltas: {CORRECTIONS[args.correction]} correction over {family} row(s) with at least {args.min_pairs} "
          f"pairs, alpha {args.alpha:g}; {int(deltas['significant'].fillna(False).sum())} significant, "
          f"{len(deltas) - family} with n too small")
    if args.min_pairs < least_pairs(args.alpha):
        print(f"deltas: note: rows of {args.min_pairs} to {least_pairs(args.alpha) - 1} pairs cannot reach p <= "
              f"{args.alpha:g} (the exact sign-flip p-value is at least 2 / 2^n)")
    floor = 1.0 / (1 + args.permutations)
    if family and args.correction != "none" and floor > args.alpha / family and (deltas["n_pairs"] > np.log2(
            args.permutations)).any():
        print(f"deltas: note: Monte Carlo p-values cannot go below 1/(1 + {args.permutations}) = {floor:.1e}, above "
              f"the smallest threshold alpha/{family} = {args.alpha / family:.1e}: raise --permutations")
    print()


def _log(args, tables) -> None:
    if args.wandb == "none":
        return
    group = Path(args.paths[0]).resolve().name
    logger_cfg = OmegaConf.create({"backend": "wandb", "mode": args.wandb, "project": "stas", "entity": None,
                                   "group": group, "tags": [], "log_videos": 0, "init_timeout": 120})
    with RunLogger.for_directory(logger_cfg, args.out, job_type="aggregate", group=group,
                                 config={"paths": [str(p) for p in args.paths]}) as logger:
        for name, (frame, _, _) in tables.items():
            logger.log_table(name, frame.to_dict("records"))


if __name__ == "__main__":
    sys.exit(main())
