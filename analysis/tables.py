"""Paper-style tables of one or more sweeps or runs: Markdown and LaTeX, STAS-vs-vanilla deltas with 95% CIs.

    python analysis/tables.py multirun/paper_main --out multirun/paper_main/tables
    python analysis/tables.py multirun/ablation_vanilla multirun/ablation_targets --out tables/targets

Writes paper_table.{md,tex} (the paper's Table 1 columns), metrics_table.{md,tex} (every metric, e.g. the
chunk-aware frame similarity), deltas.{md,tex} (paired bootstrap over prompts) and results.csv; logs them to W&B
(job_type "aggregate") unless --wandb none. Exits 3 when a run is incomplete (it says what is missing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from stas.errors import UserError
from stas.rundir import atomic_write_text, check_writable
from stas.results import delta_table, find_runs, metrics_table, missing_work, paper_table, to_latex, to_markdown
from stas.loggers import RunLogger


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--wandb", choices=["offline", "online", "disabled", "none"], default="offline")
    parser.add_argument("--allow-incomplete", action="store_true", help="exit 0 even when runs are incomplete")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.paths)
        missing = [problem for run in runs for problem in missing_work(run)]
        check_writable(args.out)
    except UserError as err:
        print(f"tables: error: {err}", file=sys.stderr)
        return 2
    tables = {  # name: (table, caption, digits)
        "paper_table": (paper_table(runs), "VBench scores (percent), one row per backbone and method.", 2),
        "metrics_table": (metrics_table(runs), "Every metric, mean over videos.", 4),
        "deltas": (delta_table(runs, args.resamples, args.seed),
                   "Steered minus vanilla, paired bootstrap 95% CI over prompts.", 4),
    }
    for name, (frame, caption, digits) in tables.items():
        atomic_write_text(args.out / f"{name}.md", to_markdown(frame, digits) + "\n")
        atomic_write_text(args.out / f"{name}.tex", to_latex(frame, caption, f"tab:{name}", digits))
    atomic_write_text(args.out / "results.csv", tables["metrics_table"][0].to_csv(index=False))
    print(f"{len(runs)} run(s) from {', '.join(map(str, args.paths))}\n")
    print(to_markdown(tables["paper_table"][0]) + "\n")
    if not tables["deltas"][0].empty:
        print(to_markdown(tables["deltas"][0], digits=4) + "\n")
    print(f"tables written to {args.out}")
    _log(args, tables)
    if missing:
        print("INCOMPLETE:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 0 if args.allow_incomplete else 3
    return 0


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
